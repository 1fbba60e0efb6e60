"""The usage verbs of the CLI end to end against a live server."""

from __future__ import annotations

import pytest

from tests.conftest import Cli, Client, Clock

M = "llama-3.1-8b-instant"


async def test_price_check_report_then_usage_spend_and_logs(cli: Cli, client: Client, clock: Clock) -> None:
    org = await client.org("acme", [(M, "requests", "minute", 2), (M, "tokens", "minute", 100_000)])
    _, key = await client.project(org, "myapp-prod")
    out = await cli.ok("price", org, M, "--input", "1", "--output", "2", "--cached", "0.5")
    assert M in out and "0.5" in out

    decision = await cli.json("check", "--api-key", key, "--model", M, "--tokens", "5000")
    out = await cli.ok("report", "--api-key", key, "--request-id", str(decision["request_id"]), "--input", "3000",
                       "--output", "1000", "--cached", "1000")  # fmt: skip
    assert out.startswith("reconciled: 3000 tokens count toward limits, -2000 to the buckets, $0.004500")
    await cli("check", "--api-key", key, "--model", M)
    code, _, _ = await cli("check", "--api-key", key, "--model", M)
    assert code == 3  # refused: 2 per minute

    usage = await cli.json("usage", org, "--by", "project,model", "--granularity", "day", "--since", "2d")
    assert usage["total"]["requests"] == 2 and usage["total"]["input_tokens"] == 3000  # type: ignore[index]
    assert usage["total"]["refusals"] == {"REASON_ORGANIZATION_LIMIT": 1}  # type: ignore[index]
    table = await cli.ok("usage", org, "--project", "myapp-prod", "--since", "2d")
    assert "total" in table.splitlines()[-1] and "3000" in table.splitlines()[-1]

    spend = await cli.ok("spend", org)
    assert spend.splitlines()[2].split()[:2] == ["(organization)", "0.004500"]
    out = await cli.ok("spend-limit", org, "0.009", "--project", "myapp-prod")
    assert "50%" in out and "blocked" not in out
    out = await cli.ok("spend-limit", org, "0.004", "--project", "myapp-prod")
    assert "50%,75%,90%,100%" in out and "blocked" in out
    code, out, _ = await cli("check", "--api-key", key, "--model", M)
    assert code == 3 and "REASON_SPEND_LIMIT" in out
    await cli.ok("spend-limit", org, "--clear", "--project", "myapp-prod")

    logs = (await cli.ok("logs", org, "myapp-prod")).splitlines()
    assert len(logs) == 4 and "REASON_SPEND_LIMIT" in logs[1] and "allowed" in logs[-1]
    assert len((await cli.ok("logs", org, "myapp-prod", "--refused")).splitlines()) == 3


@pytest.mark.parametrize(
    ("argv", "message", "code"),
    [
        (["usage", "org_aaaaaaaaaaaa", "--since", "yesterday"], "--since 'yesterday' is not a number", 2),
        (["usage", "org_aaaaaaaaaaaa", "--since", "0"], "--since '0' is not a number followed by s, m, h or d", 2),
        (["usage", "org_aaaaaaaaaaaa", "--by", "team"], "--by 'team' is not one of", 2),
        (["spend-limit", "org_aaaaaaaaaaaa"], "give a limit in USD or --clear", 2),
        (["spend", "org_aaaaaaaaaaaa", "--month", "2026-13"], "INVALID_ARGUMENT: month '2026-13' is not YYYY-MM", 1),
    ],
)
async def test_usage_verbs_fail_in_one_line(cli: Cli, client: Client, argv: list[str], message: str, code: int) -> None:
    """Exit status 2 for a command line that cannot be understood, 1 for what the server refuses."""
    await client.org("acme", [(M, "requests", "minute", 2)])
    assert message in await cli.fails(*argv, code=code)

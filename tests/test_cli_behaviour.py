"""What a newcomer meets at the CLI: exit codes, --json, help text, names in tables, the demo's
clean-up. Each test is one defect found by trying the CLI (issue 11, item 7)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ratelimitd.cli.decide import REFUSED_DECISION
from ratelimitd.cli.errors import NOT_UNDERSTOOD, REFUSED
from ratelimitd.cli.main import build_parser, main
from tests.conftest import Cli, Client, Clock
from tests.servers import ROOT
from tests.test_dev import fake_venv

M = "llama-3.1-8b-instant"


def every_parser(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                found += every_parser(child)
    return found


def test_every_flag_positional_and_command_has_help_text() -> None:
    missing = []
    for parser in every_parser(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                missing += [f"{parser.prog} {c.dest}" for c in action._choices_actions if not c.help]
            elif action.help != argparse.SUPPRESS and not action.help:
                missing.append(f"{parser.prog} {action.option_strings or action.dest}")
    assert missing == []


def test_address_help_names_the_environment_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["org", "list", "--help"])
    assert done.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--address ADDRESS server host:port (default: RATELIMITD_ADDRESS, else 127.0.0.1:50051)" in help_text
    assert "--token TOKEN credential (default: RATELIMITD_TOKEN)" in help_text


def test_serve_help_hides_test_settings_and_shows_defaults_as_they_are_written(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert "MANUAL_CLOCK" not in out and "tests only" not in out
    assert "(default: minute=60,day=86400)" in out and "(default: requests=day,tokens=minute)" in out
    assert "{'" not in out and "(default: None)" not in out and "(default: False)" not in out
    assert "RATELIMITD_TLS_CERT" in out and "(default: unset)" in out


def test_main_help_documents_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "Exit status: 0 done; 1 the server (or the CLI) refused the operation; 2 the command line" in out


async def test_a_positional_after_set_is_not_taken_for_a_limit(cli: Cli) -> None:
    org = str((await cli.json("org", "create", "acme"))["id"])
    await cli.ok("org", "limits", "--model", M, "--set", "rpm=10", "tpm=1000", org)
    await cli.ok("project", "create", org, "myapp-prod")
    await cli.ok("project", "limits", org, "--model", M, "--set", "rpm=5", "myapp-prod")
    await cli.ok("project", "limits", "--model", M, "--set", "tpm=500", org, "myapp-prod")
    limits = await cli.json("project", "limits", org, "myapp-prod")
    assert sorted((x["metric"], x["limit"]) for x in limits["custom"]) == [("requests", 5), ("tokens", 500)]  # type: ignore[attr-defined]
    await cli.ok("project", "limits", org, "--model", M, "--clear", "tpm", "myapp-prod")
    limits = await cli.json("project", "limits", org, "myapp-prod")
    assert [x["metric"] for x in limits["custom"]] == ["requests"]  # type: ignore[attr-defined]
    # a value that is neither a limit nor wanted as a positional is still a bad limit
    assert "'extra' is not NAME=NUMBER" in await cli.fails(
        "org", "limits", org, "--model", M, "--set", "rpm=1", "extra", code=2
    )
    assert "PROJECT is missing" in await cli.fails("project", "limits", org, "--model", M, "--set", "rpm=1", code=2)


async def test_setting_limits_needs_a_model_and_changes_nothing_without_one(cli: Cli) -> None:
    org = str((await cli.json("org", "create", "acme"))["id"])
    await cli.ok("org", "limits", org, "--model", "*", "--set", "rpm=10")
    await cli.ok("project", "create", org, "myapp-prod")
    err = await cli.fails("project", "limits", org, "myapp-prod", "--set", "rpm=5", code=2)
    assert "--set and --clear need --model" in err and "'*'" in err
    assert "need --model" in await cli.fails("org", "limits", org, "--clear", "rpm", code=2)
    assert (await cli.json("project", "limits", org, "myapp-prod"))["custom"] == []
    assert [x["limit"] for x in (await cli.json("org", "limits", org))["limits"]] == [10]  # type: ignore[attr-defined]


async def test_json_prints_numbers_as_numbers_and_every_field(cli: Cli) -> None:
    org = str((await cli.json("org", "create", "acme"))["id"])
    await cli.ok("org", "limits", org, "--model", M, "--set", "rpm=10")
    await cli.ok("project", "create", org, "myapp-prod")
    await cli.ok("key", "create", org, "myapp-prod", "ci")
    keys: list[dict[str, object]] = (await cli.json("key", "list", org, "myapp-prod"))["keys"]  # type: ignore[assignment]
    (key,) = keys
    # zero values are printed; a Timestamp is RFC 3339 text, absent when never set (never used)
    assert key["revoked"] is False and str(key["create_time"]).endswith("Z") and "last_use_time" not in key
    rows: list[dict[str, object]] = (await cli.json("project", "limits", org, "myapp-prod"))["effective"]  # type: ignore[assignment]
    (effective,) = rows
    assert effective["effective"] == 10 and effective["organization"] == 10
    assert await cli.json("audit", org, "--until", "2000-01-01") == {"events": [], "next_page_token": ""}


async def test_health_json_is_json(cli: Cli) -> None:
    assert await cli.json("health") == {"status": "SERVING"}


async def test_unauthenticated_says_where_the_credential_comes_from(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    err = await cli.fails("org", "list", "--token", "rlt_wrong")
    assert err.startswith("ratelimitd: UNAUTHENTICATED: ") and "--token or RATELIMITD_TOKEN" in err
    monkeypatch.delenv("RATELIMITD_TOKEN")
    err = await cli.fails("org", "list")
    assert "no credential was sent: set RATELIMITD_TOKEN or pass --token" in err


async def test_tables_show_project_names_beside_ids(cli: Cli, client: Client, clock: Clock) -> None:
    org = await client.org("acme", [(M, "requests", "minute", 10)])
    project, key = await client.project(org, "myapp-prod")
    await cli.ok("price", org, M, "--input", "1", "--output", "1")
    decision = await cli.json("check", "--api-key", key, "--model", M)
    await cli.ok("report", "--api-key", key, "--request-id", str(decision["request_id"]), "--input", "10",
                 "--output", "10")  # fmt: skip
    await cli.ok("spend-limit", org, "5", "--project", "myapp-prod")
    label = f"myapp-prod ({project})"
    assert label in await cli.ok("usage", org, "--by", "project", "--since", "1h")
    assert "myapp-prod" in await cli.ok("spend", org)
    assert label in await cli.ok("audit", org)
    assert label in await cli.ok("models", "show", org, "myapp-prod")


async def test_demo_against_a_server_cleans_up_what_it_made(cli: Cli) -> None:
    before = {o["id"] for o in (await cli.json("org", "list"))["organizations"]}  # type: ignore[attr-defined]
    out = await cli.ok("demo")
    assert "prod + staging admitted" in out and "cleaned up" in out
    made = [o["id"] for o in (await cli.json("org", "list"))["organizations"] if o["id"] not in before]  # type: ignore[attr-defined]
    assert len(made) == 5
    for org in made:
        assert (await cli.json("project", "list", org))["projects"] == []
        assert (await cli.json("org", "limits", org))["limits"] == []


def test_dev_serve_says_what_it_installs_on_the_first_run(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    fake_venv(venv)

    def dev_serve() -> str:
        env = {**os.environ, "RATELIMITD_DEV_VENV": str(venv)}
        return subprocess.run(
            [str(ROOT / "dev"), "serve"], env=env, capture_output=True, text=True, timeout=60, check=True
        ).stderr

    assert f"installing ratelimitd and its runtime dependencies into {venv}" in dev_serve()
    assert dev_serve() == ""  # installed already: nothing to say


def test_the_module_runs_as_the_entry_point_does() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ratelimitd", "org", "limits", "--set", "rpm=1"],
        capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
    )  # fmt: skip
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith("ratelimitd: ") and done.stderr.count("\n") == 1


def test_docs_cli_names_every_command_and_exit_status() -> None:
    doc = (ROOT / "docs" / "cli.md").read_text()
    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert [name for name in commands.choices if f"`{name}`" not in doc] == []
    for code in (REFUSED, NOT_UNDERSTOOD, REFUSED_DECISION):
        assert f"\n| {code} | " in doc

"""The admin CLI end to end against a live server: every verb, errors, and ``apply`` twice.

``ratelimitd.cli.main`` runs in a worker thread (it starts its own event loop)
against the in-process server; one test runs ``python -m ratelimitd`` as a
separate process, as users do.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import redis.asyncio

from ratelimitd.app import App
from ratelimitd.core import keys
from ratelimitd.engine.limits import MAX_LIMITS_PER_CALL
from ratelimitd.engine.projects import PROJECT_NAME_RULES
from ratelimitd.v1 import ratelimit_pb2 as pb
from tests.conftest import OPERATOR_TOKEN, Cli, Client

M = "llama-3.3-70b-versatile"


async def test_every_verb_end_to_end(cli: Cli, client: Client) -> None:
    org = str((await cli.json("org", "create", "Acme Inc"))["id"])
    assert org in await cli.ok("org", "list")
    assert "Acme Inc" in await cli.ok("org", "get", org)
    await cli.ok("org", "limits", org, "--model", M, "--set", "rpm=100", "tpm=100000")
    await cli.ok("org", "limits", org, "--model", "*", "--set", "rpm=10")

    created = await cli.ok("project", "create", org, "myapp-prod", "--description", "Production")
    assert "myapp-prod" in created and "Production" in created
    await cli.ok("project", "create", org, "myapp-dev")
    listing = await cli.ok("project", "list", org)
    assert listing.index("myapp-dev") < listing.index("myapp-prod")
    one_page = await cli.ok("project", "list", org, "--page-size", "1")
    assert "myapp-dev" in one_page and "myapp-prod" not in one_page and "--page-token" in one_page

    limits = await cli.ok("project", "limits", org, "myapp-prod", "--model", M, "--set", "rpm=80")
    assert "ORGANIZATION (CEILING)" in limits and "80" in limits
    err = await cli.fails("project", "limits", org, "myapp-prod", "--model", M, "--set", "rpm=120")
    assert "FAILED_PRECONDITION" in err and "120" in err and "100" in err

    secret = (await cli.ok("key", "create", org, "myapp-prod", "ci")).splitlines()[0]
    assert secret.startswith("rlk_")
    keys_out = await cli.ok("key", "list", org, "myapp-prod")
    assert "ci" in keys_out and "LAST USED" in keys_out and secret not in keys_out
    key_id = str((await cli.json("key", "list", org, "myapp-prod"))["keys"][0]["id"])  # type: ignore[index]
    assert (await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=secret, model=M))).allowed

    await cli.ok("models", "set", org, "--block", "gpt-4o")
    await cli.ok("models", "set", org, "--project", "myapp-dev", "--allow", M)
    shown = await cli.ok("models", "show", org, "myapp-dev")
    assert "block: gpt-4o" in shown and f"allow: {M}" in shown
    err = await cli.fails("models", "set", org, "--project", "myapp-dev", "--allow", "gpt-4o")
    assert "is on organization" in err

    token = (await cli.ok("member", "add", org, "alice@example.com", "--role", "owner")).splitlines()[0]
    assert token.startswith("rlm_")
    await cli.ok("member", "add", org, "bob@example.com", "--role", "reader")
    assert re.search(r"bob@example\.com +reader", await cli.ok("member", "list", org))
    assert "developer" in await cli.ok("member", "role", org, "bob@example.com", "developer")
    creds = await cli.json("credential", "list", "--org", org)
    assert len(creds["credentials"]) == 2  # type: ignore[arg-type]
    rotated = await cli.ok("credential", "create", "rotation", "--org", org, "--member", "bob@example.com")
    assert rotated.startswith("rlm_")
    await cli.ok("credential", "create", "deploy")
    assert "deploy" in await cli.ok("credential", "list")

    as_alice = ("--token", token)
    assert "alice@example.com: owner of " + org in await cli.ok("whoami", *as_alice)
    assert "platform operator" in await cli.ok("whoami")
    await cli.ok("project", "update", org, "myapp-dev", "--name", "myapp-development", *as_alice)
    assert "myapp-development" in await cli.ok("project", "get", org, "myapp-development", *as_alice)
    await cli.ok("key", "revoke", org, key_id, *as_alice)
    assert (
        await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=secret, model=M))
    ).reason == pb.REASON_INVALID_API_KEY
    await cli.ok("project", "delete", org, "myapp-development", *as_alice)
    await cli.ok("member", "remove", org, "bob@example.com", *as_alice)

    trail = await cli.ok("audit", org, *as_alice)
    for operation in (
        "RemoveMember",
        "DeleteProject",
        "RevokeApiKey",
        "UpdateProject",
        "SetProjectLimits",
        "CreateOrganization",
    ):
        assert operation in trail
    only_prod = await cli.json("audit", org, "--project", "myapp-prod", "--since", "1d")
    assert {e["project_id"] for e in only_prod["events"]} == {await _project_id(cli, org, "myapp-prod")}  # type: ignore[attr-defined]
    assert (await cli.json("audit", org, "--until", "2000-01-01")) == {"events": [], "next_page_token": ""}
    assert "CreateCredential" in await cli.ok("audit")  # the platform's trail


async def _project_id(cli: Cli, org: str, name: str) -> str:
    return str((await cli.json("project", "get", org, name))["id"])


async def test_errors_are_one_line_with_a_non_zero_exit(cli: Cli, app: App) -> None:
    assert "UNAUTHENTICATED" in await cli.fails("org", "list", "--token", "wrong")
    assert "NOT_FOUND: organization org_aaaaaaaaaaaa does not exist" in await cli.fails(
        "project", "list", "org_aaaaaaaaaaaa"
    )
    assert "INVALID_ARGUMENT" in await cli.fails("org", "create", " ")
    org = str((await cli.json("org", "create", "o"))["id"])
    assert "no member named 'ghost'" in await cli.fails("member", "remove", org, "ghost")
    assert "not NAME=NUMBER" in await cli.fails("org", "limits", org, "--set", "rpm", code=2)
    assert "is not ISO 8601" in await cli.fails("audit", org, "--since", "last tuesday", code=2)
    assert "UNAVAILABLE" in await cli.fails("org", "list", "--address", "127.0.0.1:1")


APPLY = """\
organization: {org}
models:
  block: [gpt-4o]
projects:
  myapp-prod:
    description: Production
    limits:
      {m}: {{rpm: 80, tpm: 60000}}
  myapp-staging:
    limits:
      {m}: {{rpm: 30}}
    models:
      allow: [{m}]
  myapp-dev: {{}}
members:
  alice@example.com: owner
  bob@example.com: developer
"""


async def test_apply_twice_changes_nothing_the_second_time(
    cli: Cli, tmp_path: Path, redis_client: redis.asyncio.Redis
) -> None:
    org = str((await cli.json("org", "create", "acme"))["id"])
    await cli.ok("org", "limits", org, "--model", M, "--set", "rpm=100", "tpm=100000")
    await cli.ok("project", "create", org, "legacy")
    spec = tmp_path / "acme.yaml"
    spec.write_text(APPLY.format(org=org, m=M))
    stream = keys.OrgKeys(org).audit

    dry = await cli.ok("apply", "-f", str(spec), "--dry-run")
    assert "dry run: 9 changes would be made" in dry
    assert "legacy" not in dry  # not pruned unless asked

    length = await redis_client.xlen(stream)
    first = await cli.ok("apply", "-f", str(spec))
    assert first.splitlines()[-1] == "9 changes"
    assert "+ project myapp-prod: Production" in first
    assert f"~ project myapp-staging: models unrestricted -> allow [{M}]" in first
    assert "+ member alice@example.com: owner" in first and "token (shown only now" in first
    assert await redis_client.xlen(stream) == length + 9  # each change is audited once

    length = await redis_client.xlen(stream)
    assert await cli.ok("apply", "-f", str(spec)) == "no changes\n"
    assert await redis_client.xlen(stream) == length
    assert (await cli.json("apply", "-f", str(spec))) == {"dry_run": False, "changes": []}

    limits = await cli.json("project", "limits", org, "myapp-staging")
    assert [(x["model"], x["metric"], int(x["limit"])) for x in limits["custom"]] == [(M, "requests", 30)]  # type: ignore[attr-defined]

    # a changed file changes exactly what differs; --prune removes what it omits
    spec.write_text(APPLY.format(org=org, m=M).replace("rpm: 30", "rpm: 25").replace(": developer", ": reader"))
    second = await cli.ok("apply", "-f", str(spec), "--prune")
    assert second.splitlines() == [
        f"~ project myapp-staging: limits {M} rpm=25 (was 30)",
        "- project legacy: deleted; its API keys stop working",
        "~ member bob@example.com: developer -> reader",
        "3 changes",
    ]
    assert await cli.ok("apply", "-f", str(spec), "--prune") == "no changes\n"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("projects: {{}}\n", "'organization' (the organization's id) is required"),
        ("organization: {org}\nproject: {{}}\n", "unknown key 'project'"),
        (
            "organization: {org}\nprojects:\n  a:\n    limits:\n      m: {{rpm: lots}}\n",
            "projects.a.limits.m.rpm: 'lots' is not a whole number",
        ),
        (
            "organization: {org}\nprojects:\n  a:\n    limits:\n      m: {{rps: 1}}\n",
            "projects.a.limits.m.rps: limit 'rps' is not one of rpm, rpd, tpm, tpd or METRIC/WINDOW",
        ),
        (
            "organization: {org}\nmembers:\n  bob: admin\n",
            "members.bob: role 'admin' is not one of owner, developer, reader",
        ),
        (
            "organization: {org}\nmodels:\n  allow: [a]\n  block: [b]\n",
            "models: give exactly one of 'allow' or 'block'",
        ),
        ("organization: {org}\nprojects:\n  2024: {{}}\n", "projects: key 2024 must be a string (quote it)"),
        ("organization: [unclosed\n", "not valid YAML"),
    ],
)
async def test_apply_refuses_a_bad_file_before_changing_anything(
    cli: Cli, tmp_path: Path, redis_client: redis.asyncio.Redis, content: str, message: str
) -> None:
    org = str((await cli.json("org", "create", "acme"))["id"])
    spec = tmp_path / "bad.yaml"
    spec.write_text(content.format(org=org))
    before = await redis_client.xlen(keys.OrgKeys(org).audit)
    assert message in await cli.fails("apply", "-f", str(spec), code=2)
    assert await redis_client.xlen(keys.OrgKeys(org).audit) == before


SERVER_REFUSES = """\
organization: {org}
projects:
  ok: {{}}
  too-high:
    limits:
      {m}: {{rpm: 500}}
  no-such-model:
    limits:
      other-model: {{rpm: 1}}
  wide:
    models:
      allow: [gpt-4o]
"""


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "real"])
async def test_apply_finds_every_change_the_server_would_refuse_and_changes_nothing(
    cli: Cli, tmp_path: Path, redis_client: redis.asyncio.Redis, dry_run: bool
) -> None:
    org = str((await cli.json("org", "create", "acme"))["id"])
    await cli.ok("org", "limits", org, "--model", M, "--set", "rpm=100")
    await cli.ok("models", "set", org, "--block", "gpt-4o")
    spec = tmp_path / "acme.yaml"
    spec.write_text(SERVER_REFUSES.format(org=org, m=M))
    before = await redis_client.xlen(keys.OrgKeys(org).audit)
    code, out, err = await cli("apply", "-f", str(spec), *(["--dry-run"] if dry_run else []))
    assert (code, out) == (1, ""), err
    assert err.splitlines() == [
        f"ratelimitd: projects.too-high.limits.{M}.rpm: 500 is above the organization's limit 100; "
        "a project limit may only be equal to or below it",
        f"ratelimitd: projects.no-such-model.limits.other-model.rpm: organization {org} has no limits for model "
        "'other-model' (nor a '*' default), so a project cannot have one",
        "ratelimitd: projects.wide.models: model 'gpt-4o' is on the organization's block list; "
        "a project's allow-list may only name models the organization allows",
        "ratelimitd: nothing was changed (3 problems)",
    ]
    assert await redis_client.xlen(keys.OrgKeys(org).audit) == before
    assert "ok" not in await cli.ok("project", "list", org)


async def test_apply_reports_every_bad_value_in_the_file_before_any_call(cli: Cli, tmp_path: Path) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text(
        "organization: org_aaaaaaaaaaaa\n"  # no such organization: the file is refused before it is asked
        "models:\n  allow: []\n"
        "projects:\n"
        "  Bad_Name: {}\n"
        "  fine:\n    limits:\n      m: {rpm: -1, tpm: 10000000000000}\n"
    )
    for dry_run in ([], ["--dry-run"]):
        code, out, err = await cli("apply", "-f", str(spec), *dry_run)
        assert (code, out) == (2, "")
        assert err.splitlines() == [
            "ratelimitd: models.allow: an empty allow list would refuse every model; name at least one",
            "ratelimitd: projects.Bad_Name: project name 'Bad_Name' is not valid: " + PROJECT_NAME_RULES,
            "ratelimitd: projects.fine.limits.m.rpm: limit -1 is negative",
            "ratelimitd: projects.fine.limits.m.tpm: limit 10000000000000 is above the maximum 1000000000000",
            "ratelimitd: nothing was changed (4 problems)",
        ]


async def test_apply_says_when_a_project_changes_more_limits_than_one_call_takes(
    cli: Cli, tmp_path: Path, redis_client: redis.asyncio.Redis
) -> None:
    org = str((await cli.json("org", "create", "acme"))["id"])
    await cli.ok("org", "limits", org, "--model", "*", "--set", "rpm=100")
    limits = "".join(f"      m{i}: {{rpm: 1}}\n" for i in range(MAX_LIMITS_PER_CALL + 1))
    spec = tmp_path / "many.yaml"
    spec.write_text(f"organization: {org}\nprojects:\n  many:\n    limits:\n{limits}")
    before = await redis_client.xlen(keys.OrgKeys(org).audit)
    code, out, err = await cli("apply", "-f", str(spec))
    assert (code, out) == (1, ""), err
    assert err.splitlines() == [
        f"ratelimitd: projects.many.limits: {MAX_LIMITS_PER_CALL + 1} limits change at once; the server takes at "
        f"most {MAX_LIMITS_PER_CALL} in one call, so apply the file in steps",
        "ratelimitd: nothing was changed (1 problem)",
    ]
    assert await redis_client.xlen(keys.OrgKeys(org).audit) == before


async def test_models_set_refuses_an_empty_allow_list(cli: Cli) -> None:
    org = str((await cli.json("org", "create", "acme"))["id"])
    err = await cli.fails("models", "set", org, "--allow", code=2)
    assert "--allow needs at least one model" in err
    assert "unrestricted" in await cli.ok("models", "show", org)


@pytest.mark.parametrize(
    "token", ["rlt_abc\r", "rlt_abc\n", "rlt_abc def", "rlt_abcé"], ids=["cr", "lf", "space", "non-ascii"]
)
async def test_a_token_no_header_can_carry_is_a_one_line_error(cli: Cli, token: str) -> None:
    err = await cli.fails("whoami", "--token", token, code=2)
    assert "the token (--token or RATELIMITD_TOKEN) contains" in err and token not in err


def run_into_a_closed_pipe(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """``ratelimitd … | head -1`` at its worst: the reader has gone before the first write."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [sys.executable, "-m", "ratelimitd", *argv],
            stdout=write_end,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)


async def test_output_into_a_pipe_whose_reader_has_gone_ends_quietly(app: App) -> None:
    env = {"RATELIMITD_ADDRESS": f"127.0.0.1:{app.port}", "RATELIMITD_TOKEN": OPERATOR_TOKEN}
    for argv in (["org", "list"], ["whoami", "--json"]):
        done = await asyncio.to_thread(run_into_a_closed_pipe, *argv, env=env)
        assert (done.returncode, done.stderr) == (141, b""), (argv, done.stderr.decode())  # as if killed by SIGPIPE
    helped = await asyncio.to_thread(run_into_a_closed_pipe, "--help")
    assert helped.stderr == b""


async def test_the_cli_as_a_separate_process_reads_its_address_and_token_from_the_environment(app: App) -> None:
    env = {**os.environ, "RATELIMITD_ADDRESS": f"127.0.0.1:{app.port}", "RATELIMITD_TOKEN": OPERATOR_TOKEN}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ratelimitd", "whoami", "--json", env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err
    assert json.loads(out)["kind"] == "operator"
    env["RATELIMITD_TOKEN"] = "rlt_wrong"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ratelimitd", "whoami", env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode == 1 and out == b""
    assert err.decode() == (
        "ratelimitd: UNAUTHENTICATED: the credential is unknown or revoked "
        "(the CLI sent the credential from --token or RATELIMITD_TOKEN)\n"
    )


async def test_the_example_in_docs_apply_md_works_as_shown(cli: Cli, tmp_path: Path) -> None:
    doc = (Path(__file__).parent.parent / "docs" / "apply.md").read_text()
    example = doc.split("```yaml\n", 1)[1].split("```", 1)[0]
    shown = doc.split("Output of the first run", 1)[1].split("```\n", 1)[1].split("```", 1)[0]
    org = str((await cli.json("org", "create", "acme"))["id"])
    await cli.ok("org", "limits", org, "--model", M, "--set", "rpm=100", "tpm=100000")
    spec = tmp_path / "acme.yaml"
    spec.write_text(example.replace("org_xxxxxxxxxxxx", org))
    out = (await cli.ok("apply", "-f", str(spec))).replace(org, "org_xxxxxxxxxxxx")
    assert re.sub(r"rlm_\w+", "rlm_...", out) == shown
    assert await cli.ok("apply", "-f", str(spec)) == "no changes\n"

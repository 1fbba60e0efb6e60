"""The console in a real browser: headless Chromium (Debian's package) driven by Playwright,
against ``ratelimitd serve`` as users run it. Screenshots of every page go to
$RATELIMITD_SCREENSHOTS (or the test's temporary directory)."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
import redis

from ratelimitd.v1 import admin_pb2 as apb
from ratelimitd.v1 import admin_pb2_grpc, rate_limit_service_pb2_grpc, usage_pb2_grpc
from ratelimitd.v1 import ratelimit_pb2 as pb
from ratelimitd.v1 import usage_pb2 as upb
from tests.conftest import AUTH, OPERATOR_TOKEN
from tests.servers import RatelimitdProcess, ValkeyProcess, free_port

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page, ViewportSize

CHROMIUM = Path(os.environ.get("RATELIMITD_CHROMIUM", "/usr/lib/chromium/chromium"))
playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")
if not CHROMIUM.exists():
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium; .ci/run does)", allow_module_level=True)
sync_playwright = playwright_api.sync_playwright
expect = playwright_api.expect
expect.set_options(timeout=20_000)  # a hang guard on a shared machine, not a timing assertion

M = "llama-3.1-8b-instant"
ORG_REQUESTS_PER_MINUTE = 100
DESKTOP: ViewportSize = {"width": 1280, "height": 800}
PHONE: ViewportSize = {"width": 390, "height": 844}
ZONE = "America/New_York"
PAGES = ("projects", "limits", "keys", "live", "usage", "metrics", "spend", "logs", "members", "audit")
WRITE_CONTROL = re.compile(r"^(Create|Save|Delete|Rename|Revoke|Add member|Remove|Inherit)")


@dataclass
class Live:
    base: str
    grpc_address: str
    org_id: str
    owner_token: str
    reader_token: str
    shots: Path


def _seed(address: str) -> tuple[str, str, str]:
    """An organization with limits, one project, an Owner and a Reader (plain gRPC calls: the
    browser's loop runs in this thread, so no asyncio here)."""
    with grpc.insecure_channel(address) as channel:
        orgs = admin_pb2_grpc.OrganizationServiceStub(channel)
        org = orgs.CreateOrganization(apb.CreateOrganizationRequest(name="acme"), metadata=AUTH).id
        limits = [(M, "requests", "minute", ORG_REQUESTS_PER_MINUTE), (M, "tokens", "minute", 100_000),
                  ("*", "requests", "day", 10_000)]  # fmt: skip
        orgs.SetOrganizationLimits(
            apb.SetOrganizationLimitsRequest(
                organization_id=org, set=[apb.Limit(model=m, metric=me, window=w, limit=v) for m, me, w, v in limits]
            ),
            metadata=AUTH,
        )
        # prices high enough that a few test requests cost whole cents
        price = upb.Price(
            organization_id=org,
            model=M,
            input_usd_micros_per_million=10_000_000_000,
            output_usd_micros_per_million=20_000_000_000,
        )
        usage_pb2_grpc.UsageServiceStub(channel).SetPrice(upb.SetPriceRequest(price=price), metadata=AUTH)
        projects = admin_pb2_grpc.ProjectServiceStub(channel)
        projects.CreateProject(apb.CreateProjectRequest(organization_id=org, name="seeded"), metadata=AUTH)
        members = admin_pb2_grpc.MemberServiceStub(channel)
        tokens = [
            members.AddMember(apb.AddMemberRequest(organization_id=org, name=name, role=role), metadata=AUTH).token
            for name, role in (("olivia", apb.ROLE_OWNER), ("rita", apb.ROLE_READER))
        ]
        return org, tokens[0], tokens[1]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("console")
    shots = Path(os.environ.get("RATELIMITD_SCREENSHOTS") or tmp / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    valkey = ValkeyProcess(tmp)
    valkey.start()
    # the manual clock near now, so the browser's "last hour" covers the traffic the test sends
    redis.Redis(port=valkey.port).set("rl:clock", int(time.time() // 60 * 60 * 1_000_000))
    http_port = free_port()
    server = RatelimitdProcess(
        "--redis-url", valkey.url, "--manual-clock", "--http-listen", f"127.0.0.1:{http_port}",
        env={"RATELIMITD_OPERATOR_TOKEN": OPERATOR_TOKEN}, log=tmp / "s.log",
    )  # fmt: skip
    try:
        server.start()
        assert f"console on http://127.0.0.1:{http_port}/console/" in server.output()
        org, owner, reader = _seed(server.address)
        yield Live(f"http://127.0.0.1:{http_port}/console/", server.address, org, owner, reader, shots)
    finally:
        server.stop()
        valkey.stop()


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(chromium: Browser) -> Iterator[Page]:
    context = chromium.new_context(viewport=DESKTOP, timezone_id=ZONE)
    context.set_default_timeout(20_000)
    yield context.new_page()
    context.close()


def sign_in(page: Page, live: Live, token: str) -> None:
    page.goto(live.base)
    page.get_by_label("Credential").fill(token)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("navigation", name="Console pages")).to_be_visible()


def visit(page: Page, live: Live, name: str, shot: str | None = None) -> None:
    target = f"{live.base}#/{name}"
    if page.url == target:
        page.reload()
    else:
        page.goto(target)
    expect(page.locator("main .page")).not_to_contain_text("Loading")
    expect(page.locator("main h1")).to_be_visible()
    if shot:
        page.screenshot(path=str(live.shots / f"{shot}.png"), full_page=True)


def send_traffic(live: Live, secret: str, n: int) -> None:
    with grpc.insecure_channel(live.grpc_address) as channel:
        decisions = rate_limit_service_pb2_grpc.RateLimitServiceStub(channel)
        for i in range(n):
            reply = decisions.CheckAndConsume(pb.CheckRequest(api_key=secret, model=M, tokens=100, request_id=f"r{i}"))
            assert reply.allowed
            decisions.ReportUsage(
                pb.ReportUsageRequest(
                    api_key=secret, request_id=f"r{i}", model=M, input_tokens=40, output_tokens=20 + i,
                    status_code=200, latency_ms=100 + 50 * i,
                )
            )  # fmt: skip


def project_limit(live: Live, project_name: str) -> int | None:
    with grpc.insecure_channel(live.grpc_address) as channel:
        projects = admin_pb2_grpc.ProjectServiceStub(channel)
        listed = projects.ListProjects(apb.ListProjectsRequest(organization_id=live.org_id), metadata=AUTH)
        project = next(p for p in listed.projects if p.name == project_name)
        limits = projects.GetProjectLimits(
            apb.GetProjectLimitsRequest(organization_id=live.org_id, project_id=project.id), metadata=AUTH
        )
        custom = [c.limit for c in limits.custom if (c.model, c.metric, c.window) == (M, "requests", "minute")]
        return custom[0] if custom else None


def test_owner_creates_a_project_sets_limits_makes_a_key_and_sees_its_traffic(page: Page, live: Live) -> None:
    p = page
    sign_in(p, live, live.owner_token)
    visit(p, live, "projects")
    p.get_by_label("New project name").fill("console-demo")
    p.get_by_role("button", name="Create project").click()
    expect(p.get_by_role("cell", name=re.compile("^console-demo proj_"))).to_be_visible()
    expect(p.get_by_label("Project", exact=True).locator("option:checked")).to_have_text("console-demo")

    # a limit above the organization's: the server's error, naming both numbers, in the row
    visit(p, live, "limits")
    limit = p.get_by_label(f"Project limit for {M} requests per minute")
    limit.fill("1000")
    row = p.locator("form", has=limit)
    row.get_by_role("button", name="Save").click()
    alert = row.get_by_role("alert")
    expect(alert).to_contain_text("1000")
    expect(alert).to_contain_text(str(ORG_REQUESTS_PER_MINUTE))
    p.screenshot(path=str(live.shots / "limits-error.png"), full_page=True)
    assert project_limit(live, "console-demo") is None
    limit.fill("50")
    row.get_by_role("button", name="Save").click()
    expect(p.get_by_label(f"Project limit for {M} requests per minute")).to_have_value("50")
    expect(p.get_by_role("alert")).to_have_count(0)
    assert project_limit(live, "console-demo") == 50
    visit(p, live, "limits", "limits")

    # a key: the secret once, with a copy button and a warning; then only its prefix
    visit(p, live, "keys")
    p.get_by_label("New key name").fill("demo-key")
    p.get_by_role("button", name="Create key").click()
    secret_box = p.get_by_label("The new key's secret")
    expect(secret_box).to_be_visible()
    secret = secret_box.input_value()
    assert len(secret) > 20
    expect(p.get_by_text("only time it is shown")).to_be_visible()
    expect(p.get_by_role("button", name="Copy")).to_be_visible()
    p.screenshot(path=str(live.shots / "keys-secret-once.png"), full_page=True)
    visit(p, live, "keys", "keys")
    expect(p.get_by_label("The new key's secret")).to_have_count(0)
    assert secret not in p.content()
    expect(p.get_by_role("cell", name="demo-key", exact=True)).to_be_visible()

    # traffic shows in the usage chart, the log and the metrics
    send_traffic(live, secret, 3)
    with grpc.insecure_channel(live.grpc_address) as channel:  # more tokens than the organization's minute
        refused = rate_limit_service_pb2_grpc.RateLimitServiceStub(channel).CheckAndConsume(
            pb.CheckRequest(api_key=secret, model=M, tokens=200_000)
        )
        assert not refused.allowed
    visit(p, live, "usage", "usage")
    chart = p.locator("#requests-chart")
    expect(chart).to_have_attribute("aria-label", re.compile(r"Requests: 3 admitted, 1 refused"))
    expect(p.locator("#tokens-chart")).to_have_attribute("aria-label", re.compile(r"120 input"))
    expect(p.get_by_text(f"times in {ZONE}")).to_be_visible()
    expect(p.locator("#refusals-chart")).to_have_attribute("aria-label", re.compile(r"Refusals by reason: 1 \w+"))
    # the project's bucket now: its own 50/min less the 3 sent (the manual clock stands still)
    visit(p, live, "live", "live")
    bucket = p.get_by_role("row", name=re.compile(f"^{M} requests per minute"))
    expect(bucket).to_contain_text("47 / 50")
    expect(bucket.get_by_role("cell").last).to_have_text("47")
    visit(p, live, "logs", "logs")
    expect(p.locator("tbody tr")).to_have_count(4)
    p.get_by_label("Outcome").select_option(label="Refused")
    p.get_by_role("button", name="Filter").click()
    expect(p.locator("tbody tr")).to_have_count(1)
    p.get_by_label("Outcome").select_option(label="Admitted")
    p.get_by_label("API key").select_option(index=1)  # demo-key, the project's one key
    p.get_by_role("button", name="Filter").click()
    expect(p.locator("tbody tr")).to_have_count(3)
    visit(p, live, "metrics", "metrics")
    expect(p.get_by_role("row", name=re.compile(M))).to_contain_text("150 ms")
    latency = p.locator(f"[id='latency-{M}']")
    expect(latency).to_have_attribute("aria-label", re.compile("p95 up to 200 ms"))
    visit(p, live, "spend")
    spend_row = p.get_by_role("table", name="Spend per project", exact=True).get_by_role(
        "row", name=re.compile("^console-demo")
    )
    expect(spend_row).to_contain_text("$2.46")
    for name in ("projects", "spend", "members", "audit"):
        visit(p, live, name, name)


def test_an_owner_renames_a_project_and_deletes_it_only_once_confirmed(page: Page, live: Live) -> None:
    p = page
    sign_in(p, live, live.owner_token)
    visit(p, live, "projects")
    p.get_by_label("New project name").fill("scratch")
    p.get_by_role("button", name="Create project").click()
    expect(p.get_by_role("cell", name=re.compile("^scratch proj_"))).to_be_visible()
    p.once("dialog", lambda dialog: dialog.accept("scratch-2"))  # the browser's own prompt for the name
    p.get_by_role("button", name="Rename scratch", exact=True).click()
    expect(p.get_by_role("cell", name=re.compile("^scratch-2 proj_"))).to_be_visible()
    p.get_by_role("button", name="Delete scratch-2").click()
    confirm = p.get_by_role("dialog")
    expect(confirm).to_contain_text("cannot be undone")
    p.screenshot(path=str(live.shots / "projects-delete-confirm.png"))
    confirm.get_by_role("button", name="Cancel").click()
    expect(p.get_by_role("cell", name=re.compile("^scratch-2 proj_"))).to_be_visible()
    p.get_by_role("button", name="Delete scratch-2").click()
    p.get_by_role("dialog").get_by_role("button", name="Delete scratch-2").click()
    expect(p.get_by_role("cell", name=re.compile("^scratch-2 proj_"))).to_have_count(0)
    with grpc.insecure_channel(live.grpc_address) as channel:
        listed = admin_pb2_grpc.ProjectServiceStub(channel).ListProjects(
            apb.ListProjectsRequest(organization_id=live.org_id), metadata=AUTH
        )
    assert "scratch-2" not in [q.name for q in listed.projects]


def test_an_owner_sets_a_spend_limit_and_a_role_through_the_new_api_shapes(page: Page, live: Live) -> None:
    """Money goes out as micro-dollars, and an update as the resource with its field mask."""
    with grpc.insecure_channel(live.grpc_address) as channel:
        admin_pb2_grpc.MemberServiceStub(channel).AddMember(
            apb.AddMemberRequest(organization_id=live.org_id, name="mona", role=apb.ROLE_READER), metadata=AUTH
        )
    p = page
    sign_in(p, live, live.owner_token)
    visit(p, live, "spend")
    limit = p.get_by_label("Spend limit in USD for seeded")
    limit.fill("12.5")
    with p.expect_response(lambda r: r.url.endswith("/SetSpendLimit")) as saved:
        limit.press("Enter")
    assert saved.value.ok
    expect(p.get_by_label("Spend limit in USD for seeded")).to_have_value("12.5")  # read back from micros
    visit(p, live, "members")
    with p.expect_response(lambda r: r.url.endswith("/UpdateMember")) as updated:
        p.get_by_label("Role of mona").select_option(label="developer")
    assert updated.value.ok
    expect(p.get_by_role("alert")).to_have_count(0)
    with grpc.insecure_channel(live.grpc_address) as channel:
        spend = usage_pb2_grpc.UsageServiceStub(channel).GetSpend(
            upb.GetSpendRequest(organization_id=live.org_id), metadata=AUTH
        )
        seeded = [line for line in spend.projects if line.limit_usd_micros == 12_500_000]
        assert len(seeded) == 1
        members = admin_pb2_grpc.MemberServiceStub(channel).ListMembers(
            apb.ListMembersRequest(organization_id=live.org_id), metadata=AUTH
        )
    assert {m.name: m.role for m in members.members}["mona"] == apb.ROLE_DEVELOPER


def test_a_reader_finds_no_write_control_on_any_page(page: Page, live: Live) -> None:
    p = page
    # by keyboard alone: the credential field has the focus, Enter submits
    p.goto(live.base)
    expect(p.get_by_label("Credential")).to_be_focused()
    p.keyboard.type(live.reader_token)
    p.keyboard.press("Enter")
    expect(p.locator("#role")).to_have_text("reader")
    for name in PAGES:
        visit(p, live, name, f"reader-{name}")
        expect(p.get_by_role("button", name=WRITE_CONTROL)).to_have_count(0)
        expect(p.locator("input.limit-input")).to_have_count(0)
    visit(p, live, "projects")
    expect(p.get_by_role("cell", name=re.compile("^seeded proj_"))).to_be_visible()


def test_the_operator_signs_in_and_a_wrong_credential_is_told_so(page: Page, live: Live) -> None:
    p = page
    p.goto(live.base)
    p.get_by_label("Credential").fill("rlt_wrong")
    p.get_by_role("button", name="Sign in").click()
    expect(p.get_by_role("alert")).to_contain_text("unknown or revoked")
    p.screenshot(path=str(live.shots / "sign-in-error.png"))
    sign_in(p, live, OPERATOR_TOKEN)
    expect(p.locator("#role")).to_have_text("operator")
    expect(p.get_by_label("Organization", exact=True).locator("option:checked")).to_have_text("acme")
    p.get_by_role("button", name="Sign out").click()
    expect(p.get_by_label("Credential")).to_be_visible()
    p.goto(live.base + "#/projects")
    expect(p.get_by_label("Credential")).to_be_visible()


def test_every_page_reads_on_a_phone(chromium: Browser, live: Live) -> None:
    context = chromium.new_context(viewport=PHONE, timezone_id=ZONE, is_mobile=True)
    try:
        p = context.new_page()
        sign_in(p, live, live.owner_token)
        for name in PAGES:
            visit(p, live, name, f"phone-{name}")
            # nothing wider than the screen but tables, which scroll inside their own box
            overflow = p.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
            assert overflow <= 0, f"{name} is {overflow}px wider than a phone"
    finally:
        context.close()

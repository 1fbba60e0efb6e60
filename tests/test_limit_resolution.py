"""Property: the effective limits the control plane reports are the limits decisions apply.

Over random configurations (seeded, so a failure reproduces with its case number):
organization limits for some of the models "a", "b" and "*", project limits set one
at a time (those above the organization's limit, or for a model it has no limit for,
are refused and change nothing), and sometimes an organization limit lowered
afterwards, below the project's. For every model (including "c", which only "*" can
cover), GetProjectLimits' effective limits must name exactly the buckets the next
decision evaluates, scope by scope, with the same limits, and a model without any
organization limit must be refused as not available."""

from __future__ import annotations

import random

import grpc

from ratelimitd.v1 import admin_pb2 as apb
from ratelimitd.v1 import ratelimit_pb2 as pb
from tests.conftest import AUTH, Client

SEED = 20261202
CASES = 24
MODELS = ("a", "b", "*")
ASKED = ("a", "b", "c")
DIMS = (("requests", "minute"), ("requests", "day"), ("tokens", "minute"), ("tokens", "day"))

Limit = tuple[str, str, str, int]


def random_limits(rng: random.Random, top: int) -> list[Limit]:
    return [(m, metric, window, rng.randint(1, top)) for m in MODELS for metric, window in DIMS if rng.random() < 0.3]


async def configure(client: Client, rng: random.Random, case: int) -> tuple[str, str, str]:
    """A random organization and project; returns (organization id, project id, API key)."""
    org_limits = random_limits(rng, 1000)
    org = await client.org(f"o{case}", org_limits) if org_limits else await client.org(f"o{case}", [])
    project, key = await client.project(org, "p")
    for limit in random_limits(rng, 1200):
        request = apb.SetProjectLimitsRequest(
            organization_id=org,
            project_id=project,
            set=[apb.Limit(model=limit[0], metric=limit[1], window=limit[2], limit=limit[3])],
        )
        try:
            await client.projects.SetProjectLimits(request, metadata=AUTH)
        except grpc.aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, e.details()
    for model, metric, window, value in org_limits:
        if rng.random() < 0.2:  # lowered after the project's limits were checked against it
            lowered = apb.Limit(model=model, metric=metric, window=window, limit=max(1, value // 3))
            await client.orgs.SetOrganizationLimits(
                apb.SetOrganizationLimitsRequest(organization_id=org, set=[lowered]), metadata=AUTH
            )
    return org, project, key


async def test_reported_effective_limits_are_the_limits_decisions_apply(client: Client) -> None:
    rng = random.Random(SEED)
    seen_refused, seen_both_scopes = 0, 0
    for case in range(CASES):
        org, project, key = await configure(client, rng, case)
        reported = await client.projects.GetProjectLimits(
            apb.GetProjectLimitsRequest(organization_id=org, project_id=project, models=list(ASKED)), metadata=AUTH
        )
        for model in ASKED:
            mine = [e for e in reported.effective if e.model == model]
            expected = {
                (pb.SCOPE_ORGANIZATION, e.metric, e.window): e.organization for e in mine if e.HasField("organization")
            }
            expected |= {(pb.SCOPE_PROJECT, e.metric, e.window): e.custom for e in mine if e.HasField("custom")}
            reply = await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=key, model=model, tokens=1))
            where = f"case {case}, model {model}: reported {expected}, decided {reply}"
            if not any(scope == pb.SCOPE_ORGANIZATION for scope, _, _ in expected):
                assert reply.reason == pb.REASON_MODEL_NOT_AVAILABLE, where
                seen_refused += 1
                continue
            assert reply.allowed, where
            assert {(b.scope, b.metric, b.window): b.limit for b in reply.buckets} == expected, where
            seen_both_scopes += any(scope == pb.SCOPE_PROJECT for scope, _, _ in expected)
    # the random cases reach both kinds of answer
    assert seen_refused and seen_both_scopes

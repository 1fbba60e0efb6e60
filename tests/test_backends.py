"""The backend table itself (tests/conftest.py): on the cluster, the organizations a test
creates are spread over every primary by construction, and each one decides on its own."""

from __future__ import annotations

from redis.crc import key_slot

from ratelimitd.core import keys
from ratelimitd.v1 import ratelimit_pb2 as pb
from tests.conftest import Client, Storage

M = "llama-3.1-8b-instant"


async def test_three_organizations_decide_apart_and_on_the_cluster_on_three_primaries(
    storage: Storage, client: Client
) -> None:
    orgs = [await client.org(f"o{i}", [(M, "requests", "minute", 2)]) for i in range(3)]
    for org in orgs:
        _, key = await client.project(org, "a")
        replies = [await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=key, model=M)) for _ in range(3)]
        assert [r.allowed for r in replies] == [True, True, False]
    if storage.cluster is not None:
        slots = [key_slot(keys.OrgKeys(org).record.encode()) for org in orgs]
        assert sorted(storage.cluster.primary_of_slot(slot) for slot in slots) == [0, 1, 2]

"""Every key one decision can touch maps to one Redis Cluster slot."""

from __future__ import annotations

from redis.crc import key_slot

from ratelimitd.core.keys import OrgKeys
from ratelimitd.engine import ids


def test_every_key_of_an_organization_shares_one_slot() -> None:
    org = ids.new_id("org")
    k = OrgKeys(org)
    project = ids.new_id("proj")
    names = [
        k.record, k.org_limits, k.project_limits(project), k.project(project), k.project_names,
        k.api_key("key_x"), k.project_api_keys(project), k.request("req-1"),
        k.state,
        k.deleted_project(project), k.members, k.member_names, k.member_credentials, k.model_permissions, k.audit,
        k.spend_limits, k.spend("202612"), k.spend_alerts("202612"),
    ]  # fmt: skip
    assert {key_slot(n.encode()) for n in names} == {key_slot(k.org_limits.encode())}


def test_operator_credentials_and_their_audit_trail_share_one_slot() -> None:
    from ratelimitd.core import keys

    assert key_slot(keys.CREDENTIALS.encode()) == key_slot(keys.PLATFORM_AUDIT.encode())


def test_decide_lua_builds_keys_the_way_the_keys_module_does() -> None:
    from ratelimitd.engine.scripts import read_script

    lua = read_script("decide")
    # The script derives keys and state fields from this prefix; if either side changes, both must.
    for fragment in ('"lim:o"', '"lim:p:"', '"o:"', '"p:"', '"c:"', '"mp"', '"spendlim"', '"price"', "-2)"):
        assert fragment in lua
    k = OrgKeys("org_x")
    assert (k.state, k.org_limits, k.model_permissions) == ("rl:{org_x}:s", "rl:{org_x}:lim:o", "rl:{org_x}:mp")


def test_api_key_carries_its_ids() -> None:
    org = ids.new_id("org")
    key_id, secret = ids.new_api_key(org)
    parsed = ids.parse_api_key(secret)
    assert parsed is not None and parsed.org_id == org and parsed.key_id == key_id
    assert len(secret) == ids.API_KEY_LENGTH
    assert ids.parse_api_key(secret[:-1]) is None and ids.parse_api_key(secret + "a") is None

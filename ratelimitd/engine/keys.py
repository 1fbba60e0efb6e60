"""Every Redis key ratelimitd writes, built in one place.

All keys of one organization start with ``rl:{<org_id>}:``. The braces are a
Redis Cluster hash tag: only the text inside them picks the slot, so a decision
script can read and write every bucket, limit and key record of one
organization on one node. Keys that belong to no organization (the operator
credentials, the organization index) live outside any tag and are never
touched by a decision.

Layout below one organization prefix::

    lim:o                  hash   organization limits, field "<model>|<metric>|<window>"
    lim:p:<project_id>     hash   project custom limits, same fields
    p:<project_id>         hash   project record (n name, d description, c created ms)
    pn                     hash   project name -> project id (uniqueness)
    k:<key_id>             hash   API key (h sha256, p project, n name, x prefix,
                                  c created ms, u last used ms, r "1" once revoked)
    pk:<project_id>        set    key ids of a project
    r:<request_id>         string request record (reservation and replay), expires; written
                                  only when something will read it (lib.lua, rl_record_*)
    u:m:<start_s>          hash   usage counters of one minute, field "<id>|<counter>" (lib.lua);
    u:h:<start_s>, u:d:<start_s>  the same per hour and day, added by rollup.lua; each expires
                                  its retention after its end
    u:r                    string the first minute not rolled up yet (rollup.lua)
    ui                     hash   usage ids: "<project>|<model>|<key>" -> id, "#<id>" -> the same
                                  triple, "n" the last id; one id per (project, model, key) ever used
    s                      hash   decision state: every bucket of the organization and its
                                  projects ("o:<model>", "p:<project>:<model>"), the resolved
                                  configuration of each (project, model) ("c:<project>:<model>"),
                                  and the configuration version "v" (lib.lua); expires once
                                  every bucket would have drained

Added by the control plane (docs/control-plane.md)::

    pd:<project_id>        hash   a deleted project's record (plus x deleted ms), kept so
                                  usage views can still name it; decisions never read it
    m                      hash   member id -> JSON {"n" name, "r" role, "c" created ms}
    mn                     hash   member name -> member id (uniqueness)
    c                      hash   member credentials, two fields each:
                                    "k:<cred_id>"  -> JSON {"m" member id, "n" name,
                                                      "c" created ms, "h" sha256 of the token}
                                    "h:<sha256>"   -> "<cred_id> <member_id>" (authentication)
    mp                     hash   model permissions, read by decide.lua in one HMGET per item:
                                    "o" / "p:<project_id>"            -> "allow" | "block"
                                    "o|<model>" / "p:<project_id>|<model>" -> "1" per listed model
    audit                  stream audit events of the organization, capped at about
                                  audit_max_events (XADD MAXLEN ~)
"""

from __future__ import annotations

from typing import Any

ROOT = "rl:"
ORGANIZATIONS = "rl:orgs"  # hash org id -> name
CREDENTIALS = "rl:creds"  # hash sha256(token) -> credential JSON
MANUAL_CLOCK = "rl:clock"  # tests and the private demo: a stopped clock, in microseconds
# Written by the health probe (a write, because a store that answers PING may still
# refuse every write: a replica, a full memory); it expires by itself.
HEALTH_PROBE = "rl:health"
# Audit events of platform-level changes (operator credentials). Its hash tag is
# the whole name of CREDENTIALS, so a credential change and its event share one
# slot and can be written in one transaction.
PLATFORM_AUDIT = "rl:{rl:creds}:audit"


def console_session(session_digest: str) -> str:
    """A console session (sessions.py), by the sha256 of its id: a copy of the database
    holds nothing a browser could present. Outside every organization, like CREDENTIALS."""
    return "rl:session:" + session_digest


def org_prefix(org_id: str) -> str:
    return f"rl:{{{org_id}}}:"


class OrgKeys:
    """The keys of one organization; every one shares the organization's slot."""

    __slots__ = ("prefix",)

    def __init__(self, org_id: str) -> None:
        self.prefix = org_prefix(org_id)

    @property
    def record(self) -> str:
        return self.prefix + "org"

    @property
    def org_limits(self) -> str:
        return self.prefix + "lim:o"

    def project_limits(self, project_id: str) -> str:
        return self.prefix + "lim:p:" + project_id

    def project(self, project_id: str) -> str:
        return self.prefix + "p:" + project_id

    @property
    def project_names(self) -> str:
        return self.prefix + "pn"

    def api_key(self, key_id: str) -> str:
        return self.prefix + "k:" + key_id

    def project_api_keys(self, project_id: str) -> str:
        return self.prefix + "pk:" + project_id

    def deleted_project(self, project_id: str) -> str:
        return self.prefix + "pd:" + project_id

    @property
    def members(self) -> str:
        return self.prefix + "m"

    @property
    def member_names(self) -> str:
        return self.prefix + "mn"

    @property
    def member_credentials(self) -> str:
        return self.prefix + "c"

    @property
    def model_permissions(self) -> str:
        return self.prefix + "mp"

    @property
    def audit(self) -> str:
        return self.prefix + "audit"

    def request(self, request_id: str) -> str:
        return self.prefix + "r:" + request_id

    @property
    def state(self) -> str:
        return self.prefix + "s"

    @property
    def usage_ids(self) -> str:
        return self.prefix + "ui"

    @property
    def usage_rollup_marker(self) -> str:
        return self.prefix + "u:r"

    def usage(self, resolution: str, start_s: int) -> str:
        return f"{self.prefix}u:{resolution}:{start_s}"


# Fields of the decision state hash (OrgKeys.state); lib.lua builds the same.
CONFIG_VERSION = "v"


def invalidate_decision_config(pipe: Any, k: OrgKeys) -> None:
    """Queues the change of the organization's configuration version: every
    decision after it resolves its limits, permissions, spend limits and prices
    afresh. Queue it in the same transaction (one slot) as the change itself."""
    pipe.hincrby(k.state, CONFIG_VERSION, 1)


def org_buckets_field(model: str) -> str:
    return "o:" + model


def project_buckets_field(project_id: str, model: str) -> str:
    return f"p:{project_id}:{model}"


def limit_field(model: str, dimension: str) -> str:
    return f"{model}|{dimension}"

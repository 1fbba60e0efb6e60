"""Every Redis key ratelimitd writes, built in one place (LAYOUT at the end describes them
all as patterns, with how long each lives; tests/test_key_layout.py holds a full flow to it).

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
                                  both binary (packed doubles), and the configuration
                                  version "v" (lib.lua); expires once
                                  every bucket would have drained

Usage, spend and the request log (engine/usage.py, decide.lua, report.lua)::

    cfg                    hash   usage settings ("cached": "1" when cached tokens count)
    price                  hash   model -> "<input>,<output>,<cached input>" USD per million
    spendlim               hash   spend limits, micro-USD: "o" the organization's,
                                  "p:<project_id>" a project's (spend_field)
    spend:<YYYYMM>         hash   the month's spend, micro-USD, same fields; expires
    log:<project_id>       list   request log, newest first, capped, expires after the newest
    sa:<YYYYMM>            hash   spend alerts claimed in the month, "<field>|<percent>" -> "1"
                                  (spend_alerts.lua, engine/spend_alerts.py); expires after the month

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

import enum
import re
from typing import Any, NamedTuple

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
# Console sign-ins (engine/sessions.py): "rl:session:<sha256 of the session id>", a
# string that expires with the session; outside every organization like CREDENTIALS.
CONSOLE_SESSION_PREFIX = "rl:session:"


def health_probe_on(n: int) -> str:
    """A health probe key with a hash tag of its own: on a cluster, the ``n`` that puts it
    on a given primary is searched for (storage/cluster.py)."""
    return f"{HEALTH_PROBE}:{{{n}}}"


def console_session(session_digest: str) -> str:
    """A console session (engine/sessions.py), by the sha256 of its id: a copy of the database
    holds nothing a browser could present. Outside every organization, like CREDENTIALS."""
    return CONSOLE_SESSION_PREFIX + session_digest


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

    def spend_alerts(self, month_key: str) -> str:
        return f"{self.prefix}sa:{month_key}"

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

    @property
    def usage_settings(self) -> str:
        return self.prefix + "cfg"

    @property
    def prices(self) -> str:
        return self.prefix + "price"

    @property
    def spend_limits(self) -> str:
        return self.prefix + "spendlim"

    def spend(self, month_key: str) -> str:
        """Spend of one month (``YYYYMM``), field ``spend_field``, micro-USD."""
        return f"{self.prefix}spend:{month_key}"

    def request_log(self, project_id: str) -> str:
        return self.prefix + "log:" + project_id


def spend_field(project_id: str) -> str:
    """The field of a spend or spend-limit hash: the organization's, or one project's."""
    return f"p:{project_id}" if project_id else "o"


def project_of_spend_field(field: str) -> str:
    """The project a spend field is for ("" for the organization's)."""
    return field.removeprefix("p:") if field.startswith("p:") else ""


# Every organization's record key, for SCAN (the organization index may miss one a failed
# create left behind).
ORGANIZATION_RECORDS = org_prefix("org_*") + "org"


def organization_of_record(key: str) -> str:
    """What the hash tag of an organization record key holds ("" for any other key); the
    caller checks that it is an organization id."""
    org_id = key.removeprefix("rl:{").removesuffix("}:org")
    return org_id if key == OrgKeys(org_id).record else ""


# Fields of the decision state hash (OrgKeys.state); lib.lua builds the same.
CONFIG_VERSION = "v"


def invalidate_decision_config(pipe: Any, k: OrgKeys) -> None:
    """Queues the change of the organization's configuration version: every
    decision after it resolves its limits, permissions, spend limits and prices
    afresh. Queue it in the same transaction (one slot) as the change itself."""
    pipe.hincrby(k.state, CONFIG_VERSION, 1)


# -- the layout as data: what every key ratelimitd writes looks like, and how long it lives


class Lifetime(enum.Enum):
    EXPIRES = "expires"  # carries a TTL, set by whoever writes it
    BOUNDED = "bounded"  # no TTL: one per organization or per (project, model, key), or capped
    CONFIGURED = "configured"  # what users configured: kept until they delete it


class KeyKind(NamedTuple):
    pattern: re.Pattern[str]
    lifetime: Lifetime
    organization: bool  # carries its organization's hash tag: rl:{org_<id>}:


_ID = r"[a-z0-9]+"
_ORG_TAG = r"rl:\{org_" + _ID + r"\}:"
_ORGANIZATION_KEYS = {
    "org": Lifetime.CONFIGURED, "lim:o": Lifetime.CONFIGURED, f"lim:p:proj_{_ID}": Lifetime.CONFIGURED,
    f"p:proj_{_ID}": Lifetime.CONFIGURED, "pn": Lifetime.CONFIGURED, f"k:key_{_ID}": Lifetime.CONFIGURED,
    f"pk:proj_{_ID}": Lifetime.CONFIGURED, f"pd:proj_{_ID}": Lifetime.CONFIGURED, "m": Lifetime.CONFIGURED,
    "mn": Lifetime.CONFIGURED, "c": Lifetime.CONFIGURED, "mp": Lifetime.CONFIGURED, "cfg": Lifetime.CONFIGURED,
    "price": Lifetime.CONFIGURED, "spendlim": Lifetime.CONFIGURED,
    "audit": Lifetime.BOUNDED, "ui": Lifetime.BOUNDED, "u:r": Lifetime.BOUNDED,
    r"r:[\x21-\x7e]+": Lifetime.EXPIRES, "s": Lifetime.EXPIRES, r"u:[mhd]:\d+": Lifetime.EXPIRES,
    r"spend:\d{6}": Lifetime.EXPIRES, r"sa:\d{6}": Lifetime.EXPIRES, f"log:proj_{_ID}": Lifetime.EXPIRES,
}  # fmt: skip
_PLATFORM_KEYS = {
    re.escape(ORGANIZATIONS): Lifetime.CONFIGURED,
    re.escape(CREDENTIALS): Lifetime.CONFIGURED,
    re.escape(MANUAL_CLOCK): Lifetime.CONFIGURED,  # tests and the private demo only
    re.escape(PLATFORM_AUDIT): Lifetime.BOUNDED,
    re.escape(HEALTH_PROBE) + r"(:\{\d+\})?": Lifetime.EXPIRES,
    re.escape(CONSOLE_SESSION_PREFIX) + "[0-9a-f]{64}": Lifetime.EXPIRES,
}
LAYOUT: tuple[KeyKind, ...] = (
    *(KeyKind(re.compile(_ORG_TAG + suffix + "$"), life, True) for suffix, life in _ORGANIZATION_KEYS.items()),
    *(KeyKind(re.compile(pattern + "$"), life, False) for pattern, life in _PLATFORM_KEYS.items()),
)


def kind_of(key: str) -> KeyKind | None:
    """The layout entry a key written by ratelimitd matches (None: not one of ours)."""
    return next((kind for kind in LAYOUT if kind.pattern.match(key)), None)

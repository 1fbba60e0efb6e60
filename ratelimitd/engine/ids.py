"""Identifiers and secrets.

Ids are a type prefix and 12 base32 characters (60 random bits), e.g.
``org_k3j9x2m1p0qa``. An API key carries the ids needed to find its record
without a lookup, so a decision is one script on one organization's slot::

    rlk_<key 12><org 12><secret 32>     (60 characters)

An organization member's credential has the same shape, so authenticating
it is one read in its organization's slot too::

    rlm_<member 12><org 12><secret 32>  (60 characters)

The secret part has 160 random bits; only ``sha256(whole key)`` is stored.
A fast hash is the right tool here: the input is high-entropy, so there is
nothing for a slow password hash to protect, and it costs a microsecond on the
hot path.
"""

from __future__ import annotations

import functools
import hashlib
import re
import secrets
from typing import NamedTuple

from ratelimitd.core.errors import InvalidArgument

_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
_ID_LEN = 12
_SECRET_LEN = 32
API_KEY_PREFIX = "rlk_"
API_KEY_LENGTH = len(API_KEY_PREFIX) + 2 * _ID_LEN + _SECRET_LEN
# How much of a key stays visible in listings: the type and the key id, which
# name the key without revealing anything secret.
VISIBLE_PREFIX_LENGTH = len(API_KEY_PREFIX) + _ID_LEN

_API_KEY_RE = re.compile(rf"^{API_KEY_PREFIX}[a-z2-7]{{{2 * _ID_LEN + _SECRET_LEN}}}$")
_ID_RE = {kind: re.compile(rf"^{kind}_[a-z2-7]{{{_ID_LEN}}}$") for kind in ("org", "proj", "key", "cred", "mem")}
MEMBER_TOKEN_PREFIX = "rlm_"
_MEMBER_TOKEN_RE = re.compile(rf"^{MEMBER_TOKEN_PREFIX}[a-z2-7]{{{2 * _ID_LEN + _SECRET_LEN}}}$")


def _random(n: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(n))


def new_id(kind: str) -> str:
    return f"{kind}_{_random(_ID_LEN)}"


def is_id(kind: str, value: str) -> bool:
    return bool(_ID_RE[kind].match(value))


def require_id(kind: str, what: str, value: str) -> str:
    """``value`` if it is a well-formed id of ``kind``, else INVALID_ARGUMENT naming ``what``."""
    if not value:
        raise InvalidArgument(f"{what} is empty")
    if not is_id(kind, value):
        raise InvalidArgument(f"{what} {value[:80]!r} is not a {kind}_ id")
    return value


def sha256_hex(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class ParsedApiKey(NamedTuple):
    key_id: str
    org_id: str
    hash: str


def new_api_key(org_id: str) -> tuple[str, str]:
    """Returns (key id, whole secret) for a new key of ``org_id``."""
    key_suffix = _random(_ID_LEN)
    secret = API_KEY_PREFIX + key_suffix + org_id.removeprefix("org_") + _random(_SECRET_LEN)
    return "key_" + key_suffix, secret


def parse_api_key(secret: str) -> ParsedApiKey | None:
    """The ids inside a well-formed key, or None: a malformed key is refused unseen."""
    if len(secret) != API_KEY_LENGTH or not _API_KEY_RE.match(secret):
        return None
    body = secret[len(API_KEY_PREFIX) :]
    return ParsedApiKey("key_" + body[:_ID_LEN], "org_" + body[_ID_LEN : 2 * _ID_LEN], sha256_hex(secret))


# Keys that call often are parsed (and hashed) once: the hot path sees the same few
# thousand keys again and again. The cache lives only in this process's memory, like
# the request that carried the key; it is never logged or written anywhere.
parse_api_key_cached = functools.lru_cache(maxsize=16_384)(parse_api_key)


def new_token() -> str:
    """An operator or service credential; stored only as sha256."""
    return "rlt_" + secrets.token_urlsafe(32)


class ParsedMemberToken(NamedTuple):
    member_id: str
    org_id: str
    hash: str


def new_member_token(org_id: str, member_id: str) -> str:
    return MEMBER_TOKEN_PREFIX + member_id.removeprefix("mem_") + org_id.removeprefix("org_") + _random(_SECRET_LEN)


def parse_member_token(token: str) -> ParsedMemberToken | None:
    """The ids inside a well-formed member token, or None (then it may be an operator token)."""
    if not _MEMBER_TOKEN_RE.match(token):
        return None
    body = token[len(MEMBER_TOKEN_PREFIX) :]
    return ParsedMemberToken("mem_" + body[:_ID_LEN], "org_" + body[_ID_LEN : 2 * _ID_LEN], sha256_hex(token))

"""Settings from a config file, and the effective settings with where each came from.

One precedence, everywhere: flags > environment (RATELIMITD_*) > the file > defaults.
A file is TOML (``.toml``, read with the standard library) or YAML (``.yaml``/``.yml``).
Its keys are the settings' names: the environment variables without ``RATELIMITD_``, in
lower case. A key that names no setting, or a value of the wrong type, is refused with
the file and the key named, so a typo never silently leaves a default in force.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ratelimitd.core.storage_url import redact
from ratelimitd.settings import Settings, env_values, parse_pairs, parse_windows

CONFIG_ENV = "RATELIMITD_CONFIG"
_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
_PAIR_SETTINGS = ("header_windows", "envoy_descriptor_keys", "spend_webhook_org_urls")
# Lists of strings: a TOML array, or the environment's comma-separated text.
_LIST_SETTINGS = ("envoy_domains", "http_cors_origins")
# Settings whose value is a path or a URL: None by default, a string when set.
_OPTIONAL_STRINGS = frozenset(name for name, f in _FIELDS.items() if f.default is None)
REDACTED = "<redacted>"


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file (and the key)."""


@dataclass(frozen=True)
class Resolved:
    """The effective settings, and for each setting where its value came from."""

    settings: Settings
    sources: dict[str, str]
    path: Path | None


def resolve(config: str | None, env: Mapping[str, str], flags: Mapping[str, Any]) -> Resolved:
    """Defaults < the file (``config``, else $RATELIMITD_CONFIG) < environment < flags (None: not given)."""
    path = Path(config) if config else Path(env[CONFIG_ENV]) if env.get(CONFIG_ENV) else None
    from_file = read(path) if path is not None else {}
    from_env = env_values(env)
    given = {name: value for name, value in flags.items() if value is not None}
    settings = Settings.layered(env, from_file, given)
    sources = {}
    for name in _FIELDS:
        if name in given:
            sources[name] = "flag"
        elif name in from_env:
            sources[name] = f"environment RATELIMITD_{name.upper()}"
        elif name in from_file:
            sources[name] = f"file {path}"
        else:
            sources[name] = "default"
    return Resolved(settings, sources, path)


def read(path: Path) -> dict[str, Any]:
    """The settings a file sets, converted to the types Settings holds."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    raw = _parse(path, text)
    values = {}
    for key, value in raw.items():
        if key not in _FIELDS and isinstance(value, dict):
            raise ConfigError(f"{path}: unknown setting {key!r}: settings are top-level NAME = VALUE lines, not tables")
        if key not in _FIELDS:
            raise ConfigError(f"{path}: unknown setting {key!r}{_did_you_mean(key)}")
        values[key] = _convert(path, key, value)
    return values


def _parse(path: Path, text: str) -> dict[str, Any]:
    if path.suffix in (".yaml", ".yml"):
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        data = {} if data is None else data
    else:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path} is not valid TOML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the file must hold settings as NAME = VALUE, not a {type(data).__name__}")
    return data


def _did_you_mean(key: str) -> str:
    close = difflib.get_close_matches(key.lower().replace("-", "_"), _FIELDS, n=1)
    return f" (did you mean {close[0]!r}?)" if close else " (the names are listed by `ratelimitd config show`)"


def _convert(path: Path, key: str, value: Any) -> Any:
    try:
        return _typed(key, value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path}: {key}: {e}") from None


def _typed(key: str, value: Any) -> Any:
    if key == "windows":
        return parse_windows(_pairs_text(value))
    if key in _PAIR_SETTINGS:
        return parse_pairs(_pairs_text(value), key)
    if key in _LIST_SETTINGS:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(d, str) for d in items):
            raise TypeError(f"expected a list of strings, not {value!r}")
        return tuple(d.strip() for d in items if d.strip())
    if key == "data_dir":
        return Path(_expect(value, str, "a string"))
    if key in _OPTIONAL_STRINGS:
        return _expect(value, str, "a string")
    default = _FIELDS[key].default
    if isinstance(default, bool):
        return _expect(value, bool, "true or false")
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"expected an integer, not {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"expected a number, not {value!r}")
        return float(value)
    return _expect(value, str, "a string")


def _expect(value: Any, kind: type, what: str) -> Any:
    if not isinstance(value, kind):
        raise TypeError(f"expected {what}, not {value!r}")
    return value


def _pairs_text(value: Any) -> str:
    """A table (``{minute = 60}``) or the environment's NAME=VALUE,... text, as that text."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    raise TypeError(f"expected a table of NAME = VALUE, not {value!r}")


# -- printing: the effective settings as a TOML file ------------------------------------


def render(resolved: Resolved) -> str:
    """The settings in effect as a TOML config file (secrets redacted), each with its source."""
    where = str(resolved.path) if resolved.path else "none given"
    lines = [f"# ratelimitd settings in effect. Precedence: flags > environment > file ({where}) > defaults."]
    for name, value in shown_values(resolved.settings).items():
        source = resolved.sources[name]
        if value is None:
            lines.append(f"# {name} is unset  ({source})")
        else:
            lines.append(f"{name} = {_toml(value)}  # {source}")
    return "\n".join(lines) + "\n"


def shown_values(settings: Settings) -> dict[str, Any]:
    """Every setting's value as it may be shown: secrets and passwords in URLs redacted."""
    shown = {}
    for name, f in _FIELDS.items():
        value = getattr(settings, name)
        if f.metadata.get("secret") and value is not None:
            value = REDACTED
        elif name == "redis_url" and value:
            value = redact(value)
        shown[name] = value
    return shown


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a TOML basic string


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() and key.isascii() else json.dumps(key)

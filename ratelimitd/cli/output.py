"""What a verb prints: a table for people, or with --json the API's reply as JSON.

The JSON is the reply as proto3's JSON mapping writes it, with two changes a
script wants: every field is present (a zero is printed, not dropped), and
64-bit integers are JSON numbers rather than strings (Python's json reads them
exactly; the mapping's strings are for JavaScript's doubles).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from typing import Any, cast

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from ratelimitd.api.wellknown import MICROS_PER_USD

_INT64 = frozenset(
    {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    }
)


def as_json(message: Message) -> dict[str, Any]:
    raw = MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    # the C (upb) descriptor behaves as the Python one; the stubs name them apart
    return _with_numbers(raw, cast(Descriptor, message.DESCRIPTOR))


def _with_numbers(value: dict[str, Any], descriptor: Descriptor) -> dict[str, Any]:
    for field in descriptor.fields:
        if field.name in value:
            value[field.name] = _field(value[field.name], field)
    return value


def _field(value: Any, field: FieldDescriptor) -> Any:
    entry = field.message_type
    if entry is not None and entry.GetOptions().map_entry:
        value_field = entry.fields_by_name["value"]
        return {k: _one(v, value_field) for k, v in value.items()}
    if field.is_repeated:
        return [_one(v, field) for v in value]
    return _one(value, field)


def _one(value: Any, field: FieldDescriptor) -> Any:
    if field.type in _INT64:
        return int(value)
    if field.message_type is not None and isinstance(value, dict):
        return _with_numbers(value, field.message_type)
    return value


def print_json(value: object) -> None:
    print(json.dumps(value, indent=2))


def emit(args: argparse.Namespace, message: Message, table: Callable[[], str]) -> None:
    if args.json:
        print_json(as_json(message))
    else:
        print(table())


def render(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def format_usd(micros: int) -> str:
    """The API's micro-dollars as the dollars a table shows."""
    return f"{micros / MICROS_PER_USD:.6f}"

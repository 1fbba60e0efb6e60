"""An OpenAPI 3.1 description of the JSON over HTTP API, built from a protobuf descriptor set.

    python scripts/openapi.py IMAGE.pb OUT.json

IMAGE.pb is a FileDescriptorSet of proto/ with imports and source info (comments), as
scripts/gen_protos.py makes it with protoc; that script runs this one (`./dev gen`), so
the description can never say something the protos do not. Each unary RPC becomes
``POST /<package.Service>/<Method>`` (the Connect protocol's unary call) with its
messages in the proto3 JSON mapping; streaming RPCs are gRPC only and left out.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from google.protobuf.descriptor_pb2 import (
    DescriptorProto,
    FieldDescriptorProto,
    FileDescriptorProto,
    FileDescriptorSet,
)

Schema = dict[str, Any]
F = FieldDescriptorProto
# Path components of descriptor.proto, for the comments in source_code_info.
_MESSAGES, _ENUMS, _SERVICES = 4, 5, 6
_FIELDS, _NESTED, _NESTED_ENUMS, _VALUES, _METHODS = 2, 3, 4, 2, 2

_INT64 = {"type": ["string", "integer"], "format": "int64", "description": "64-bit: a JSON string (or number)"}
_SCALARS: dict[int, Schema] = {
    F.TYPE_DOUBLE: {"type": "number", "format": "double"},
    F.TYPE_FLOAT: {"type": "number", "format": "float"},
    F.TYPE_INT64: _INT64,
    F.TYPE_SINT64: _INT64,
    F.TYPE_SFIXED64: _INT64,
    F.TYPE_UINT64: {**_INT64, "format": "uint64"},
    F.TYPE_FIXED64: {**_INT64, "format": "uint64"},
    F.TYPE_INT32: {"type": "integer", "format": "int32"},
    F.TYPE_SINT32: {"type": "integer", "format": "int32"},
    F.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    F.TYPE_UINT32: {"type": "integer", "format": "int64", "minimum": 0, "maximum": 4294967295},
    F.TYPE_FIXED32: {"type": "integer", "format": "int64", "minimum": 0, "maximum": 4294967295},
    F.TYPE_BOOL: {"type": "boolean"},
    F.TYPE_STRING: {"type": "string"},
    F.TYPE_BYTES: {"type": "string", "contentEncoding": "base64"},
}
# The well-known types have JSON forms of their own (the proto3 JSON mapping).
_WELL_KNOWN: dict[str, Schema] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time", "example": "2026-01-31T12:00:00Z"},
    "google.protobuf.Duration": {"type": "string", "pattern": r"^-?\d+(\.\d{1,9})?s$", "example": "1.5s"},
    "google.protobuf.FieldMask": {"type": "string", "description": "field paths in lowerCamelCase, comma-separated"},
    "google.protobuf.Empty": {"type": "object"},
    "google.protobuf.Struct": {"type": "object"},
    "google.protobuf.Value": {},
    "google.protobuf.ListValue": {"type": "array"},
    "google.protobuf.Any": {"type": "object", "required": ["@type"], "properties": {"@type": {"type": "string"}}},
    "google.protobuf.DoubleValue": {"type": ["number", "null"]},
    "google.protobuf.FloatValue": {"type": ["number", "null"]},
    "google.protobuf.Int64Value": {"type": ["string", "integer", "null"]},
    "google.protobuf.UInt64Value": {"type": ["string", "integer", "null"]},
    "google.protobuf.Int32Value": {"type": ["integer", "null"]},
    "google.protobuf.UInt32Value": {"type": ["integer", "null"]},
    "google.protobuf.BoolValue": {"type": ["boolean", "null"]},
    "google.protobuf.StringValue": {"type": ["string", "null"]},
    "google.protobuf.BytesValue": {"type": ["string", "null"], "contentEncoding": "base64"},
}
CONNECT_ERROR: Schema = {
    "type": "object",
    "description": "A Connect error: the HTTP status follows the code (docs/api.md, JSON over HTTP)",
    "required": ["code"],
    "properties": {
        "code": {
            "type": "string",
            "enum": [
                "canceled",
                "unknown",
                "invalid_argument",
                "deadline_exceeded",
                "not_found",
                "already_exists",
                "permission_denied",
                "resource_exhausted",
                "failed_precondition",
                "aborted",
                "out_of_range",
                "unimplemented",
                "internal",
                "unavailable",
                "data_loss",
                "unauthenticated",
            ],
        },
        "message": {"type": "string"},
    },
}


class Comments:
    """Leading comments of one file's elements, by their source_code_info path."""

    def __init__(self, file: FileDescriptorProto) -> None:
        self._by_path = {
            tuple(loc.path): " ".join(loc.leading_comments.split())
            for loc in file.source_code_info.location
            if loc.leading_comments.strip()
        }

    def at(self, *path: int) -> str:
        return self._by_path.get(path, "")


def _with_description(schema: Schema, text: str) -> Schema:
    return {**schema, "description": text} if text else schema


class Builder:
    def __init__(self, image: FileDescriptorSet) -> None:
        self.files = {f.name: f for f in image.file}
        self.schemas: dict[str, Schema] = {}
        self.messages: dict[str, tuple[DescriptorProto, Comments, tuple[int, ...]]] = {}
        self.enums: dict[str, Schema] = {}
        for file in image.file:
            comments = Comments(file)
            for i, message in enumerate(file.message_type):
                self._index(file.package, message, comments, (_MESSAGES, i))
            for i, enum in enumerate(file.enum_type):
                self._enum(f"{file.package}.{enum.name}", enum.value, comments, (_ENUMS, i))

    def _index(self, scope: str, message: DescriptorProto, comments: Comments, path: tuple[int, ...]) -> None:
        name = f"{scope}.{message.name}"
        self.messages[name] = (message, comments, path)
        for i, nested in enumerate(message.nested_type):
            self._index(name, nested, comments, (*path, _NESTED, i))
        for i, enum in enumerate(message.enum_type):
            self._enum(f"{name}.{enum.name}", enum.value, comments, (*path, _NESTED_ENUMS, i))

    def _enum(self, name: str, values: Any, comments: Comments, path: tuple[int, ...]) -> None:
        schema: Schema = {"type": "string", "enum": [v.name for v in values]}
        self.enums[name] = _with_description(schema, comments.at(*path))

    def field_schema(self, field: FieldDescriptorProto) -> Schema:
        type_name = field.type_name.lstrip(".")
        if field.type == F.TYPE_MESSAGE and self.messages[type_name][0].options.map_entry:
            entry = self.messages[type_name][0]
            return {"type": "object", "additionalProperties": self.field_schema(entry.field[1])}
        one = self._single(field, type_name)
        return {"type": "array", "items": one} if field.label == F.LABEL_REPEATED else one

    def _single(self, field: FieldDescriptorProto, type_name: str) -> Schema:
        if field.type == F.TYPE_ENUM:
            return self.ref(type_name, self.enums[type_name])
        if field.type == F.TYPE_MESSAGE:
            if type_name in _WELL_KNOWN:
                return _WELL_KNOWN[type_name]
            self.message_schema(type_name)
            return {"$ref": f"#/components/schemas/{type_name}"}
        return _SCALARS[field.type]

    def ref(self, name: str, schema: Schema) -> Schema:
        self.schemas.setdefault(name, schema)
        return {"$ref": f"#/components/schemas/{name}"}

    def message_schema(self, name: str) -> None:
        if name in self.schemas:
            return
        message, comments, path = self.messages[name]
        schema: Schema = {"type": "object", "properties": {}}
        self.schemas[name] = _with_description(schema, comments.at(*path))
        for i, field in enumerate(message.field):
            text = comments.at(*path, _FIELDS, i)
            if field.HasField("oneof_index") and not field.proto3_optional:
                oneof = message.oneof_decl[field.oneof_index].name
                text = f"{text} (one of `{oneof}`: set at most one)".strip()
            schema["properties"][field.json_name] = _with_description(self.field_schema(field), text)


def _operations(builder: Builder, files: list[str]) -> Iterator[tuple[str, Schema]]:
    for file_name in files:
        file = builder.files[file_name]
        comments = Comments(file)
        for s, service in enumerate(file.service):
            full = f"{file.package}.{service.name}"
            for m, method in enumerate(service.method):
                if method.client_streaming or method.server_streaming:
                    continue
                request, response = method.input_type.lstrip("."), method.output_type.lstrip(".")
                builder.message_schema(request)
                builder.message_schema(response)
                yield (
                    f"/{full}/{method.name}",
                    _operation(full, method.name, request, response, comments.at(_SERVICES, s, _METHODS, m)),
                )


def _operation(service: str, method: str, request: str, response: str, text: str) -> Schema:
    def body(name: str) -> Schema:
        return {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}

    operation: Schema = {
        "operationId": f"{service}.{method}",
        "tags": [service],
        "parameters": [
            {"$ref": "#/components/parameters/connect-protocol-version"},
            {"$ref": "#/components/parameters/connect-timeout-ms"},
        ],
        "requestBody": {"required": True, "content": body(request)},
        "responses": {
            "200": {"description": response, "content": body(response)},
            "default": {
                "description": "a Connect error",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/connect.Error"}}},
            },
        },
    }
    if text:
        operation["summary"] = text.split(". ")[0].rstrip(".")
        operation["description"] = text
    return operation


def build(image: FileDescriptorSet, files: list[str]) -> Schema:
    builder = Builder(image)
    paths = {path: {"post": operation} for path, operation in _operations(builder, files)}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "ratelimitd",
            "version": "v1",
            "description": (
                "Every unary RPC of ratelimitd as JSON over HTTP (the Connect protocol's unary calls), served by "
                "`ratelimitd serve --http-listen HOST:PORT`. Generated from proto/ by `./dev gen`; docs/api.md "
                "explains it. Streaming RPCs (CheckAndConsumeStream) are gRPC only."
            ),
        },
        "security": [{}, {"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "rlt_… credential"}},
            "parameters": {
                "connect-protocol-version": {
                    "name": "Connect-Protocol-Version",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string", "enum": ["1"]},
                },
                "connect-timeout-ms": {
                    "name": "Connect-Timeout-Ms",
                    "in": "header",
                    "required": False,
                    "description": "deadline of the call, in milliseconds",
                    "schema": {"type": "string", "pattern": "^[0-9]{1,10}$"},
                },
            },
            "schemas": {"connect.Error": CONNECT_ERROR, **dict(sorted(builder.schemas.items()))},
        },
    }


def main(argv: list[str]) -> int:
    image_path, out_path = Path(argv[1]), Path(argv[2])
    image = FileDescriptorSet.FromString(image_path.read_bytes())
    ours = [f.name for f in image.file if f.name.startswith("ratelimitd/")]
    out_path.write_text(json.dumps(build(image, ours), indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))

"""The console's files (HTML, CSS, ES modules), shipped inside the package and read once at start-up."""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass

import grpc
from aiohttp import web

from ratelimitd.http.connect import error

CONTENT_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}


@dataclass(frozen=True)
class Assets:
    files: dict[str, tuple[bytes, str]]  # name -> (content, content type)

    def response(self, name: str) -> web.Response:
        found = self.files.get(name)
        if found is None:
            return error(grpc.StatusCode.NOT_FOUND, f"the console has no file {name!r}", 404)
        body, content_type = found
        charset = "utf-8" if content_type.startswith("text/") else None
        return web.Response(body=body, content_type=content_type, charset=charset)


def load() -> Assets:
    """Every file of console/static, by name: a request can name only what is listed here."""
    files: dict[str, tuple[bytes, str]] = {}
    for entry in importlib.resources.files("ratelimitd.console").joinpath("static").iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in CONTENT_TYPES:
            files[entry.name] = (entry.read_bytes(), CONTENT_TYPES[suffix])
    return Assets(files)

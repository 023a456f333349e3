"""The served OpenAPI schema: Litestar's, with request bodies described by msgspec itself.

Litestar's generator loses constraints on optional fields (a `ge=0` on `float | None` vanishes,
since 0 is falsy, and the rest land beside the `oneOf` instead of on the number). The bodies are
decoded by msgspec, so msgspec's own JSON Schema of each body type is exactly what the server
accepts; it replaces Litestar's for every route that takes a JSON body.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import msgspec
from litestar import Request
from litestar.openapi.plugins import JsonRenderPlugin, ScalarRenderPlugin

# Component names for msgspec's definitions: "<body type>.<definition>", so same-named types of
# different dialects (Claude's Message, Ollama's Message) never collide.
_REF_PREFIX = "#/components/schemas/"


def body_schemas(bodies: Mapping[tuple[str, str], type[Any]], openapi: dict[str, Any]) -> dict[str, Any]:
    """A copy of `openapi` whose request bodies for (method, path) are msgspec's schemas."""
    patched = copy.deepcopy(openapi)
    components: dict[str, Any] = patched.setdefault("components", {}).setdefault("schemas", {})
    for (method, path), body_type in bodies.items():
        operation = patched.get("paths", {}).get(path, {}).get(method)
        if operation is None:
            continue
        prefix = body_type.__name__
        (top,), definitions = msgspec.json.schema_components(
            [body_type], ref_template=f"{_REF_PREFIX}{prefix}.{{name}}"
        )
        components.update({f"{prefix}.{name}": schema for name, schema in definitions.items()})
        operation["requestBody"] = {
            "content": {"application/json": {"schema": top}},
            "required": True,
        }
    return patched


class AccurateJsonRenderPlugin(JsonRenderPlugin):
    """Serves `/schema/openapi.json` with `body_schemas` applied (computed once)."""

    def __init__(self, bodies: Mapping[tuple[str, str], type[Any]]) -> None:
        super().__init__()
        self._bodies = dict(bodies)
        self._rendered: bytes | None = None

    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        if self._rendered is None:
            self._rendered = self.render_json(request, body_schemas(self._bodies, openapi_schema))
        return self._rendered


def render_plugins(bodies: Mapping[tuple[str, str], type[Any]]) -> list[Any]:
    """The JSON schema (patched) and Litestar's usual HTML viewer at `/schema`."""
    return [AccurateJsonRenderPlugin(bodies), ScalarRenderPlugin()]

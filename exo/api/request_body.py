"""Checks on a request body before any route parses it: empty bodies and non-JSON media types.

Litestar would answer an empty body with its own validation message (`'data'`) and parse a form or
text body as JSON anyway; a client deserves the reason in words and the status HTTP defines (415).
"""

from __future__ import annotations

from typing import Any

from litestar import Request

from exo.api.errors import ApiError

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def is_json_media_type(content_type: str) -> bool:
    media_type = content_type.partition(";")[0].strip().lower()
    return media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    )


async def check_request_body(request: Request[Any, Any, Any]) -> None:
    """Before-request hook: routes that take a JSON body get one, or a clear 400/415."""
    if request.method not in BODY_METHODS or request.route_handler.parsed_data_field is None:
        return
    content_type = request.headers.get("content-type")
    if content_type is not None and not is_json_media_type(content_type):
        raise ApiError(
            415,
            f"unsupported media type {content_type.partition(';')[0].strip()!r}: "
            "send the body as JSON with 'Content-Type: application/json'",
            param=None,
            code="unsupported_media_type",
        )
    if not (await request.body()).strip():
        raise ApiError(400, "invalid request: body is empty", param=None, code="invalid_request")

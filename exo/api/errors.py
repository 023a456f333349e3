"""Every error the API returns is OpenAI's error object, with a status that says whose fault it was.

`{"error": {"message", "type", "param", "code"}}`: service errors, Litestar's own exceptions
(validation, malformed JSON, unknown route, body too large, auth) and bugs alike, so an OpenAI SDK
raises a readable exception instead of choking on an unexpected body.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any, Literal, TypeVar

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, SerializationException, ValidationException
from litestar.openapi.datastructures import ResponseSpec
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR
from litestar.types import ExceptionHandlersMap

from exo.api.body_limits import TooDeep, decode_json_off_loop
from exo.api.cluster_port import (
    ClusterUnavailable,
    GenerationAborted,
    InstanceFailed,
    InstanceNotFound,
    InstanceNotReady,
    ModelNotFound,
    ModelUnavailable,
    NoCapacity,
    NodeNotFound,
    NodeStillAnswers,
    Overloaded,
    ServiceError,
)

logger = logging.getLogger(__name__)


class ErrorDetail(msgspec.Struct, frozen=True):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(msgspec.Struct, frozen=True):
    error: ErrorDetail


class ApiError(Exception):
    """An error raised by a controller itself (bad field, unsupported option)."""

    def __init__(
        self, status_code: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.code = code


# Service error -> (HTTP status, OpenAI error type, code, param).
_SERVICE_ERRORS: dict[type[ServiceError], tuple[int, str, str, str | None]] = {
    ModelNotFound: (404, "invalid_request_error", "model_not_found", "model"),
    InstanceNotFound: (404, "invalid_request_error", "instance_not_found", None),
    NoCapacity: (503, "server_error", "no_capacity", None),
    InstanceFailed: (503, "server_error", "instance_failed", None),
    InstanceNotReady: (504, "server_error", "instance_not_ready", None),
    ClusterUnavailable: (503, "server_error", "cluster_unavailable", None),
    NodeNotFound: (404, "invalid_request_error", "node_not_found", None),
    NodeStillAnswers: (409, "invalid_request_error", "node_answers", None),
    GenerationAborted: (500, "server_error", "generation_failed", None),
    Overloaded: (503, "server_error", "overloaded", None),
    ModelUnavailable: (502, "server_error", "model_unavailable", "model"),  # status from the error
}

_HTTP_CODES: dict[int, str] = {
    400: "invalid_request",
    401: "invalid_api_key",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
}


def error_type_for_status(status_code: int) -> str:
    # OpenAI's own 401 is an invalid_request_error with code invalid_api_key.
    return "invalid_request_error" if status_code < 500 else "server_error"


def service_error_body(error: ServiceError) -> tuple[int, ErrorBody]:
    for error_class in type(error).__mro__:
        if error_class in _SERVICE_ERRORS:
            status_code, error_type, code, param = _SERVICE_ERRORS[error_class]
            if isinstance(error, ModelUnavailable):
                status_code, error_type = error.status_code, error_type_for_status(error.status_code)
            return status_code, ErrorBody(ErrorDetail(str(error), error_type, param, code))
    return 500, ErrorBody(ErrorDetail(str(error), "server_error", None, "service_error"))


# Claude's error types by status (https://docs.anthropic.com/en/api/errors).
_ANTHROPIC_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}
ANTHROPIC_PREFIX = "/v1/messages"
OLLAMA_PREFIX = "/ollama/"


class AnthropicErrorDetail(msgspec.Struct, frozen=True):
    type: str
    message: str


class AnthropicErrorBody(msgspec.Struct, frozen=True):
    error: AnthropicErrorDetail
    type: str = "error"


class OllamaErrorBody(msgspec.Struct, frozen=True):
    error: str


def anthropic_error(status_code: int, message: str) -> AnthropicErrorBody:
    error_type = _ANTHROPIC_TYPES.get(
        status_code, "invalid_request_error" if status_code < 500 else "api_error"
    )
    return AnthropicErrorBody(AnthropicErrorDetail(error_type, message))


def dialect_body(
    path: str, status_code: int, body: ErrorBody
) -> ErrorBody | AnthropicErrorBody | OllamaErrorBody:
    """The error as the route's own clients expect it: OpenAI's object, except on the Claude
    route (Anthropic's `{"type": "error", "error": {"type", "message"}}`) and the Ollama routes
    (`{"error": "message"}`)."""
    if path.startswith(ANTHROPIC_PREFIX):
        return anthropic_error(status_code, body.error.message)
    if path.startswith(OLLAMA_PREFIX):
        return OllamaErrorBody(body.error.message)
    return body


def _response(
    request: Request[Any, Any, Any], status_code: int, body: ErrorBody, headers: dict[str, str] | None = None
) -> Response[Any]:
    content = dialect_body(request.url.path, status_code, body)
    return Response(content=content, status_code=status_code, headers=headers)


def handle_service_error(request: Request[Any, Any, Any], error: ServiceError) -> Response[Any]:
    status_code, body = service_error_body(error)
    headers = None
    if isinstance(error, Overloaded | ClusterUnavailable):  # Retry-After is whole seconds
        headers = {"retry-after": str(max(1, math.ceil(error.retry_after_s)))}
    return _response(request, status_code, body, headers)


def handle_api_error(request: Request[Any, Any, Any], error: ApiError) -> Response[Any]:
    detail = ErrorDetail(error.message, error_type_for_status(error.status_code), error.param, error.code)
    return _response(request, error.status_code, ErrorBody(detail))


_MISSING_FIELD = re.compile(r"Object missing required field `([^`]+)`")
_MISSING_PARAMETER = re.compile(r"Missing required \w+ parameter '([^']+)'")
# Litestar names the request body itself `data`.
_BODY_KEY = "data"


def handle_validation_error(request: Request[Any, Any, Any], error: ValidationException) -> Response[Any]:
    """Litestar's validation failure, reworded to name the offending field as `param`."""
    problems = error.extra if isinstance(error.extra, list) else []
    first: dict[str, Any] = problems[0] if problems and isinstance(problems[0], dict) else {}
    message = str(first.get("message", error.detail))
    key = str(first.get("key") or "")
    param = _validation_param(key, message) or _validation_param("", error.detail)
    text = f"invalid value for '{param}': {message}" if param else f"invalid request: {message}"
    return _response(
        request, 400, ErrorBody(ErrorDetail(text, "invalid_request_error", param, "invalid_request"))
    )


BodyType = TypeVar("BodyType")


async def decode_strictly(request: Request[Any, Any, Any], body_type: type[BodyType]) -> BodyType:
    """The JSON body decoded with no type coercion: `"min_nodes": "2"` is a 400, not 2.

    The only parse of the body (no route declares a Litestar `data` parameter, which would parse
    it on the event loop first): depth-checked, and on a worker thread when it is large
    (exo/api/body_limits.py).
    """
    body = await request_json_body(request)
    try:
        return await decode_json_off_loop(body, body_type)
    except TooDeep as error:
        raise ApiError(400, f"invalid request: {error}", code="invalid_request") from error
    except msgspec.ValidationError as error:
        message, _, location = str(error).partition(" - at `$")
        # A dict value's path is `field[...]`: the field is what a client can act on.
        key = location.rstrip("`").removeprefix(".").replace("[...]", "")
        param = _validation_param(key, message)
        text = f"invalid value for '{param}': {message}" if param else f"invalid request: {message}"
        raise ApiError(400, text, param=param, code="invalid_request") from error
    except msgspec.DecodeError as error:
        raise ApiError(400, f"malformed JSON: {error}", code="invalid_request") from error


async def request_json_body(request: Request[Any, Any, Any]) -> bytes:
    """The body, when it is JSON: a 415 for another media type (no Content-Type is read as JSON, as
    curl users expect) and `invalid request: body is empty` for nothing at all."""
    content_type = request.headers.get("content-type")
    if content_type is not None and not is_json_media_type(content_type):
        raise ApiError(
            415,
            f"unsupported media type {content_type.partition(';')[0].strip()!r}: "
            "send the body as JSON with 'Content-Type: application/json'",
            code="unsupported_media_type",
        )
    body = await request.body()
    if not body.strip():
        raise ApiError(400, "invalid request: body is empty", code="invalid_request")
    return body


def is_json_media_type(content_type: str) -> bool:
    media_type = content_type.partition(";")[0].strip().lower()
    return media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    )


def _validation_param(key: str, message: str) -> str | None:
    path = "" if key == _BODY_KEY else key.replace("[...]", "")
    missing = _MISSING_FIELD.search(message) or _MISSING_PARAMETER.search(message)
    if missing is not None:
        return f"{path}.{missing.group(1)}" if path else missing.group(1)
    return path or None


def handle_http_exception(request: Request[Any, Any, Any], error: HTTPException) -> Response[Any]:
    status_code = error.status_code
    code = _HTTP_CODES.get(status_code)
    message = error.detail
    if isinstance(error.__cause__, SerializationException):  # Litestar could not parse the body
        message = f"malformed JSON: {message}"
    detail = ErrorDetail(message, error_type_for_status(status_code), None, code)
    return _response(request, status_code, ErrorBody(detail), headers=error.headers)


def handle_unexpected_error(request: Request[Any, Any, Any], error: Exception) -> Response[Any]:
    # A bug: the client still gets an error object, the node log gets the traceback.
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=error)
    detail = ErrorDetail(f"internal error: {type(error).__name__}", "server_error", None, "internal_error")
    return _response(request, HTTP_500_INTERNAL_SERVER_ERROR, ErrorBody(detail))


EXCEPTION_HANDLERS: ExceptionHandlersMap = {
    ServiceError: handle_service_error,
    ApiError: handle_api_error,
    ValidationException: handle_validation_error,
    HTTPException: handle_http_exception,
    Exception: handle_unexpected_error,
}


# --- OpenAPI: the error answers each route documents ------------------------------------------

_DESCRIPTIONS: dict[int, str] = {
    400: "Bad request: malformed JSON, a missing or wrongly typed field (named in `param`)",
    401: "Missing or wrong API key (when the node has one)",
    403: "The Hub refused: a gated model without a token that has access (set HF_TOKEN)",
    404: "No such model, instance, node or completion",
    409: "The node still answers (stop it first), or the model's files are in use by an instance",
    413: "Request body too large",
    500: "A pipeline stage failed during the generation",
    503: "No capacity to place the model, the instance failed or is overloaded (with Retry-After), "
    "or no master reachable or no majority of the members (with Retry-After)",
    504: "The instance did not become ready in time",
    507: "Not enough free disk for the model's files",
}
Dialect = Literal["openai", "anthropic", "ollama"]
_BODIES: dict[Dialect, type[msgspec.Struct]] = {
    "openai": ErrorBody,
    "anthropic": AnthropicErrorBody,
    "ollama": OllamaErrorBody,
}
# Statuses by kind of route, 401 everywhere a key may be required.
READ = (401,)
QUERY = (400, 401)
BODY = (400, 401, 413)
GENERATE = (400, 401, 404, 413, 500, 503, 504)


def error_responses(*status_codes: int, dialect: Dialect = "openai") -> dict[int, ResponseSpec]:
    """OpenAPI responses for these error statuses, with the body the route really sends."""
    body = _BODIES[dialect]
    return {
        status_code: ResponseSpec(
            data_container=body, description=_DESCRIPTIONS[status_code], generate_examples=False
        )
        for status_code in sorted(set(status_codes))
    }

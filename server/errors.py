"""The one error table: exception class -> (HTTP status, OpenAI type, code), for responses and in-stream SSE events.

Route handlers raise; nothing else builds error JSON. Every non-2xx body is
``{"error": {"message", "type", "param", "code"}}``, with no tracebacks, paths or addresses in it.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine import ContextLengthExceeded, EngineDead, EngineDraining, InvalidRequest, Overloaded, RequestFailed

log = logging.getLogger("goose.server")


class APIError(Exception):
    """An error the HTTP layer raises itself (not the engine)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class Unauthorized(APIError):
    """Missing or wrong API key."""


class NotFound(APIError):
    """Unknown model or route."""


class ModelNotFound(NotFound):
    """The request names a model this server does not serve."""


class PayloadTooLarge(APIError):
    """The request body exceeds server.max_body_bytes."""


class BadHost(APIError):
    """The Host header is not allowed (DNS-rebinding guard)."""


class NotReady(APIError):
    """The model is still loading, or the server is draining for shutdown."""

    def __init__(self, message: str, retry_after: float = 5.0):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Spec:
    status: int
    type: str
    code: str | None
    retry: bool | None = None      # x-should-retry: False for non-transient 5xx


# The table, most specific first. Only engine.InvalidRequest (and our own APIErrors) become 4xx.
TABLE: list[tuple[type[BaseException], Spec]] = [
    (ContextLengthExceeded, Spec(400, "invalid_request_error", "context_length_exceeded")),
    (InvalidRequest, Spec(400, "invalid_request_error", "invalid_value")),
    (BadHost, Spec(400, "invalid_request_error", "invalid_host")),
    (Unauthorized, Spec(401, "authentication_error", "invalid_api_key")),
    (ModelNotFound, Spec(404, "invalid_request_error", "model_not_found")),
    (NotFound, Spec(404, "not_found_error", "not_found")),
    (PayloadTooLarge, Spec(413, "invalid_request_error", "payload_too_large")),
    (Overloaded, Spec(429, "rate_limit_error", "overloaded")),
    (NotReady, Spec(503, "unavailable_error", "not_ready")),
    (EngineDraining, Spec(503, "unavailable_error", "shutting_down")),
    (EngineDead, Spec(503, "unavailable_error", "engine_dead", retry=False)),
    (RequestFailed, Spec(500, "server_error", "request_failed", retry=False)),
]
INTERNAL = Spec(500, "server_error", "internal_error", retry=False)
_BY_STATUS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
              404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
              415: "invalid_request_error", 429: "rate_limit_error", 503: "unavailable_error"}
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{4,}")
_ABS_PATH = re.compile(r"(?<![\w.])/(?:[\w.-]+/)+[\w.-]*")
MAX_MESSAGE = 1000


def spec_for(exc: BaseException) -> Spec:
    for cls, spec in TABLE:
        if isinstance(exc, cls):
            return spec
    return INTERNAL


def sanitize(message: str, *, paths: bool = False) -> str:
    """No memory addresses (and, for server errors, no absolute file paths); bounded length."""
    message = _ADDRESS.sub("0x…", _ABS_PATH.sub("<path>", message) if paths else message)
    return message if len(message) <= MAX_MESSAGE else message[:MAX_MESSAGE] + "…"


def describe(exc: BaseException) -> tuple[Spec, dict, dict[str, str]]:
    """(spec, OpenAI error body, extra headers) for any exception."""
    spec = spec_for(exc)
    if spec is INTERNAL:
        message = "internal server error"
    else:
        message = sanitize(str(exc), paths=spec.status >= 500) or spec.type
    body = {"error": {"message": message, "type": spec.type, "param": getattr(exc, "param", None),
                      "code": spec.code}}
    headers = {}
    retry_after = getattr(exc, "retry_after", None)
    if spec.status in (429, 503):
        headers["Retry-After"] = str(max(1, math.ceil(retry_after if retry_after is not None else 1)))
    if spec.retry is False:
        headers["x-should-retry"] = "false"
    return spec, body, headers


def error_response(exc: BaseException) -> JSONResponse:
    spec, body, headers = describe(exc)
    return JSONResponse(body, status_code=spec.status, headers=headers)


def status_error(status: int, message: str, *, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> JSONResponse:
    """An OpenAI-shaped error for a plain HTTP status (routing, method, content type)."""
    body = {"error": {"message": sanitize(message), "type": _BY_STATUS.get(status, "server_error"),
                      "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def stream_error_event(exc: BaseException) -> dict:
    """The data of the SSE event that reports a failure after a stream started."""
    return describe(exc)[1]


# ------------------------------------------------------------------------------------------------ validation

_TYPE_LABELS = frozenset({"str", "int", "float", "bool", "list", "dict", "tuple"})


def _loc_to_param(loc) -> str | None:
    """("body", "messages", 0, "role") -> "messages[0].role"; pydantic's union-branch labels are dropped."""
    out = ""
    for p in loc:
        if p in ("body", "query", "path", "header"):
            continue
        if isinstance(p, int):
            out += f"[{p}]"
        elif p in _TYPE_LABELS or "-" in str(p) or "[" in str(p):
            continue                                 # e.g. "constrained-str", "list[int]", "function-after[...]"
        else:
            out += ("." if out else "") + str(p)
    return out or None


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "…"


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """A readable message from pydantic errors (at most 10, inputs truncated) and the first offending param.

    A union field (prompt, input, stop) fails once per accepted form; those are reported as one entry."""
    by_param: dict[str | None, list[dict]] = {}
    for err in errors:
        by_param.setdefault(_loc_to_param(err.get("loc", ())), []).append(err)
    parts = []
    for param, errs in list(by_param.items())[:10]:
        err = errs[0]
        if err.get("type") == "json_invalid":
            parts.append(f"invalid JSON: {err.get('ctx', {}).get('error', 'decode error')}")
            continue
        if isinstance(err.get("input"), (bytes, bytearray)):
            parts.append("the request body must be a JSON object (Content-Type: application/json)")
            continue
        where = f"{param}: " if param else ""
        msgs = "; ".join(dict.fromkeys(e.get("msg", "invalid value") for e in errs[:4]))
        if len(errs) > 1:
            msgs = f"matches none of the accepted forms ({msgs})"
        got = f" (got {_short(err.get('input'))})" if "input" in err and err.get("type") != "missing" else ""
        parts.append(f"{where}{msgs}{got}")
    if len(by_param) > 10:
        parts.append(f"and {len(by_param) - 10} more errors")
    first = next(iter(by_param), None) if errors and errors[0].get("type") != "json_invalid" else None
    return "; ".join(parts) or "invalid request", first


# ------------------------------------------------------------------------------------------------ handlers

def _allowed(request: Request) -> list[str]:
    """The methods of every route whose path matches the request's."""
    from starlette.routing import Match
    methods: set[str] = set()
    for route in request.app.routes:
        if route.matches(request.scope)[0] is not Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


def install(app: FastAPI) -> None:
    """Register the handlers once: engine and API errors, validation (400, never 422), HTTP errors, anything else."""

    def count(request: Request, reason: str | None) -> None:
        state = getattr(request.app.state, "goose", None)
        if state is not None:
            state.metrics.rejections.labels(reason or "error").inc()

    async def on_error(request: Request, exc: Exception):
        spec = spec_for(exc)
        if spec is INTERNAL:
            log.error("unhandled %s on %s %r", type(exc).__name__, request.method, request.url.path[:200],
                      exc_info=exc)                       # %r: no CR/LF from the path reaches the log
        count(request, spec.code)
        return error_response(exc)

    async def on_validation(request: Request, exc: RequestValidationError):
        message, param = validation_message(list(exc.errors()))
        count(request, "invalid_value")
        return status_error(400, message, code="invalid_value", param=param)

    async def on_http(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = exc.detail if isinstance(exc.detail, str) else "error"
        headers = getattr(exc, "headers", None)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path[:200]}"
        elif exc.status_code == 405:          # every route of the path, not only the first one matched
            headers = {**(headers or {}), "Allow": ", ".join(_allowed(request))}
        return status_error(exc.status_code, message, code=code, headers=headers)

    for cls, _ in TABLE:
        app.add_exception_handler(cls, on_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_error)

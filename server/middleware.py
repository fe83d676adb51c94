"""Pure ASGI middleware: x-request-id and HTTP metrics, the Host-header guard, and the request-body limit."""
from __future__ import annotations

import logging
import re
import uuid

from server.errors import BadHost, PayloadTooLarge, error_response, status_error
from server.metrics import Metrics

log = logging.getLogger("goose.server")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


class RequestContextMiddleware:
    """Echo a well-formed x-request-id or make one; count every response by route template, method and status."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = _header(scope, b"x-request-id")
        rid = incoming if incoming and _REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        status = [500]

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            self.metrics.http_requests.labels(getattr(route, "path", "unmatched"), scope["method"],
                                              str(status[0])).inc()


class HostCheckMiddleware:
    """Refuse Host headers outside the allowlist (DNS rebinding against a loopback-bound server)."""

    def __init__(self, app, allowed: tuple[str, ...]):
        self.app = app
        self.allowed = frozenset(h.lower() for h in allowed)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and "*" not in self.allowed:
            host = _host_name(_header(scope, b"host") or "")
            if host not in self.allowed:
                await error_response(BadHost(f"Host {host[:100]!r} is not allowed; set server.allowed_hosts"))(
                    scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """413 for bodies over the limit: at once from Content-Length, else while reading; the body is then replayed."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        if length is not None:
            if not length.isdigit():
                await status_error(400, "invalid Content-Length")(scope, receive, send)
                return
            if int(length) > self.limit:
                await self._too_large(scope, receive, send)
                return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._too_large(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()     # later calls see the client's disconnect

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        response = error_response(PayloadTooLarge(f"request body exceeds {self.limit} bytes"))
        response.headers["Connection"] = "close"
        await response(scope, receive, send)


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def _host_name(host: str) -> str:
    """The name part of a Host header: "[::1]:8000" -> "::1", "localhost:8000" -> "localhost"."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host

"""Optional API keys: `Authorization: Bearer <key>` on every route except /health (and GETs of the chat page's
files), compared in constant time."""
from __future__ import annotations

import hashlib
import secrets

from server.errors import Unauthorized, error_response

OPEN_PATHS = frozenset({"/health"})


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class AuthMiddleware:
    """Pure ASGI middleware; with no keys configured it passes everything through (lm-eval's empty `Bearer ` too).

    Keys are compared as sha256 digests with secrets.compare_digest against every configured key, so neither the
    length nor the position of a mismatch leaks through timing. Preflight OPTIONS requests pass (CORS answers them),
    and so do GET and HEAD requests of the paths in open_get (the chat page and its files: a browser loads them
    before it can ask for a key).
    """

    def __init__(self, app, keys: tuple[str, ...], open_get: frozenset[str] = frozenset()):
        self.app = app
        self._digests = tuple(_digest(k) for k in keys)
        self._open_get = open_get

    async def __call__(self, scope, receive, send):
        if (scope["type"] != "http" or not self._digests or scope["method"] == "OPTIONS"
                or scope["path"] in OPEN_PATHS
                or (scope["method"] in ("GET", "HEAD") and scope["path"] in self._open_get)
                or self.allowed(scope)):
            await self.app(scope, receive, send)
            return
        response = error_response(Unauthorized("invalid or missing API key; send 'Authorization: Bearer <key>'"))
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)

    def allowed(self, scope) -> bool:
        token = None
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, rest = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer":
                    token = rest.strip()
                break
        if not token:
            return False
        digest = _digest(token)
        ok = False
        for expected in self._digests:
            ok |= secrets.compare_digest(digest, expected)
        return ok

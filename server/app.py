"""create_app(engine, settings): the FastAPI app, its lifespan (start, load, drain), middleware and handlers."""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.metadata
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import FastAPI
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

from engine import ChatTemplate, acall_in_new_thread
from server import errors
from server.auth import AuthMiddleware
from server.metrics import Metrics
from server.middleware import LOOPBACK_NAMES, BodyLimitMiddleware, HostCheckMiddleware, RequestContextMiddleware
from server.settings import Settings, read_api_keys

log = logging.getLogger("goose.server")


def _version() -> str:
    try:
        return importlib.metadata.version("goose-rwkv")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


VERSION = _version()


@dataclass(frozen=True)
class ModelInfo:
    """What the server says about its model."""
    name: str
    """The model id of /v1/models and of requests' "model" field."""
    template: ChatTemplate = field(default_factory=ChatTemplate)
    created: int = field(default_factory=lambda: int(time.time()))
    description: str = ""
    """One line for the startup message: what was loaded, from where."""
    initial_states: tuple[str, ...] = ()
    """Names of the initial states (state-tuning files); each is also served as the model "<name>:<state>"."""


Loader = Callable[[], "tuple[object, ModelInfo]"]


class AppState:
    """Everything routes need, on app.state.goose. engine is None while the model loads."""

    def __init__(self, settings: Settings, engine=None, info: ModelInfo | None = None):
        self.settings = settings
        self.engine = engine
        self.info = info
        self.metrics = Metrics(lambda: self.engine)
        self.draining = False
        self.load_error: str | None = None
        self._stop: asyncio.Task | None = None
        self._fingerprint: tuple[object, str] | None = None

    @property
    def fingerprint(self) -> str:
        """OpenAI's system_fingerprint: the goose version and the engine's model identity and strategy."""
        if self._fingerprint is None or self._fingerprint[0] is not self.engine:
            digest = hashlib.sha256(f"{VERSION}|{self.engine.fingerprint}".encode()).hexdigest()
            self._fingerprint = (self.engine, f"fp_{digest[:16]}")
        return self._fingerprint[1]

    async def drain(self, timeout: float | None = None) -> None:
        """Stop admitting (503), let running requests finish up to timeout, abort the rest; idempotent."""
        self.draining = True
        if self.engine is None:
            return
        if self._stop is None:
            timeout = self.settings.server.shutdown_timeout if timeout is None else timeout
            self._stop = asyncio.ensure_future(self.engine.stop(drain_timeout=timeout))
        await asyncio.shield(self._stop)


def create_app(engine, settings: Settings | None = None, info: ModelInfo | None = None) -> FastAPI:
    """The app for an engine started in the lifespan; engine may instead be a Loader, run in a thread at startup
    (the server answers /health and readiness with 503 until it returns)."""
    settings = settings or Settings()
    loader = engine if callable(engine) and not hasattr(engine, "submit") else None
    state = AppState(settings, None if loader else engine, info)
    if state.engine is not None and state.info is None:
        state.info = ModelInfo(name="rwkv7")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        task = None
        if loader is None:
            state.engine.start()
        else:
            task = asyncio.ensure_future(_load(state, loader))
        try:
            yield
        finally:
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await state.drain()

    s = settings.server
    from server import ui
    assets = ui.load_assets() if s.ui else {}
    app = FastAPI(title="Goose", version=VERSION, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="OpenAI-compatible API for RWKV-7 models",
                  middleware=_middleware(state, open_get=frozenset(assets)))
    app.state.goose = state
    errors.install(app)
    from server.routes import router
    app.include_router(router)
    from server.responses import router as responses_router
    app.include_router(responses_router)
    if assets:
        app.include_router(ui.make_router(assets))
    app.openapi = lambda: _openapi(app, auth=bool(read_api_keys(s)))
    return app


def _middleware(state: AppState, open_get: frozenset[str] = frozenset()) -> list[Middleware]:
    """Outermost first: request id + metrics, CORS, Host guard, auth (open_get: paths GET needs no key for), body
    limit."""
    s = state.settings.server
    stack = [Middleware(RequestContextMiddleware, metrics=state.metrics)]
    if s.cors_origins:
        stack.append(Middleware(CORSMiddleware, allow_origins=list(s.cors_origins), allow_credentials=False,
                                allow_methods=["GET", "POST", "DELETE", "OPTIONS"], allow_headers=["*"],
                                expose_headers=["x-request-id", "retry-after"]))
    allowed = s.allowed_hosts or (LOOPBACK_NAMES if s.loopback else ("*",))
    stack.append(Middleware(HostCheckMiddleware, allowed=tuple(allowed)))
    stack.append(Middleware(AuthMiddleware, keys=read_api_keys(s), open_get=open_get))
    stack.append(Middleware(BodyLimitMiddleware, limit=s.max_body_bytes))
    return stack


async def _load(state: AppState, loader: Loader) -> None:
    t0 = time.perf_counter()
    try:
        # a thread that exits: its OpenMP team must not outlive the load (engine/model/threads.py)
        engine, info = await acall_in_new_thread(loader)
    except Exception as exc:  # noqa: BLE001 - any load failure (ModelLoadError, OSError, torch errors) is reported
        state.load_error = errors.sanitize(str(exc), paths=True)
        log.error("model load failed: %s", exc)
        print(f"goose serve: model load failed: {exc}", flush=True)
        return
    engine.start()
    state.info, state.engine = info, engine
    print(f"goose serve: loaded {info.description or info.name} in {time.perf_counter() - t0:.1f} s; "
          f"serving model {info.name!r}", flush=True)


def _openapi(app: FastAPI, *, auth: bool) -> dict:
    """FastAPI's schema, plus: no 422s, the SSE event schema of the streaming routes, and the bearer scheme on
    every guarded route when API keys are set."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        from server.routes import SSE_CHUNKS
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for path, ops in schema.get("paths", {}).items():
            for op in ops.values():
                op.get("responses", {}).pop("422", None)
                if auth and path != "/health":
                    op["security"] = [{"bearer": []}]
            if path in SSE_CHUNKS:
                ops["post"]["responses"]["200"]["content"]["text/event-stream"] = {
                    "schema": _sse_event_schema(SSE_CHUNKS[path], components)}
        if auth:
            schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        app.openapi_schema = schema
    return app.openapi_schema


def _sse_event_schema(chunk_model, components: dict) -> dict:
    """One SSE event: data is a JSON chunk, an error object, or the literal [DONE]."""
    chunk = chunk_model.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, definition in chunk.pop("$defs", {}).items():
        components.setdefault(name, definition)
    components.setdefault(chunk_model.__name__, chunk)
    payload = {"anyOf": [{"$ref": f"#/components/schemas/{chunk_model.__name__}"},
                         {"$ref": "#/components/schemas/ErrorResponse"}]}
    return {"type": "object", "required": ["data"], "properties": {
        "data": {"anyOf": [{"const": "[DONE]"},
                           {"type": "string", "contentMediaType": "application/json", "contentSchema": payload}]},
        "event": {"type": "string"}, "id": {"type": "string"}, "retry": {"type": "integer"}}}

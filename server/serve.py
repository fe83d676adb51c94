"""`goose serve` / `python -m server`: settings, uvicorn on 127.0.0.1:8000, the model loaded, a drain on SIGTERM."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

import yaml

from server.settings import ConfigError, Settings, load_settings, read_api_keys

PROJECT_CONFIG = Path(__file__).resolve().parent.parent / "config.yaml"
# flag -> (section, key); "append" flags collect a list
FLAGS = {
    "model": ("model", "path"), "tokenizer": ("model", "tokenizer"), "strategy": ("model", "strategy"),
    "wkv_backend": ("model", "wkv_backend"), "host": ("server", "host"), "port": ("server", "port"),
    "api_key": ("server", "api_keys"), "api_key_file": ("server", "api_key_file"),
    "served_model_name": ("server", "served_model_name"), "cors_origin": ("server", "cors_origins"),
    "allowed_host": ("server", "allowed_hosts"), "max_body_bytes": ("server", "max_body_bytes"),
    "request_timeout": ("server", "request_timeout"), "shutdown_timeout": ("server", "shutdown_timeout"),
    "embedding_pooling": ("server", "embedding_pooling"), "log_level": ("server", "log_level"),
    "max_sessions": ("engine", "max_sessions"), "max_waiting": ("engine", "max_waiting"),
    "max_prompt_tokens": ("engine", "max_prompt_tokens"), "threads": ("engine", "threads"),
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="goose serve", description="Serve an RWKV-7 model over the OpenAI API. "
                                 "Precedence: flags > GOOSE_<SECTION>_<KEY> environment > config file > defaults.")
    ap.add_argument("--config", help="config file (default: $GOOSE_CONFIG, ./config.yaml, else the project's)")
    ap.add_argument("--model", help="checkpoint file or directory (model.path)")
    ap.add_argument("--tokenizer", help="'world' or a tokenizer file/directory (model.tokenizer; with --model alone: "
                    "the model directory's tokenizer, else world)")
    ap.add_argument("--strategy", help="e.g. 'cpu fp32', 'cuda bf16' (model.strategy)")
    ap.add_argument("--wkv-backend", help="chunked, reference or triton (model.wkv_backend)")
    ap.add_argument("--host", help="interface to bind (server.host, default 127.0.0.1)")
    ap.add_argument("--port", type=int, help="TCP port (server.port, default 8000)")
    ap.add_argument("--api-key", action="append", help="accepted bearer token; repeatable (server.api_keys; "
                    "also $GOOSE_API_KEY, comma-separated)")
    ap.add_argument("--api-key-file", help="file with one API key per line (server.api_key_file)")
    ap.add_argument("--served-model-name", help="model id clients use (server.served_model_name)")
    ap.add_argument("--cors-origin", action="append", help="allowed CORS origin; repeatable (server.cors_origins)")
    ap.add_argument("--allowed-host", action="append", help="accepted Host header; repeatable (server.allowed_hosts)")
    ap.add_argument("--max-body-bytes", type=int, help="largest request body (server.max_body_bytes)")
    ap.add_argument("--request-timeout", type=float, help="seconds one generation may run (server.request_timeout)")
    ap.add_argument("--shutdown-timeout", type=float, help="seconds to drain on SIGTERM (server.shutdown_timeout)")
    ap.add_argument("--embedding-pooling", help="last or mean (server.embedding_pooling)")
    ap.add_argument("--log-level", help="debug, info, warning, error (server.log_level)")
    ap.add_argument("--max-sessions", type=int, help="state slots (engine.max_sessions)")
    ap.add_argument("--max-waiting", type=int, help="queued sequences before 429 (engine.max_waiting)")
    ap.add_argument("--max-prompt-tokens", type=int, help="longest prompt (engine.max_prompt_tokens)")
    ap.add_argument("--threads", type=int, help="CPU threads for model calls, 0 = one per CPU (engine.threads)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="any other setting, the value parsed as YAML; repeatable")
    return ap


def settings_from_args(args: argparse.Namespace, env=os.environ) -> Settings:
    overrides: dict[str, dict] = {}
    for flag, (section, key) in FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides.setdefault(section, {})[key] = value
    if args.model is not None and args.tokenizer is None:
        overrides["model"]["tokenizer"] = _tokenizer_for(args.model)
    for item in args.set:
        name, eq, raw = item.partition("=")
        section, dot, key = name.strip().partition(".")
        if not eq or not dot:
            raise ConfigError(f"flags: --set {item!r}: expected SECTION.KEY=VALUE")
        overrides.setdefault(section, {})[key] = yaml.safe_load(raw) if raw.strip() else raw
    config = args.config or env.get("GOOSE_CONFIG") or (
        "config.yaml" if Path("config.yaml").is_file() else PROJECT_CONFIG if PROJECT_CONFIG.is_file() else None)
    return load_settings(config, env=env, overrides=overrides)


def _tokenizer_for(model: str) -> str:
    """--model without --tokenizer: the model directory when it holds a tokenizer, else the RWKV World vocabulary."""
    path = Path(model)
    if path.is_dir() and any((path / n).is_file() for n in ("tokenizer.json", "rwkv_vocab_v20230424.txt")):
        return str(path)
    return "world"


def read_metadata(model_path: str) -> dict:
    """goose.json of a model directory ({} when there is none)."""
    from engine import ModelLoadError
    path = Path(model_path) / "goose.json"
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: cannot read model metadata: {exc}") from None
    if not isinstance(meta, dict):
        raise ModelLoadError(f"{path}: model metadata must be a JSON object")
    return meta


def load_engine(settings: Settings):
    """(AsyncEngine, ModelInfo) for settings.model; runs in a worker thread while the server answers 503."""
    from engine import AsyncEngine, ModelLoadError, load_model, load_tokenizer
    from engine import ChatTemplate
    from server.app import ModelInfo

    m = settings.model
    meta = read_metadata(m.path)
    try:
        template = ChatTemplate.from_metadata(meta)
    except (ValueError, TypeError) as exc:
        raise ModelLoadError(f"{m.path}: {exc}") from None
    tokenizer = load_tokenizer(m.tokenizer)
    if isinstance(meta.get("eot_id"), int) and meta["eot_id"] != tokenizer.eot_id:
        raise ModelLoadError(f"{m.path}: goose.json says eot_id {meta['eot_id']} but tokenizer {m.tokenizer} "
                             f"has {tokenizer.eot_id}")
    model = load_model(m.path, m.strategy, wkv_backend=m.wkv_backend)
    cfg = model.config
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ModelLoadError(f"tokenizer {m.tokenizer} has {tokenizer.vocab_size} ids but the model {m.path} only "
                             f"{cfg.vocab_size}; pass the model's tokenizer")
    name = settings.server.served_model_name or meta.get("name") or Path(m.path).stem
    description = (f"{m.path} ({cfg.n_layer} layers x {cfg.n_embd}, vocab {cfg.vocab_size}, {m.strategy}; "
                   f"tokenizer {tokenizer.name}; chat template {'goose.json' if meta.get('chat') else 'RWKV'}; "
                   f"kernels: linear {model.linear_backend}, decode {model.decode_kernel})")
    store = open_store(settings.states)
    engine = AsyncEngine(model, tokenizer, settings.engine, store=store)
    try:
        add_initial_states(engine, m.initial_states)
    except BaseException:
        store.close()
        raise
    if m.initial_states:
        description += f"; initial states: {', '.join(m.initial_states)}"
    return engine, ModelInfo(name=str(name), template=template, description=description,
                             initial_states=tuple(m.initial_states))


def open_store(config):
    """The StateStore of the `states` settings; ModelLoadError when a tier cannot be opened."""
    from engine import ModelLoadError, StateStore
    try:
        return StateStore(config)
    except ImportError:
        raise ModelLoadError("states.redis_url needs the redis client: pip install 'goose-rwkv[redis]'") from None
    except OSError as exc:
        raise ModelLoadError(f"states.disk_dir {config.disk_dir}: {exc.strerror or exc}") from None


def add_initial_states(engine, files: dict[str, str]) -> None:
    """Load each state-tuning file and register it under its name; a file that does not fit the model is refused
    with the file, the key and the shapes named (engine.load_state_file)."""
    from engine import ModelLoadError, load_state_file
    for name, path in files.items():
        state = load_state_file(path, engine.model_config)
        try:
            engine.states.add_initial(name, state)
        except ValueError as exc:
            raise ModelLoadError(f"model.initial_states: {exc}") from None


def _server_class():
    import uvicorn

    class GooseServer(uvicorn.Server):
        """uvicorn, but the first SIGTERM/SIGINT drains (503 to new requests, in-flight ones finish up to
        server.shutdown_timeout, then end with an error event) before uvicorn closes; a second SIGINT forces."""

        def __init__(self, config, state):
            super().__init__(config)
            self.state = state
            self.exit_code = 0
            self._signalled = False
            self._loop = None
            self._tasks = set()

        async def serve(self, sockets=None):
            self._loop = asyncio.get_running_loop()
            await super().serve(sockets)

        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                s = self.state.settings.server
                print(f"goose serve: listening on http://{_url_host(s.host)}:{s.port}/v1 "
                      f"(auth {'on' if read_api_keys(s) else 'off'}); loading {self.state.settings.model.path}",
                      flush=True)

        def handle_exit(self, sig, frame):
            if self._signalled or self._loop is None:
                self.force_exit = self.force_exit or sig == signal.SIGINT
                self.should_exit = True
                return
            self._signalled = True
            self._loop.call_soon_threadsafe(self._begin_drain, sig)

        def _begin_drain(self, sig):
            print(f"goose serve: {signal.Signals(sig).name}: draining for up to "
                  f"{self.state.settings.server.shutdown_timeout:g} s", flush=True)
            task = asyncio.ensure_future(self._drain())
            self._tasks.add(task)

        async def _drain(self):
            try:
                await self.state.drain()
            finally:
                self.should_exit = True

        async def on_tick(self, counter):
            if self.state.load_error and not self.should_exit:
                self.exit_code = 1
                self.should_exit = True
            return await super().on_tick(counter)

    return GooseServer


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
        keys = read_api_keys(settings.server)
    except ConfigError as exc:
        print(f"goose serve: {exc}", file=sys.stderr)
        return 2
    import uvicorn

    from engine import tune_malloc
    from server.app import create_app
    tune_malloc()                      # keep large temporaries mapped between steps (engine/model/allocator.py)
    s = settings.server
    logging.basicConfig(level=s.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(lambda: load_engine(settings), settings)
    config = uvicorn.Config(app, host=s.host, port=s.port, http="h11", lifespan="on", log_level=s.log_level,
                            timeout_graceful_shutdown=5, h11_max_incomplete_event_size=16 * 1024,
                            server_header=False, proxy_headers=False)
    server = _server_class()(config, app.state.goose)
    if not keys and not s.loopback:
        print(f"goose serve: warning: bound to {s.host} without API keys", file=sys.stderr, flush=True)
    server.run()
    if not server.started and server.exit_code == 0:
        return 1
    print(f"goose serve: stopped{' (model load failed)' if server.exit_code else ''}", flush=True)
    return server.exit_code


if __name__ == "__main__":
    sys.exit(main())

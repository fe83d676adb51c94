#!/usr/bin/env python3
"""Container probe: GET http://127.0.0.1:<port><path> and exit 0 on a 2xx answer, 1 otherwise.

    python /app/docker/healthcheck.py            # /health: liveness (Docker HEALTHCHECK, no API key needed)
    python /app/docker/healthcheck.py /ready     # readiness (Kubernetes exec probe; sends the API key)

The standard library only (slim images have no curl), and it does not import the server: that would import torch
and cost seconds of CPU on every probe. It reads the same settings the server does, from the environment and the
config file only (flags are invisible to it, so in containers configure the port and keys through GOOSE_* or
config.yaml):

- port: GOOSE_SERVER_PORT, else server.port of $GOOSE_CONFIG, else 8000;
- API key (sent as a bearer token; the server guards every route but /health): the first of GOOSE_API_KEY /
  GOOSE_SERVER_API_KEYS (comma-separated), else of server.api_keys in the file; else the first key of
  GOOSE_SERVER_API_KEY_FILE, else of server.api_key_file (relative to the config file's directory);
- Host header: the first entry of server.allowed_hosts (GOOSE_SERVER_ALLOWED_HOSTS, else the file) when that list
  is set and has no "*", so a Host allowlist never refuses the container's own probe.

tests/test_deploy.py checks these answers against server.settings for the same environment and file.
"""
from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_PORT = 8000
TIMEOUT_S = 4.0


def _config(env) -> tuple[dict, Path | None]:
    """server section of $GOOSE_CONFIG ({} when unset or unreadable) and the file's directory."""
    path = env.get("GOOSE_CONFIG")
    if not path:
        return {}, None
    try:
        import yaml  # installed with the server; the probe still works without it (env only)
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except Exception:  # noqa: BLE001 - a probe reports health, it does not validate configuration
        return {}, None
    server = data.get("server") if isinstance(data, dict) else None
    return (server if isinstance(server, dict) else {}), Path(path).parent


def _list(value) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value if str(v).strip()]
    return []


def _first_key_in(path: str, base: Path | None) -> str | None:
    p = Path(path)
    if not p.is_absolute() and base is not None:
        p = base / p
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    return next((ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")), None)


def probe_settings(env) -> tuple[int, str | None, str | None]:
    """(port, API key or None, Host header value or None) from the environment and $GOOSE_CONFIG."""
    server, base = _config(env)
    port = int(env.get("GOOSE_SERVER_PORT") or server.get("port") or DEFAULT_PORT)
    from_env = [name for name in env if name in ("GOOSE_API_KEY", "GOOSE_SERVER_API_KEYS")]
    # both name server.api_keys; like the loader, the one read last wins (even when empty: no keys)
    keys = _list(env[from_env[-1]]) if from_env else _list(server.get("api_keys"))
    key = keys[0] if keys else None
    if key is None:
        if "GOOSE_SERVER_API_KEY_FILE" in env:
            key_file, key_base = env["GOOSE_SERVER_API_KEY_FILE"], None
        else:
            key_file, key_base = server.get("api_key_file") or "", base
        key = _first_key_in(key_file, key_base) if key_file else None
    if "GOOSE_SERVER_ALLOWED_HOSTS" in env:
        hosts = _list(env["GOOSE_SERVER_ALLOWED_HOSTS"])
    else:
        hosts = _list(server.get("allowed_hosts"))
    host = hosts[0] if hosts and "*" not in hosts else None
    return port, key, host


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else "/health"
    port, key, host = probe_settings(os.environ)
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    if host:
        request.add_header("Host", f"{host}:{port}")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:  # fixed http://127.0.0.1 URL
            ok = 200 <= response.status < 300
            print(f"{path}: {response.status}")
    except urllib.error.HTTPError as exc:
        print(f"{path}: {exc.code}", file=sys.stderr)
        ok = False
    except (OSError, ValueError) as exc:
        print(f"{path}: {exc}", file=sys.stderr)
        ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))

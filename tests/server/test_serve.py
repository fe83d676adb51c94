"""`goose serve` as a real process on a loopback port: startup message, goose.json, a real socket, SIGTERM drain."""
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from bench.random_checkpoint import write_checkpoint
from server.serve import main
from tests.server.conftest import terminate
from tests.server.test_e2e import SHAPE


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def model_dir(tmp_path, bpe_path):
    d = tmp_path / "tiny-model"
    d.mkdir()
    write_checkpoint(d / "model.safetensors", SHAPE, seed=5)
    shutil.copy(bpe_path, d / "tokenizer.json")
    (d / "goose.json").write_text(json.dumps({
        "name": "tiny-goose", "eot_id": 0, "stop": ["\n\n", "\nQ:"],
        "chat": {"user": "Q", "assistant": "A", "system": "S", "separator": "\n\n", "generation_prompt": "A:"}}))
    return d


@pytest.mark.slow
def test_goose_serve_subprocess(tmp_path, model_dir):
    port = _free_port()
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(f"model:\n  path: tiny-model\n  tokenizer: tiny-model/tokenizer.json\n"
                   f"server:\n  port: {port}\n  shutdown_timeout: 1.0\n  api_keys: [k-1]\n"
                   f"engine:\n  max_sessions: 4\n  step_token_budget: 64\n")
    proc = subprocess.Popen([sys.executable, "-m", "goose.cli", "serve", "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": "Bearer k-1"}
    try:
        with httpx.Client(base_url=base, headers=auth, timeout=30) as http:
            for _ in range(600):
                try:
                    if http.get("/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None, "".join(lines)
                time.sleep(0.1)
            assert http.get("/v1/models").json()["data"][0]["id"] == "tiny-goose"
            assert httpx.get(f"{base}/v1/models").status_code == 401 and httpx.get(f"{base}/health").status_code == 200
            r = http.post("/v1/chat/completions", json={"model": "tiny-goose", "max_tokens": 4, "temperature": 0,
                                                        "messages": [{"role": "user", "content": "Hi"}]})
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["refusal"] is None
            body = {"prompt": "x", "max_tokens": 8000, "ignore_eos": True, "stream": True}
            with http.stream("POST", "/v1/completions", json=body) as stream:
                frames = stream.iter_lines()
                assert next(f for f in frames if f).startswith("data: {")
                proc.send_signal(signal.SIGTERM)
                rest = [f for f in frames if f]
            assert rest[-1] == "data: [DONE]" and "shutting_down" in rest[-2]
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=5)
    out = "".join(lines)
    assert f"listening on http://127.0.0.1:{port}/v1" in out and "loaded" in out and "tiny-goose" in out
    assert "SIGTERM: draining" in out and "stopped" in out and "Traceback" not in out


def test_serve_rejects_bad_config(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("server:\n  prot: 1\n")
    assert main(["--config", str(cfg)]) == 2
    assert "unknown key server.prot" in capsys.readouterr().err


def test_serve_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and "--api-key" in out and "GOOSE_" in out


def test_load_engine_reads_goose_json(model_dir):
    from server.serve import load_engine
    from server.settings import ModelSettings, Settings
    engine, info = load_engine(Settings(model=ModelSettings(path=str(model_dir), tokenizer=str(model_dir))))
    assert info.name == "tiny-goose" and info.template.user == "Q" and info.template.stop == ("\n\n", "\nQ:")
    assert engine.tokenizer.eot_id == 0 and "goose.json" in info.description
    assert f"decode {engine.model.decode_kernel}" in info.description


@pytest.mark.slow
def test_overload_answers_only_200_and_429(tmp_path, model_dir):
    """`goose serve --max-sessions 2 --max-waiting 4` under 200 concurrent requests: every answer is 200 or 429
    (never 5xx), /health stays 200 throughout, and a normal request is served afterwards."""
    import asyncio

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "goose.cli", "serve", "--model", str(model_dir / "model.safetensors"),
                             "--tokenizer", str(model_dir / "tokenizer.json"), "--port", str(port),
                             "--max-sessions", "2", "--max-waiting", "4", "--shutdown-timeout", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    base = f"http://127.0.0.1:{port}"

    async def load():
        limits = httpx.Limits(max_connections=260, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as http:
            for _ in range(600):
                try:
                    if (await http.get("/ready")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None, "".join(lines)
                await asyncio.sleep(0.1)
            health: list[int] = []
            done = asyncio.Event()

            async def probe():
                while not done.is_set():
                    health.append((await http.get("/health")).status_code)
                    await asyncio.sleep(0.05)

            async def one(i):
                body = {"prompt": f"request {i}", "max_tokens": 4, "stream": i % 2 == 1}
                r = await http.post("/v1/completions", json=body)
                return r.status_code, r.headers.get("retry-after")

            prober = asyncio.ensure_future(probe())
            answers = await asyncio.gather(*(one(i) for i in range(200)))
            done.set()
            await prober
            after = await http.post("/v1/completions", json={"prompt": "after", "max_tokens": 2})
            metrics = (await http.get("/metrics")).text
            return answers, health, after, metrics

    try:
        answers, health, after, metrics = asyncio.run(load())
    finally:
        terminate(proc)
    reader.join(timeout=5)
    statuses = [s for s, _ in answers]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) >= 2 and statuses.count(429) >= 1
    assert all(ra is not None and int(ra) >= 1 for s, ra in answers if s == 429)
    assert health and set(health) == {200}
    assert after.status_code == 200 and after.json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert "Traceback" not in "".join(lines)

"""Stored responses across real `goose serve` processes: a restart keeps them (the disk tier), and two servers
sharing one redis-server continue each other's conversations with the history cached."""
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from tests.server.test_serve import _free_port, model_dir  # noqa: F401 - model_dir is a fixture

pytestmark = pytest.mark.slow
MODEL = "tiny-goose"
GREEDY = {"model": MODEL, "temperature": 0, "max_output_tokens": 12}


class Goose:
    """`goose serve --config <file>` on a free loopback port, ready when /ready answers; stop() drains."""

    def __init__(self, tmp_path, model_dir, name: str, states: str):
        self.port = _free_port()
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(f"model:\n  path: {model_dir}\n  tokenizer: {model_dir}/tokenizer.json\n"
                       f"server:\n  port: {self.port}\n  shutdown_timeout: 2.0\n"
                       f"engine:\n  max_sessions: 4\n  step_token_budget: 64\nstates:\n{states}")
        self.proc = subprocess.Popen([sys.executable, "-m", "goose.cli", "serve", "--config", str(cfg)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stdout.readline, "")),
                                       daemon=True)
        self.reader.start()
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{self.base}/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert self.proc.poll() is None and time.monotonic() < deadline, "".join(self.lines)
            time.sleep(0.1)
        self.client = openai.OpenAI(base_url=f"{self.base}/v1", api_key="none", max_retries=0)

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.reader.join(timeout=5)
        out = "".join(self.lines)
        assert "Traceback" not in out, out
        return out


def history_of(r) -> int:
    return r.usage.input_tokens + r.usage.output_tokens - 1


def test_a_restart_keeps_stored_responses_on_disk(tmp_path, model_dir):  # noqa: F811
    states = f"  disk_dir: {tmp_path / 'states'}\n"
    a = Goose(tmp_path, model_dir, "a", states)
    try:
        r1 = a.client.responses.create(input="Good morning", **GREEDY)
        twin = a.client.responses.create(input="numbers", previous_response_id=r1.id, store=False, **GREEDY)
    finally:
        a.stop()
    b = Goose(tmp_path, model_dir, "b", states)
    try:
        assert b.client.responses.retrieve(r1.id).output_text == r1.output_text
        r2 = b.client.responses.create(input="numbers", previous_response_id=r1.id, **GREEDY)
        metrics = httpx.get(f"{b.base}/metrics").text
    finally:
        b.stop()
    assert r2.output_text == twin.output_text
    assert r2.usage.input_tokens_details.cached_tokens >= history_of(r1)
    assert 'goose_state_store_hits_total{tier="disk"}' in metrics


def test_two_servers_sharing_redis_continue_each_others_conversations(tmp_path, model_dir):  # noqa: F811
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
    pytest.importorskip("redis")
    from tests.test_state_redis import RedisServer
    redis = RedisServer(tmp_path)
    servers = []
    try:
        states = f"  redis_url: {redis.url}\n  redis_prefix: 'test:'\n"
        a, b = Goose(tmp_path, model_dir, "a", states), Goose(tmp_path, model_dir, "b", states)
        servers += [a, b]
        r1 = a.client.responses.create(input="Good morning", **GREEDY)
        on_a = a.client.responses.create(input="numbers", previous_response_id=r1.id, store=False, **GREEDY)
        on_b = b.client.responses.create(input="numbers", previous_response_id=r1.id, **GREEDY)
        assert on_b.output_text == on_a.output_text
        assert on_b.usage.input_tokens_details.cached_tokens >= history_of(r1)
        # a client that keeps its own history and sends all of it to either server gets the same
        items = [{"role": "user", "content": "Good morning"}, {"role": "assistant", "content": r1.output_text},
                 {"role": "user", "content": "numbers"}]
        whole = b.client.responses.create(input=items, store=False, **GREEDY)
        assert whole.output_text == on_a.output_text
        assert whole.usage.input_tokens_details.cached_tokens >= history_of(r1)
        chat = b.client.chat.completions.create(model=MODEL, messages=items, max_tokens=12, temperature=0)
        assert chat.usage.prompt_tokens_details.cached_tokens >= history_of(r1)
        # a plain chat conversation too: a's reply state is stored in Redis (in the background) ...
        before = len(redis.client.keys("test:*"))
        first = [{"role": "user", "content": "It is a truth"}]
        c1 = a.client.chat.completions.create(model=MODEL, messages=first, max_tokens=12, temperature=0)
        deadline = time.monotonic() + 10
        while len(redis.client.keys("test:*")) == before and time.monotonic() < deadline:
            time.sleep(0.05)
        # ... so b, sent the whole history, resumes after that reply
        history = first + [{"role": "assistant", "content": c1.choices[0].message.content},
                           {"role": "user", "content": "numbers"}]
        c2 = b.client.chat.completions.create(model=MODEL, messages=history, max_tokens=12, temperature=0)
        assert c2.usage.prompt_tokens_details.cached_tokens >= c1.usage.prompt_tokens + c1.usage.completion_tokens - 1
        # and a conversation continued on b continues on a
        r3 = a.client.responses.create(input="more", previous_response_id=on_b.id, **GREEDY)
        assert r3.usage.input_tokens_details.cached_tokens >= history_of(on_b)
        b.client.responses.delete(r3.id)
        with pytest.raises(openai.NotFoundError):
            a.client.responses.retrieve(r3.id)
    finally:
        for s in servers:
            s.stop()
        redis.stop()

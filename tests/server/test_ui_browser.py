"""The chat page in a real browser: Debian's chromium, driven by Playwright, against `goose serve` on the default model
with an API key. One server and one browser for the module; each test gets its own browser context (storage).

Screenshots go to $GOOSE_TEST_ARTIFACTS when set, else to the test's tmp_path.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import terminate

from tests.server.test_serve import _free_port

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium; .ci/run "
                                 "installs it)")]
KEY = "ui-browser-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
TIMEOUT_MS = 60_000     # generous: CI machines share their CPUs


@dataclass
class Server:
    url: str
    log: Path

    def slots_used(self) -> float:
        text = httpx.get(f"{self.url}/metrics", headers=AUTH, timeout=10).text
        return float(re.search(r"^goose_state_slots_used (\S+)$", text, re.MULTILINE).group(1))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`goose serve` on the default model (the repository's config.yaml), an API key, a free loopback port."""
    work = tmp_path_factory.mktemp("ui-serve")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GOOSE_")}
    log = work / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "goose.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                                 "--api-key", KEY, "--max-sessions", "4", "--shutdown-timeout", "2",
                                 "--threads", "1"],     # a tiny model; spare the CPUs the browser needs
                                cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "goose serve did not become ready:\n" + log.read_text()
            try:
                if httpx.get(f"{url}/ready", headers=AUTH, timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        yield Server(url, log)
    finally:
        terminate(proc)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


@dataclass
class Tab:
    page: object
    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)


@pytest.fixture
def tab(browser, server):
    """open(key=KEY, **context options) -> a Tab on the page with console errors and request URLs recorded."""
    contexts = []

    def open_(key: str | None = KEY, **options) -> Tab:
        context = browser.new_context(**options)
        context.set_default_timeout(TIMEOUT_MS)
        contexts.append(context)
        if key is not None:
            context.add_init_script(f"localStorage.setItem('goose.apiKey', {json.dumps(key)})")
        page = context.new_page()
        t = Tab(page)
        page.on("console", lambda m: t.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: t.errors.append(str(e)))
        page.on("request", lambda r: t.requests.append(r.url))
        page.goto(server.url + "/")
        return t

    yield open_
    for context in contexts:
        context.close()


@pytest.fixture
def artifacts(tmp_path) -> Path:
    folder = Path(os.environ["GOOSE_TEST_ARTIFACTS"]) if os.environ.get("GOOSE_TEST_ARTIFACTS") else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def models_loaded(page) -> None:
    page.locator("#model option").first.wait_for(state="attached")


def send(page, text: str, answers: int = 1) -> None:
    """Type text into the composer, press Enter, wait until answer number `answers` has its figures."""
    page.fill("#input", text)
    page.press("#input", "Enter")
    page.locator(".entry.assistant .stats").nth(answers - 1).wait_for()


# Samples the last answer's text length once per animation frame until its figures appear.
FRAME_SAMPLER = """() => {
  window.__lengths = [];
  const tick = () => {
    const last = document.querySelector('#transcript .entry.assistant:last-child');
    window.__lengths.push(last ? last.querySelector('.body').textContent.length : 0);
    if (!(last && last.querySelector('.stats'))) requestAnimationFrame(tick);
  };
  requestAnimationFrame(tick);
}"""


def test_page_loads_clean(tab, server):
    """Every model id is offered, no console error (a CSP violation would be one), no request leaves the origin."""
    t = tab()
    models_loaded(t.page)
    ids = [m["id"] for m in httpx.get(f"{server.url}/v1/models", headers=AUTH).json()["data"]]
    assert t.page.eval_on_selector_all("#model option", "els => els.map(e => e.value)") == ids
    assert t.page.locator("#key-prompt").is_hidden()
    t.page.reload()                      # the second load revalidates by ETag
    models_loaded(t.page)
    assert not t.errors, t.errors
    assert t.requests and all(u.startswith(server.url + "/") for u in t.requests), t.requests


def test_chat_streams_with_figures(tab):
    page = tab().page
    models_loaded(page)
    page.fill("#seed", "4")
    page.fill("#input", "first line")
    page.press("#input", "Shift+Enter")
    assert page.input_value("#input") == "first line\n" and page.locator(".entry").count() == 0
    page.evaluate(FRAME_SAMPLER)
    send(page, "Tell me about Mr. Darcy.")
    lengths = page.evaluate("window.__lengths")
    growing = [n for n in lengths if n]
    assert growing == sorted(growing) and len(set(growing)) >= 3, f"text did not stream: {lengths}"
    answer = page.locator(".entry.assistant").first
    assert answer.locator(".body").inner_text().strip()
    stats = answer.locator(".stats")
    assert re.search(r"first token \d+(\.\d+)? m?s", stats.inner_text())
    assert re.search(r"\d+\.\d tok/s", stats.inner_text())
    assert re.search(r"\b0 of \d+ prompt tokens cached", stats.inner_text())
    assert page.is_visible("#send") and page.is_hidden("#stop")
    # the next turn extends the first prompt: the server resumes from its cached state and says so
    send(page, "Why do you say so?", answers=2)
    cached = int(page.locator(".entry.assistant .stats").nth(1).get_attribute("data-cached"))
    assert cached > 0, page.locator(".entry.assistant .stats").nth(1).inner_text()


def test_stop_ends_the_request_and_frees_the_slot(tab, server):
    page = tab().page
    models_loaded(page)

    def long_text(route):       # the default model may end a text with <|endoftext|> at any token: not here
        route.continue_(post_data=json.dumps({**json.loads(route.request.post_data), "ignore_eos": True}))

    page.route("**/v1/completions", long_text)
    page.click("#mode-complete")
    page.fill("#max_tokens", "8000")
    page.fill("#input", "It is a truth universally acknowledged")
    page.press("#input", "Enter")
    page.wait_for_function("() => document.querySelector('.entry.run .continuation').textContent.length > 40")
    assert page.is_visible("#stop") and server.slots_used() >= 1
    page.click("#stop")
    page.locator(".entry.run .stats .stopped").wait_for()
    assert page.is_visible("#send") and page.is_hidden("#stop")
    deadline = time.monotonic() + 10
    while server.slots_used() != 0:
        assert time.monotonic() < deadline, "the state slot was not freed after Stop"
        time.sleep(0.1)
    shown = page.inner_text(".entry.run .continuation")
    time.sleep(0.3)
    assert page.inner_text(".entry.run .continuation") == shown        # nothing arrives after Stop
    assert page.input_value("#input") == "It is a truth universally acknowledged"   # kept for the next try


def test_api_key_prompt(tab):
    page = tab(key=None).page
    prompt = page.locator("#key-prompt")
    prompt.wait_for(state="visible")
    assert "This server needs an API key" in prompt.inner_text() and "401" in prompt.inner_text()
    page.fill("#key-input", "wrong-key")
    page.press("#key-input", "Enter")
    page.get_by_text("The server refused the key").wait_for()
    page.fill("#input", "Hello there")
    with page.expect_response(lambda r: r.url.endswith("/v1/chat/completions")) as refused:
        page.press("#input", "Enter")             # refused: the message comes back, the prompt stays
    assert refused.value.status == 401
    page.wait_for_function("() => document.querySelector('#input').value === 'Hello there'")
    page.get_by_text("The server refused the key").wait_for()
    assert page.locator(".entry").count() == 0
    page.fill("#key-input", KEY)
    page.press("#key-input", "Enter")
    prompt.wait_for(state="hidden")
    models_loaded(page)
    send(page, "Hello there")
    assert page.evaluate("localStorage.getItem('goose.apiKey')") == KEY
    assert page.locator(".entry.assistant .error").count() == 0


PAYLOAD = ['Look: <img src=x on', 'error="window.__pwned=1"> and <scr', 'ipt>window.__pwned=2</script>\n\n',
           '```html\n<img src=x onerror=window.__pwned=3>\n```\n\n<b>bold?</b> <a href="javascript:alert(1)">x</a>']


def _fake_stream(route):
    """An OpenAI chat stream carrying HTML (split inside tags), with CRLF line ends as sse-starlette writes them."""
    base = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 0, "model": "rwkv7-austen"}
    chunks = [{**base, "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]} for p in PAYLOAD]
    chunks.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    chunks.append({**base, "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 30, "total_tokens": 35}})
    body = "".join(f"data: {json.dumps(c)}\r\n\r\n" for c in chunks) + ": keep-alive\r\n\r\ndata: [DONE]\r\n\r\n"
    route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=body)


def test_model_html_is_text(tab):
    page = tab().page
    models_loaded(page)
    page.route("**/v1/chat/completions", _fake_stream)
    send(page, "Say something dangerous.")
    body = page.locator(".entry.assistant .body")
    text = body.inner_text()
    assert '<img src=x onerror="window.__pwned=1">' in text and "<script>window.__pwned=2</script>" in text
    assert '<b>bold?</b> <a href="javascript:alert(1)">x</a>' in text
    assert body.locator("pre code").inner_text() == "<img src=x onerror=window.__pwned=3>"
    assert page.locator("#transcript img, #transcript script, #transcript b, #transcript a").count() == 0
    page.wait_for_timeout(200)
    assert page.evaluate("window.__pwned") is None
    stats = page.locator(".entry.assistant .stats")
    assert "0 of 5 prompt tokens cached" in stats.inner_text()        # no prompt_tokens_details: 0


def test_phone_width(tab, artifacts):
    """At 390 x 844, light and dark: settings fold away, nothing overflows sideways, the composer stays on screen."""
    for scheme in ("light", "dark"):
        page = tab(viewport={"width": 390, "height": 844}, color_scheme=scheme, is_mobile=True, has_touch=True).page
        models_loaded(page)
        assert page.is_hidden("#settings")
        page.click("#toggle-settings")
        page.fill("#seed", "4")
        page.click("#toggle-settings")
        assert page.is_hidden("#settings")
        send(page, "Tell me about Mr. Darcy.")
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        for selector in ("#input", "#send", "#model"):
            box = page.locator(selector).bounding_box()
            assert box["x"] >= 0 and box["x"] + box["width"] <= 390 and box["y"] + box["height"] <= 844, selector
        shot = artifacts / f"chat-phone-{scheme}.png"
        page.screenshot(path=str(shot))
        assert shot.stat().st_size > 10_000

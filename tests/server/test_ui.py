"""The chat page's routes (FakeEngine, in-process): headers, ETags, server.ui, API keys, and the files themselves
(no inline script or style, no HTML from model text, nothing from another origin, all shipped as package data)."""
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:        # Python 3.10
    import tomli as tomllib

from server import ui
from server.settings import load_settings
from tests.server.conftest import make_settings, serve

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parents[2]
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
KEY = "ui-key"


class _Page(HTMLParser):
    """The elements and attributes of index.html."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.script_text = ""

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        if self.tags and self.tags[-1][0] == "script":
            self.script_text += data.strip()


def _page() -> _Page:
    page = _Page()
    page.feed((ui.UI_DIR / "index.html").read_text(encoding="utf-8"))
    return page


def _linked(page: _Page) -> set[str]:
    """The same-origin URLs index.html loads (relative to /)."""
    return {"/" + a[k] for _, a in page.tags for k in ("src", "href") if k in a}


def _assert_headers(r, content_type: str):
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith(content_type)
    assert r.headers["content-security-policy"] == CSP
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["referrer-policy"] == "no-referrer"
    assert r.headers["cache-control"] == "no-cache"
    assert re.fullmatch(r'"[0-9a-f]{32}"', r.headers["etag"])


async def test_page_and_assets_headers(fake):
    types = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
    async with serve(fake) as client:
        r = await client.get("/")
        _assert_headers(r, "text/html")
        assert "<title>Goose</title>" in r.text
        linked = _linked(_page())
        assert {"/ui/app.js", "/ui/style.css", "/ui/icon.svg"} <= linked
        for path in linked:
            _assert_headers(await client.get(path), types[Path(path).suffix])
        for module in re.findall(r'from "\./([\w.]+)"', (ui.UI_DIR / "app.js").read_text(encoding="utf-8")):
            _assert_headers(await client.get(f"/ui/{module}"), "text/javascript")
        assert (await client.head("/ui/app.js")).status_code == 200


async def test_etag_revalidation(fake):
    async with serve(fake) as client:
        etag = (await client.get("/ui/app.js")).headers["etag"]
        again = await client.get("/ui/app.js", headers={"If-None-Match": etag})
        assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
        assert again.headers["content-security-policy"] == CSP
        assert (await client.get("/ui/app.js", headers={"If-None-Match": f'W/{etag}, "x"'})).status_code == 304
        assert (await client.get("/ui/app.js", headers={"If-None-Match": '"stale"'})).status_code == 200
        assert (await client.get("/")).headers["etag"] != etag


async def test_unknown_asset_is_openai_404(fake):
    async with serve(fake) as client:
        for path in ("/ui/nope.js", "/ui/../settings.py", "/ui/", "/index.html"):
            r = await client.get(path)
            assert r.status_code == 404, path
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}


async def test_ui_off_is_404(fake):
    async with serve(fake, make_settings(ui=False)) as client:
        for path in ("/", "/ui/app.js"):
            r = await client.get(path)
            assert r.status_code == 404
            assert r.json()["error"] == {"message": f"no route GET {path}", "type": "not_found_error",
                                         "param": None, "code": "not_found"}
        assert (await client.get("/v1/models")).status_code == 200


async def test_page_loads_without_key_but_v1_needs_it(fake):
    async with serve(fake, make_settings(api_keys=(KEY,))) as client:
        for path in ("/", "/ui/app.js", "/ui/style.css"):
            assert (await client.get(path)).status_code == 200, path
        assert (await client.head("/")).status_code == 200
        assert (await client.get("/v1/models")).status_code == 401
        assert (await client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})).status_code == 200
        assert (await client.get("/ui/nope.js")).status_code == 401      # only the page's files are open
        assert (await client.post("/")).status_code == 401
        r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 401
    async with serve(fake, make_settings(api_keys=(KEY,), ui=False)) as client:
        assert (await client.get("/")).status_code == 401                # as before the page existed


async def test_page_is_not_in_the_openapi_schema(fake):
    async with serve(fake) as client:
        paths = (await client.get("/openapi.json")).json()["paths"]
        assert "/" not in paths and not any(p.startswith("/ui") for p in paths)


def test_setting_layers(tmp_path):
    assert load_settings(None).server.ui is True
    assert load_settings(None, env={"GOOSE_SERVER_UI": "false"}).server.ui is False
    assert load_settings(None, overrides={"server": {"ui": False}}).server.ui is False
    f = tmp_path / "c.yaml"
    f.write_text("server:\n  ui: off\n")
    assert load_settings(f).server.ui is False


def test_no_inline_script_or_style():
    """The CSP forbids inline code; the page would break (and the browser tests see a console error) if any
    crept in."""
    page = _page()
    assert page.script_text == ""
    for tag, attrs in page.tags:
        assert tag != "style", "inline <style>"
        assert "style" not in attrs, f"style attribute on <{tag}>"
        assert not [a for a in attrs if a.startswith("on")], f"inline handler on <{tag}>"
        if tag == "script":
            assert attrs.get("src"), "inline <script>"
    for url in _linked(page):
        assert not re.match(r"/(https?:)?//", url), f"{url} is not same-origin"


def test_model_text_never_becomes_html():
    """No API that parses HTML in the page's scripts; model text goes through textContent and text nodes."""
    for path in ui.UI_DIR.glob("*.js"):
        source = path.read_text(encoding="utf-8")
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                     "createContextualFragment", "DOMParser"):
            assert sink not in source, f"{path.name} uses {sink}"
        assert not re.search(r"https?://", source), f"{path.name} names another origin"
    css = (ui.UI_DIR / "style.css").read_text(encoding="utf-8")
    assert "@import" not in css and not re.search(r"url\(\s*['\"]?(https?:)?//", css)


def test_ui_files_are_package_data():
    """An installed wheel (the Docker image) serves the page: pyproject ships every file of server/ui."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    globs = project["tool"]["setuptools"]["package-data"]["server"]
    shipped = {p for g in globs for p in (ROOT / "server").glob(g)}
    assert set(ui.UI_DIR.iterdir()) <= shipped
    assert set(ui.load_assets()) == {"/"} | {f"/ui/{p.name}" for p in ui.UI_DIR.iterdir() if p.name != "index.html"}

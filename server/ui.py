"""The chat page: GET / and its files under /ui/, read once from server/ui/, served with a strict CSP and ETags."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import Response

from server.errors import NotFound

UI_DIR = Path(__file__).resolve().parent / "ui"
INDEX = "index.html"
CONTENT_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml",
                 ".png": "image/png"}
# Nothing inline, nothing from another origin: a model reply that slipped into the DOM as HTML could run nothing.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Cache-Control": "no-cache"}       # revalidate every load (cheap: 304 by ETag), so upgrades show at once


@dataclass(frozen=True)
class Asset:
    body: bytes
    media_type: str
    etag: str


def load_assets(folder: Path = UI_DIR) -> dict[str, Asset]:
    """{URL path: asset}: "/" for index.html, "/ui/<name>" for every other file of folder (not recursive)."""
    assets = {}
    for path in sorted(folder.iterdir()):
        media_type = CONTENT_TYPES.get(path.suffix)
        if media_type is None or not path.is_file():
            continue
        body = path.read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        assets["/" if path.name == INDEX else f"/ui/{path.name}"] = Asset(body, media_type, etag)
    if "/" not in assets:
        raise FileNotFoundError(f"{folder / INDEX} is missing (is the package installed with its data files?)")
    return assets


def make_router(assets: dict[str, Asset]) -> APIRouter:
    """GET (and HEAD) routes for assets; left out of the OpenAPI schema (the page is not part of the API)."""
    router = APIRouter(include_in_schema=False)

    def respond(path: str, request: Request) -> Response:
        asset = assets.get(path)
        if asset is None:
            raise NotFound(f"no route GET {path[:200]}")
        headers = {**HEADERS, "ETag": asset.etag}
        tags = _etags(request.headers.get("if-none-match", ""))
        if asset.etag in tags or "*" in tags:
            return Response(status_code=304, headers=headers)
        return Response(asset.body, media_type=asset.media_type, headers=headers)

    @router.api_route("/", methods=["GET", "HEAD"])
    async def page(request: Request):
        return respond("/", request)

    @router.api_route("/ui/{name}", methods=["GET", "HEAD"])
    async def asset(name: str, request: Request):
        return respond(f"/ui/{name}", request)

    return router


def _etags(header: str) -> set[str]:
    """The entity tags of an If-None-Match header, weak ones compared as strong (RFC 9110 weak comparison)."""
    return {tag.strip().removeprefix("W/") for tag in header.split(",") if tag.strip()}

"""The server's own pages: a small index at `/` and the Playground at `/playground`.

Plain HTML, CSS and an ES module shipped in the package (`static/`), served as they are: no build
step. The pages only call the public REST API, with the account and token the user enters.
"""

from __future__ import annotations

import html
from functools import cache
from importlib import resources

from fastapi import APIRouter, Request
from starlette.responses import HTMLResponse, Response

from loraserve.api.context import get_context
from loraserve.errors import RouteNotFound

router = APIRouter()

ASSETS = {
    "playground.js": "text/javascript; charset=utf-8",
    "playground.css": "text/css; charset=utf-8",
}
# Everything comes from this origin; no inline script or style is needed by the pages.
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}


@cache
def asset(name: str) -> bytes:
    return resources.files("loraserve.api").joinpath("static", name).read_bytes()


@router.get("/", include_in_schema=False)
async def index(request: Request) -> HTMLResponse:
    models = "".join(f"<li><code>{html.escape(m)}</code></li>" for m in sorted(get_context(request).backends))
    page = f"""<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>loraserve</title>
  <link rel="stylesheet" href="/playground/playground.css">
</head>
<body>
  <header class="topbar"><a class="brand" href="/">loraserve</a>
    <span class="title">A Workers AI-compatible server for one base model and many LoRA \
finetunes</span></header>
  <main class="layout index">
    <section class="panel">
      <h2>Pages</h2>
      <ul>
        <li><a href="/playground">Playground</a>: run a model with or without a finetune, watch it stream,
          get the same request as curl and Python, upload a finetune.</li>
        <li><a href="/metrics">Metrics</a> (Prometheus)</li>
        <li><a href="/healthz">Health</a></li>
      </ul>
    </section>
    <section class="panel">
      <h2>Models served</h2>
      <ul>{models}</ul>
      <p class="muted">REST: <code>/client/v4/accounts/{{account_id}}/ai/run/{{model}}</code> ·
        OpenAI: <code>/client/v4/accounts/{{account_id}}/ai/v1</code></p>
    </section>
  </main>
</body>
</html>
"""
    return HTMLResponse(page, headers=SECURITY_HEADERS)


@router.get("/playground", include_in_schema=False)
async def playground() -> Response:
    return Response(asset("playground.html"), media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)


@router.get("/playground/{name}", include_in_schema=False)
async def playground_asset(request: Request, name: str) -> Response:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise RouteNotFound(request.url.path)
    return Response(asset(name), media_type=media_type, headers=SECURITY_HEADERS)

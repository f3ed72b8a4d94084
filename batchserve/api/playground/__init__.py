"""The playground: one static page (GET /) that streams before, after and amplified side by side.

Plain HTML, CSS and JavaScript shipped as package data: no build step and nothing fetched from
elsewhere, so it works on an offline machine. The page talks to the server's own streaming
route (/generate_lda with `"stream": true`), once per column.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response


@cache
def _page() -> str:
    return resources.files(__name__).joinpath("index.html").read_text(encoding="utf-8")


async def page(request: Request) -> Response:
    return HTMLResponse(_page())

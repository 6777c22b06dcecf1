"""The page at ``/``: calibrated long-tailed predictions, priors and expert disagreement in a browser.

The page is one HTML file, ``static/index.html``, with plain JavaScript and CSS inline. It is
shipped as package data and needs no CDN and no build step. It reads ``GET /info`` and asks
``POST /predict``, and talks to nothing else: its Content-Security-Policy allows only its own
inline script and style (pinned by hash), images made in the page (``blob:``/``data:``) and
requests to this server. The browser therefore refuses any other request. The page is open,
like ``/docs``. With auth on, it asks for the key and sends it in the ``X-API-Key`` header,
never in the URL. ``ltzoo serve --no-ui`` leaves ``/`` without a route (404).

Example:
    >>> from fastapi import FastAPI
    >>> app = FastAPI()
    >>> add_ui(app)
    >>> [r.path for r in app.routes if getattr(r, "path", None) == UI_PATH]
    ['/']
"""

from __future__ import annotations

import base64
import hashlib
import importlib.resources
import re

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

#: where the page is served (in place of LitServe's "litserve running" text)
UI_PATH = "/"
#: the page, inside this package
PAGE_FILE = "static/index.html"


def page_html() -> str:
    """The page's HTML, read from the package data."""
    package = __name__.rpartition(".")[0]  # "ltzoo.serve"
    return (importlib.resources.files(package) / PAGE_FILE).read_text(encoding="utf-8")


def _hash_sources(html: str, tag: str) -> str:
    """CSP sources that allow exactly the inline ``<tag>`` blocks of ``html``."""
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
    digests = [base64.b64encode(hashlib.sha256(b.encode()).digest()).decode() for b in blocks]
    return " ".join(f"'sha256-{d}'" for d in digests) or "'none'"


def content_security_policy(html: str) -> str:
    """The page's policy: its own inline script and style, local images, requests to this server."""
    return "; ".join(
        (
            "default-src 'none'",
            f"script-src {_hash_sources(html, 'script')}",
            f"style-src {_hash_sources(html, 'style')}",
            "img-src blob: data:",
            "connect-src 'self'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        )
    )


def add_ui(app: FastAPI, enabled: bool = True) -> None:
    """Serve the page at :data:`UI_PATH`, open (no API key), left out of the OpenAPI document.

    Any route already at ``/`` (LitServe's "litserve running") is removed first, so with
    ``enabled=False`` there is no ``/`` at all.
    """
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) != UI_PATH]
    if not enabled:
        return
    html = page_html()
    headers = {
        "Content-Security-Policy": content_security_policy(html),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",
    }

    async def ui_page() -> HTMLResponse:
        return HTMLResponse(html, headers=headers)

    app.add_api_route(UI_PATH, ui_page, methods=["GET"], include_in_schema=False)

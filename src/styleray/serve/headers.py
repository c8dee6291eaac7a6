"""Security headers on every response, and the Content-Security-Policy of the HTML pages.

Every response says ``X-Content-Type-Options: nosniff`` (an image is never sniffed into HTML),
``X-Frame-Options: DENY`` (no clickjacking), ``Referrer-Policy: no-referrer`` and, unless a page sets its own,
a CSP that lets nothing load or run. The explorer page's CSP allows exactly its own inline script (by its
SHA-256), its inline styles, same-origin requests and the ``blob:`` images it makes.
"""

from __future__ import annotations

import base64
import hashlib
import re

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
COMMON = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


def page_csp(html: str) -> str:
    """A CSP for ``html`` that allows its inline scripts (by hash) and styles, and nothing from elsewhere."""
    hashes = [
        "'sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() + "'"
        for script in re.findall(r"<script>(.*?)</script>", html, flags=re.S)
    ]
    script_src = " ".join(hashes) or "'none'"
    return (
        f"default-src 'none'; script-src {script_src}; "
        "style-src 'unsafe-inline'; img-src 'self' blob: data:; connect-src 'self'; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    )


class SecurityHeaders:
    """ASGI middleware: add the common headers, and the API CSP where a response has none."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in COMMON.items():
                    headers.setdefault(name, value)
                headers.setdefault("Content-Security-Policy", API_CSP)
            await send(message)

        await self.app(scope, receive, send_with_headers)

"""Two pure ASGI middlewares (no ``BaseHTTPMiddleware``, which breaks ``contextvars`` propagation):
a per-request CSP nonce with the security headers, and optional basic-auth / bearer-token access control."""

from __future__ import annotations

import base64
import binascii
import hmac
import secrets

from starlette.datastructures import Headers
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qc_daemon.settings import HttpSettings

OPEN_PATHS = frozenset({"/health"})  # systemd, load balancers and monitoring probe it without credentials


class SecurityHeaders:
    """Puts a fresh nonce in ``request.state.csp_nonce`` and sends the CSP that allows only it for scripts."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        nonce = secrets.token_urlsafe(16)
        scope.setdefault("state", {})["csp_nonce"] = nonce
        policy = (
            f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'self'; img-src 'self' data:; "
            "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
        )

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] += [
                    (b"content-security-policy", policy.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"x-frame-options", b"DENY"),
                ]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class AccessGuard:
    """When ``[http]`` sets a login or token, every path but :data:`OPEN_PATHS` needs one of them."""

    def __init__(self, app: ASGIApp, settings: HttpSettings):
        self.app = app
        self.basic = (
            (settings.username + ":" + settings.password.get_secret_value()).encode() if settings.username else None
        )
        self.token = settings.token.get_secret_value().encode() or None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or self._allowed(Headers(scope=scope)):
            await self.app(scope, receive, send)
            return
        challenge = {"WWW-Authenticate": 'Basic realm="qc-daemon", charset="UTF-8"'} if self.basic else {}
        await PlainTextResponse("login required\n", status_code=401, headers=challenge)(scope, receive, send)

    def _allowed(self, headers: Headers) -> bool:
        if self.basic is None and self.token is None:
            return True
        scheme, _, credentials = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and self.token is not None:
            return hmac.compare_digest(credentials.strip().encode(), self.token)
        if scheme.lower() == "basic" and self.basic is not None:
            try:
                decoded = base64.b64decode(credentials.strip(), validate=True)
            except (binascii.Error, ValueError):
                return False
            return hmac.compare_digest(decoded, self.basic)
        return False

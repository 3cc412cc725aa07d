"""The gateway's ASGI middleware: what every request goes through before a route sees it.

Pure ASGI rather than Starlette's BaseHTTPMiddleware, so streamed responses and client
disconnects pass through untouched.
"""

from __future__ import annotations

import hmac
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import GatewayError, unauthorized

MAX_BODY_BYTES = 8 * 1024 * 1024  # far above any prompt that fits a context window
# Routes that cost compute or reveal the model need the key; probes (/health, /ready) and the API's
# description (/openapi.json, /docs) must work without it.
GUARDED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")


class RequestContext:
    """The x-request-id (echoed, or made up) on every response, and the API key check, done before
    the body is read so an unauthenticated client cannot make the gateway buffer 8 MiB."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        request_id = headers.get("x-request-id") or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["x-request-id"] = request_id
            await send(message)

        path = scope["path"]
        guarded = path == "/v1" or path.startswith(GUARDED_PREFIXES)
        if self.api_key and guarded and not self._authorized(headers):
            await unauthorized().response()(scope, receive, send_with_id)
            return
        await self.app(scope, receive, send_with_id)

    def _authorized(self, headers: Headers) -> bool:
        assert self.api_key is not None
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        )


class BodyGuard:
    """Reads a request body whole, refusing one over `limit` bytes (413) or one that is not UTF-8
    (400, which JSON requires), then hands it on. FastAPI would read it whole anyway; reading it
    here means a huge body is cut off while it arrives, not after."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            await self._too_large(int(declared)).response()(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._too_large(size).response()(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as e:
            error = GatewayError(f"The request body is not valid UTF-8 (byte {e.start}).")
            await error.response()(scope, receive, send)
            return

        replayed = False

        async def replay() -> Message:
            # The body once, then the real channel: routes still see http.disconnect.
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _too_large(self, size: int) -> GatewayError:
        return GatewayError(
            f"The request body is {size} bytes or more; the limit is {self.limit} bytes.",
            status=413,
            code="request_too_large",
        )

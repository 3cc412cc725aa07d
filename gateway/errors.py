"""OpenAI's error envelope, and how every failure the gateway sees is mapped onto it.

Clients (the official SDKs included) pick their exception class from the HTTP status and read
`{"error": {"message", "type", "param", "code"}}`; so a bad request is always a 400 naming the
parameter, never FastAPI's default 422 with its own body shape.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("pagemesh.gateway")


class GatewayError(Exception):
    """An error to send to the client as OpenAI's envelope."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        status: int = 400,
        type: str = "invalid_request_error",
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.type = type
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> Response:
        # ensure_ascii: a message may quote the client's input, lone surrogates included, which
        # UTF-8 cannot encode; escaped, any string is valid JSON.
        return Response(
            json.dumps(self.body(), ensure_ascii=True),
            status_code=self.status,
            headers=self.headers,
            media_type="application/json",
        )


def unauthorized() -> GatewayError:
    return GatewayError("Incorrect or missing API key.", status=401, code="invalid_api_key")


def _loc_path(loc: tuple[int | str, ...]) -> str:
    """('body', 'messages', 0, 'content') -> 'messages[0].content'."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def from_validation_error(exc: RequestValidationError) -> GatewayError:
    """The first of pydantic's errors, as a 400 naming the parameter."""
    errors = exc.errors()
    if not errors:
        return GatewayError("Invalid request.")
    first = errors[0]
    loc = tuple(first.get("loc", ()))
    if loc and loc[0] == "body":
        loc = loc[1:]
    msg = str(first.get("msg", "invalid value"))
    if first.get("type") == "json_invalid":
        return GatewayError(f"The request body is not valid JSON: {first.get('ctx', {}).get('error', msg)}")
    if not loc:  # the body itself: missing, or not an object
        return GatewayError(f"The request body is invalid: {msg}")
    path = _loc_path(loc)
    return GatewayError(f"{path}: {msg}", param=path)


_LEADING_NAME = re.compile(r"^([a-z][a-z0-9_]*)\b")


def param_from_message(message: str, names: Mapping[str, str]) -> str | None:
    """The scheduler's messages start with the parameter's name ("top_p must be in (0, 1]");
    `names` maps the engine's names to this endpoint's (chat's max_completion_tokens...)."""
    m = _LEADING_NAME.match(message)
    return names.get(m.group(1)) if m else None


def from_grpc_error(exc: grpc.aio.AioRpcError, names: Mapping[str, str] | None = None) -> GatewayError:
    code = exc.code()
    details = exc.details() or code.name
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return GatewayError(details, param=param_from_message(details, names or {}))
    if code == grpc.StatusCode.NOT_FOUND:  # the only NOT_FOUND the scheduler sends: an unknown model
        return GatewayError(details, param="model", status=404, code="model_not_found")
    if code == grpc.StatusCode.ALREADY_EXISTS:  # a reused x-request-id
        return GatewayError(details, param="x-request-id", status=409, code="request_id_in_use")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        retry_after = "1"
        for key, value in exc.trailing_metadata() or ():
            if key == "retry-after":
                retry_after = str(value)
        return GatewayError(
            details,
            status=429,
            type="rate_limit_error",
            code="rate_limit_exceeded",
            headers={"Retry-After": retry_after},
        )
    if code == grpc.StatusCode.UNAVAILABLE:
        return GatewayError(
            f"The scheduler is unavailable: {details}",
            status=503,
            type="server_error",
            code="service_unavailable",
        )
    return GatewayError(f"{code.name}: {details}", status=500, type="server_error")


def internal_error() -> GatewayError:
    """A bug of ours: the client learns that much, the log gets the traceback."""
    return GatewayError("The server had an internal error.", status=500, type="server_error")


def install_error_handlers(app: FastAPI) -> None:
    async def on_gateway_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, GatewayError)
        return exc.response()

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return from_validation_error(exc).response()

    async def on_grpc_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, grpc.aio.AioRpcError)
        return from_grpc_error(exc).response()

    async def on_http_error(request: Request, exc: Exception) -> Response:
        # Unknown routes and wrong methods, in the same envelope as everything else.
        assert isinstance(exc, StarletteHTTPException)
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return GatewayError(
            str(exc.detail), status=exc.status_code, type=kind, headers=exc.headers
        ).response()

    async def on_anything_else(request: Request, exc: Exception) -> Response:
        # Still OpenAI's envelope, so SDKs raise InternalServerError with a message, not a parse error.
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return internal_error().response()

    app.add_exception_handler(GatewayError, on_gateway_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(grpc.aio.AioRpcError, on_grpc_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_anything_else)

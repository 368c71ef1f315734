"""The one error shape of the HTTP API, `{"error": {"message": ..., "type": ..., "param": ...}}`, and the handlers
that make every failure take it: the server's own errors (`ApiError`), the store's (`db.StoreError`), request
validation (422 naming the field; 400 for a body that is not JSON), routing (404/405), an oversized body (413), and a
catch-all 500 that logs the traceback and shows none. The types follow OpenAI's error types where one fits, so
OpenAI clients report them sensibly."""

from __future__ import annotations

import json
import logging
from typing import Any

log = logging.getLogger("flythinker.serving")

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
         405: "invalid_request_error", 409: "conflict_error", 413: "request_too_large", 422: "invalid_request_error",
         429: "rate_limit_error", 500: "server_error", 503: "unavailable_error", 504: "timeout_error"}


class ApiError(Exception):
    """A failure the server reports with `status` and the JSON error body."""

    def __init__(self, status: int, message: str, type: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}
        self.type = type or TYPES.get(status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param)


def error_body(message: str, type: str, param: str | None = None) -> dict[str, Any]:
    err: dict[str, Any] = {"message": message, "type": type}
    if param is not None:
        err["param"] = param
    return {"error": err}


def error_bytes(status: int, message: str, type: str | None = None) -> bytes:
    return json.dumps(error_body(message, type or TYPES.get(status, "invalid_request_error"))).encode()


def _field(loc: tuple | list) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:] if len(parts) > 1 else parts
    return ".".join(parts)


def validation_message(errors: list[dict[str, Any]]) -> tuple[int, str, str | None]:
    """(status, message, first field) for pydantic/FastAPI validation errors."""
    if any(e.get("type") == "json_invalid" for e in errors):
        e = next(e for e in errors if e.get("type") == "json_invalid")
        detail = (e.get("ctx") or {}).get("error")
        return 400, f"request body is not valid JSON{f' ({detail})' if detail else ''}", None
    parts = []
    for e in errors[:3]:
        loc = tuple(e.get("loc") or ())
        if loc == ("body",) and e.get("type") == "missing":
            parts.append("request body: a JSON object is required")
            continue
        if loc == ("body",) and e.get("type") in ("model_attributes_type", "dict_type", "model_type"):
            parts.append("request body: expected a JSON object (sent with Content-Type: application/json)")
            continue
        msg = e.get("msg", "invalid value")
        parts.append(f"{_field(loc)}: {msg[0].lower() + msg[1:] if msg else msg}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    first = _field(errors[0].get("loc") or ()) if errors else None
    return 422, "; ".join(parts) + more, first


def install_error_handlers(app: Any) -> None:
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from .db import StoreError

    def respond(status: int, message: str, type: str | None = None, param: str | None = None,
                headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(error_body(message, type or TYPES.get(status, "invalid_request_error"), param),
                            status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api(_request, exc: ApiError):
        return respond(exc.status, exc.message, exc.type, exc.param, exc.headers)

    @app.exception_handler(StoreError)
    async def _store(_request, exc: StoreError):
        return respond(exc.status, str(exc), exc.kind)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request, exc: RequestValidationError):
        status, message, param = validation_message(list(exc.errors()))
        return respond(status, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return respond(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):
        log.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
        return respond(500, "internal server error (see the server log)", "server_error")


class BodyLimit:
    """ASGI middleware: refuse a request body over `max_bytes` with 413 before the app reads it (counting the bytes
    actually received, so a missing or false Content-Length does not get around it)."""

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def _refuse(self, send: Any) -> None:
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
        await send({"type": "http.response.body",
                    "body": error_bytes(413, f"request body exceeds {self.max_bytes} bytes", "request_too_large")})

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers") or []:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_bytes:
                    await self._refuse(send)
                    return
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await self._refuse(send)
                return
            chunks.append(body)
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # later calls: disconnect notices for streaming responses

        await self.app(scope, replay, send)


__all__ = ["TYPES", "ApiError", "BodyLimit", "error_body", "install_error_handlers", "validation_message"]

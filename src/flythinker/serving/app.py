"""The HTTP API: `create_app(service)` builds the FastAPI app over a `Service` (nothing happens at import time; the
generation worker starts and stops with the app's lifespan).

Routes:
    GET    /health                              {"status", "model", "db"} (no key needed)
    GET    /v1/models                           OpenAI-style model list
    GET    /v1/users                            (admin) users with their item counts
    POST   /v1/users                            (admin) {"user_id"?} -> 201 {"user_id", "api_key"}
    DELETE /v1/users/{id}                       -> 204, the user and all their items
    POST   /v1/users/{id}/items                 {"text", "title"?, "date"?, "meta"?} -> 201 {"item_id"}
    GET    /v1/users/{id}/items?limit=&offset=  {"items": [...]} newest first
    DELETE /v1/users/{id}/items/{item_id}       -> 204
    POST   /v1/generate                         {"user_id", "input", ...} -> {"text", "retrieved", "usage"} or SSE
                                                (decode fields: max_new_tokens, temperature, top_p, seed,
                                                repetition_penalty, no_repeat_ngram_size, min_new_tokens)
    POST   /v1/chat/completions                 OpenAI-compatible (`user` names the profile)
    GET    /                                    the playground page (static/)
Every error is `{"error": {"message", "type"}}` (errors.py); every write is committed before its 2xx.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path as FsPath
from typing import Annotated, Any

from fastapi import Body, Depends, FastAPI, Path, Query, Request, Response
from fastapi.responses import HTMLResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from .auth import Principal, authenticate, hash_key, new_key
from .db import parse_date
from .engine import AsyncGeneration, Delta, Done, QueueFull, Sampling
from .errors import ApiError, BodyLimit, install_error_handlers
from .schemas import USER_ID_PATTERN, ChatCompletionRequest, CreateUser, GenerateRequest, NewItem
from .service import Prepared, Service

STATIC = FsPath(__file__).with_name("static")
UserIdPath = Annotated[str, Path(pattern=USER_ID_PATTERN)]


# ----------------------------------------------------------------------------------------------------------------
# checks of server-configured bounds (the static ones are in schemas.py)


def check_text(value: str, field: str, max_chars: int, required: bool = True) -> None:
    if required and not value.strip():
        raise ApiError(422, f"{field}: must not be blank", param=field)
    if len(value) > max_chars:
        raise ApiError(422, f"{field}: at most {max_chars} characters; got {len(value)}", param=field)
    if "\x00" in value:
        raise ApiError(422, f"{field}: must not contain NUL characters", param=field)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate ("\ud800" in JSON) cannot be stored or tokenized
        raise ApiError(422, f"{field}: contains an invalid character (a lone surrogate at offset {e.start})",
                       param=field) from None


def check_meta(meta: dict[str, Any], max_bytes: int) -> None:
    try:
        blob = json.dumps(meta, allow_nan=False, ensure_ascii=False)
    except ValueError:
        raise ApiError(422, "meta: must not contain NaN or Infinity", param="meta") from None
    if len(blob.encode("utf-8", "surrogatepass")) > max_bytes:
        raise ApiError(422, f"meta: at most {max_bytes} bytes of JSON", param="meta")
    check_text(blob, "meta", len(blob), required=False)  # NULs and lone surrogates anywhere inside


def last_user_message(body: ChatCompletionRequest) -> str:
    for m in reversed(body.messages):
        if m.role == "user":
            c = m.content
            if isinstance(c, list):  # content parts: the text ones
                c = "".join(str(p.get("text", "")) for p in c if p.get("type") == "text")
            if c:
                return c
            break
    raise ApiError(422, "messages: needs a user message with text content (the request to write)",
                   param="messages")


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def principal(request: Request) -> Principal:
    """The caller, from its Authorization header (401 otherwise); a sync dependency, so the lookup runs off the loop."""
    return authenticate(request.app.state.service.db, request.headers.get("authorization"))


# Module level (not inside create_app): with postponed annotations FastAPI resolves these names in module globals.
Who = Annotated[Principal, Depends(principal)]


# ----------------------------------------------------------------------------------------------------------------


def create_app(service: Service) -> FastAPI:
    from .. import __version__

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        service.start()
        try:
            yield
        finally:
            await run_in_threadpool(service.stop)

    app = FastAPI(title="flythinker", version=__version__, lifespan=lifespan, redoc_url=None,
                  description="Personalized long-form generation from each user's own history.")
    app.state.service = service
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=service.limits.max_body_bytes)
    limits = service.limits

    async def start(prepared: Prepared, max_new: int, sampling: Sampling) -> AsyncGeneration:
        try:
            return AsyncGeneration(service.engine, prepared.prompt_ids, max_new, sampling, limits.request_timeout_s,
                                   extra=prepared.extra)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}", "rate_limit_error", headers={"Retry-After": "1"}) \
                from None
        except ValueError as e:
            raise ApiError(400, str(e), param="max_new_tokens") from None

    async def prepare(user_id: str, text: str) -> Prepared:
        return await run_in_threadpool(service.prepare, user_id, text)

    # -- service ------------------------------------------------------------------------------------------------

    @app.get("/health")
    def health() -> Response:
        h = service.health()
        return Response(json.dumps(h), status_code=200 if h["status"] == "ok" else 503,
                        media_type="application/json")

    @app.get("/v1/models")
    def models(_who: Who) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": service.name, "object": "model", "created": 0,
                                            "owned_by": "flythinker"}]}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def playground() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: Annotated[str, Path(pattern=r"^[a-z0-9_-]+\.(js|css)$")]) -> Response:
        p = STATIC / name
        if not p.is_file():
            raise ApiError(404, f"no static file {name}")
        kind = "text/javascript" if name.endswith(".js") else "text/css"
        return Response(p.read_bytes(), media_type=f"{kind}; charset=utf-8")

    # -- users and items ----------------------------------------------------------------------------------------

    @app.get("/v1/users")
    def list_users(who: Who) -> dict[str, Any]:
        who.check_admin()
        return {"users": service.db.list_users()}

    @app.post("/v1/users", status_code=201)
    def create_user(who: Who, body: Annotated[CreateUser | None, Body()] = None) -> dict[str, Any]:
        who.check_admin()
        user_id = body.user_id if body is not None and body.user_id else "u_" + secrets.token_hex(6)
        key = new_key()
        service.db.create_user(user_id, hash_key(key))
        return {"user_id": user_id, "api_key": key}

    @app.delete("/v1/users/{user_id}", status_code=204)
    def delete_user(who: Who, user_id: UserIdPath) -> Response:
        who.check_user(user_id)
        service.db.delete_user(user_id)
        return Response(status_code=204)

    @app.post("/v1/users/{user_id}/items", status_code=201)
    def add_item(who: Who, user_id: UserIdPath, body: NewItem) -> dict[str, Any]:
        who.check_user(user_id)
        check_text(body.text, "text", limits.max_item_chars)
        if body.title is not None:
            check_text(body.title, "title", limits.max_title_chars, required=False)
        if body.date is not None:
            if isinstance(body.date, str):
                check_text(body.date, "date", 64)
            try:
                parse_date(body.date)
            except ValueError as e:
                raise ApiError(422, f"date: {e}; got {body.date!r}", param="date") from None
        if body.meta is not None:
            check_meta(body.meta, limits.max_meta_bytes)
        item_id = service.db.add_item(user_id, body.text, body.title, body.date, body.meta,
                                      max_items=limits.max_items_per_user)
        return {"item_id": item_id}

    @app.get("/v1/users/{user_id}/items")
    def list_items(who: Who, user_id: UserIdPath, limit: Annotated[int | None, Query(ge=1)] = None,
                   offset: Annotated[int, Query(ge=0)] = 0) -> dict[str, Any]:
        who.check_user(user_id)
        return {"items": service.db.items(user_id, limit=limit, offset=offset)}

    @app.delete("/v1/users/{user_id}/items/{item_id}", status_code=204)
    def delete_item(who: Who, user_id: UserIdPath, item_id: Annotated[int, Path(ge=1)]) -> Response:
        who.check_user(user_id)
        service.db.delete_item(user_id, item_id)
        return Response(status_code=204)

    # -- generation ---------------------------------------------------------------------------------------------

    @app.post("/v1/generate")
    async def generate(who: Who, body: GenerateRequest, request: Request) -> Any:
        who.check_user(body.user_id)
        check_text(body.input, "input", limits.max_input_chars)
        max_new = service.max_new_tokens(body.max_new_tokens)
        sampling = service.sampling(body.temperature, body.top_p, body.seed, body.repetition_penalty,
                                    body.no_repeat_ngram_size, body.min_new_tokens, max_new)
        prepared = await prepare(body.user_id, body.input)
        gen = await start(prepared, max_new, sampling)

        def summary(done: Done) -> dict[str, Any]:
            return {"retrieved": prepared.retrieved, "finish_reason": done.finish_reason,
                    "usage": {"prompt_tokens": len(prepared.prompt_ids), "completion_tokens": done.completion_tokens}}

        if not body.stream:
            text, done = await gen.collect()
            return {"text": text, **summary(done)}

        async def events() -> AsyncIterator[str]:
            try:
                async for ev in gen.events():
                    if isinstance(ev, Delta):
                        yield sse({"text": ev.text})
                        if await request.is_disconnected():
                            return  # the finally below cancels the row
                    else:
                        yield sse({"text": "", **summary(ev)})
                yield "data: [DONE]\n\n"
            except ApiError as e:
                yield sse(e.body())
                yield "data: [DONE]\n\n"
            finally:
                if not gen.finished:
                    gen.cancel()

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    @app.post("/v1/chat/completions")
    async def chat_completions(who: Who, body: ChatCompletionRequest, request: Request) -> Any:
        if body.model and body.model != service.name:
            raise ApiError(404, f"model {body.model!r} not found; this server serves {service.name!r}",
                           "invalid_request_error", param="model")
        if body.n != 1:
            raise ApiError(422, "n: only n=1 is supported", param="n")
        who.check_user(body.user)
        query = last_user_message(body)
        check_text(query, "messages", limits.max_input_chars)
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_new = service.max_new_tokens(body.max_completion_tokens or body.max_tokens, param)
        sampling = service.sampling(body.temperature, body.top_p, body.seed, body.repetition_penalty,
                                    body.no_repeat_ngram_size, body.min_tokens, max_new, min_param="min_tokens")
        prepared = await prepare(body.user, query)
        gen = await start(prepared, max_new, sampling)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": cid, "created": created, "model": service.name}

        def usage(done: Done) -> dict[str, int]:
            p, c = len(prepared.prompt_ids), done.completion_tokens
            return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

        if not body.stream:
            text, done = await gen.collect()
            return {**head, "object": "chat.completion",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": done.finish_reason, "logprobs": None}],
                    "usage": usage(done), "retrieved": prepared.retrieved}

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
            out = {**head, "object": "chat.completion.chunk",
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
            if include_usage:
                out["usage"] = None
            return out

        async def events() -> AsyncIterator[str]:
            try:
                yield sse(chunk({"role": "assistant", "content": ""}, None))
                async for ev in gen.events():
                    if isinstance(ev, Delta):
                        yield sse(chunk({"content": ev.text}, None))
                        if await request.is_disconnected():
                            return
                    else:
                        yield sse(chunk({}, ev.finish_reason))
                        if include_usage:
                            yield sse({**head, "object": "chat.completion.chunk", "choices": [],
                                       "usage": usage(ev)})
                yield "data: [DONE]\n\n"
            except ApiError as e:
                yield sse(e.body())
                yield "data: [DONE]\n\n"
            finally:
                if not gen.finished:
                    gen.cancel()

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    return app


__all__ = ["create_app"]

"""Request bodies of the HTTP API as pydantic models: what a field may hold, checked before a handler runs (a bad
field is a 422 naming it). Bounds that are server settings (`Limits`) are checked in the handlers."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StringConstraints

USER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$"
UserId = Annotated[str, StringConstraints(pattern=USER_ID_PATTERN)]
Temperature = Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
Seed = Annotated[StrictInt, Field(ge=0, le=2**63 - 1)]
NewTokens = Annotated[StrictInt, Field(ge=1)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not silently a default


class CreateUser(Strict):
    user_id: UserId | None = None


class NewItem(Strict):
    text: Annotated[str, Field(min_length=1)]
    title: str | None = None
    date: str | StrictInt | None = None
    meta: dict[str, Any] | None = None


class GenerateRequest(Strict):
    user_id: UserId
    input: Annotated[str, Field(min_length=1)]
    max_new_tokens: NewTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: Seed | None = None
    stream: StrictBool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: StrictBool = False


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat completion request; fields the server does not use (presence_penalty, ...) are accepted and
    ignored, as other OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    user: UserId
    max_tokens: NewTokens | None = None
    max_completion_tokens: NewTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: Seed | None = None
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None


__all__ = ["USER_ID_PATTERN", "ChatCompletionRequest", "ChatMessage", "CreateUser", "GenerateRequest", "NewItem"]

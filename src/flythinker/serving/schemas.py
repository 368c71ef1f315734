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
# Anti-repetition settings (transformers' processors, as `DecodeConfig` has them; vLLM takes the same extra fields).
RepetitionPenalty = Annotated[float, Field(strict=True, gt=0, le=100, allow_inf_nan=False)]  # no bools, no strings
NgramSize = Annotated[StrictInt, Field(ge=0, le=1024)]
MinTokens = Annotated[StrictInt, Field(ge=0)]
# OpenAI's penalties: validated as OpenAI does, then ignored (see ChatCompletionRequest).
OpenAIPenalty = Annotated[float, Field(strict=True, ge=-2, le=2, allow_inf_nan=False)]


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
    repetition_penalty: RepetitionPenalty | None = None
    no_repeat_ngram_size: NgramSize | None = None
    min_new_tokens: MinTokens | None = None
    stream: StrictBool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: StrictBool = False


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat completion request; fields the server does not use are accepted and ignored, as other
    OpenAI-compatible servers do. frequency_penalty / presence_penalty are checked (OpenAI's range) and ignored:
    the decode has transformers' repetition_penalty instead, a different rule (it divides logits of every seen
    token), taken here as an extra field with no_repeat_ngram_size and min_tokens (vLLM's names)."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    user: UserId
    max_tokens: NewTokens | None = None
    max_completion_tokens: NewTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: Seed | None = None
    repetition_penalty: RepetitionPenalty | None = None
    no_repeat_ngram_size: NgramSize | None = None
    min_tokens: MinTokens | None = None
    frequency_penalty: OpenAIPenalty | None = None
    presence_penalty: OpenAIPenalty | None = None
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None


__all__ = ["USER_ID_PATTERN", "ChatCompletionRequest", "ChatMessage", "CreateUser", "GenerateRequest", "NewItem"]

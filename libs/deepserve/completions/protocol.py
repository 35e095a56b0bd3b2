"""Request bodies of the OpenAI-compatible API (pydantic; unknown fields are ignored).

Only the types and basic ranges live here; FastAPI turns a type error into a 400 that names the
field. Semantic checks (sampling ranges, context length) happen when the request is prepared.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 128
MAX_COMPLETION_LOGPROBS = 5


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Lenient):
    """`stream_options`: whether the last SSE chunk carries the usage."""

    include_usage: bool = False


class TextContentPart(_Lenient):
    """One part of a multi-part message; only text is served."""

    type: str
    text: str | None = None


class ChatMessage(_Lenient):
    """A chat message as clients send it (content as text or as a list of parts)."""

    role: Annotated[str, Field(min_length=1, max_length=64)]
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class _SamplingFields(_Lenient):
    """Fields chat and text completions share."""

    model: Annotated[str, Field(min_length=1)]
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None
    # Extensions many OpenAI-compatible servers accept.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: Annotated[int, Field(ge=0)] | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    priority: int = 0
    # Structured outputs, as vLLM names them (at most one, or response_format on chat).
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # Prefix-cache isolation: requests share cached KV only under the same salt; unset, the
    # tenant's own (vLLM's cache_salt). A salt given here is shared with every tenant using it.
    cache_salt: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    # An explicit cached context (POST /v1/cached_contexts) the prompt continues.
    cached_context_id: str | None = None


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None


PromptInput = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    prompt: PromptInput
    # OpenAI: the number of most likely alternatives per token (0 returns the chosen token only).
    logprobs: Annotated[int, Field(ge=0, le=MAX_COMPLETION_LOGPROBS)] | None = None
    echo: bool = False
    max_tokens: Annotated[int, Field(ge=1)] | None = 16
    suffix: str | None = None


Endpoint = Literal["chat", "text"]

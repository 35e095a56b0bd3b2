"""Turns a validated API body into a GenerationJob: sampling checks, chat template, tokenization.

This is the one place prompts are tokenized (and chat templates rendered) on their way to the
engines; the engines receive token ids only.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from deepserve.completions.prepared import AdapterTarget, ContextPrefix, GenerationJob, Prompt
from deepserve.completions.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
)
from deepserve.completions.structured import request_constraint
from deepserve.completions.tools import ToolSetup, tool_setup
from deepserve.errors import InvalidArgument
from deepserve.prefix_hash import adapter_salt, prompt_block_hashes
from deepserve.records import InstanceRecord
from deepserve.sampling_params import SamplingParams
from deepserve.structured_output import StructuredOutput
from deepserve.tokenizer import Tokenizer

log = logging.getLogger(__name__)

INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _utf8(text: str, field: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument("must be valid UTF-8 text", field=field) from None
    return text


def _int32(value: int | None, field: str) -> None:
    if value is not None and not -INT32_MAX - 1 <= value <= INT32_MAX:
        raise InvalidArgument("is out of range", field=field)


def _stops(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    return [_utf8(s, "stop") for s in stops]


def cache_salt_for(tenant: str, shared_salt: str | None) -> str:
    """The prefix-cache salt of a request: its tenant's own, or a salt shared on purpose.

    The two never collide, so naming another tenant's name as a salt shares nothing with it.
    """
    if shared_salt:
        return f"shared:{shared_salt}"
    return f"tenant:{tenant}" if tenant else ""


def _default(
    value: float | int | None, defaults: dict[str, float], name: str, fallback: float
) -> float:
    """The request's value, else the model's generation_config.json default, else OpenAI's."""
    if value is not None:
        return value
    return defaults.get(name, fallback)


def build_sampling(
    body: ChatCompletionRequest | CompletionRequest,
    *,
    max_tokens: int | None,
    logprobs: bool,
    top_logprobs: int,
    vocab_size: int,
    defaults: dict[str, float] | None = None,
    structured_output: StructuredOutput | None = None,
    keep_special_tokens: bool = False,
) -> SamplingParams:
    """Sampling parameters; unset fields take the model's generation_config.json defaults
    where it has them (temperature, top_p, top_k, min_p, repetition_penalty), else OpenAI's.
    InvalidArgument names a field."""
    model = defaults or {}
    for name in ("top_k", "min_tokens", "priority"):
        _int32(getattr(body, name), name)
    _int32(max_tokens, "max_tokens")
    if body.seed is not None and not INT64_MIN <= body.seed <= INT64_MAX:
        raise InvalidArgument("must fit in a signed 64-bit integer", field="seed")
    params = SamplingParams(
        temperature=_default(body.temperature, model, "temperature", 1.0),
        top_p=_default(body.top_p, model, "top_p", 1.0),
        top_k=int(_default(body.top_k, model, "top_k", 0)),
        min_p=_default(body.min_p, model, "min_p", 0.0),
        seed=body.seed,
        repetition_penalty=_default(body.repetition_penalty, model, "repetition_penalty", 1.0),
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        stop=_stops(body.stop),
        stop_token_ids=list(body.stop_token_ids or []),
        ignore_eos=body.ignore_eos,
        max_tokens=max_tokens,
        min_tokens=body.min_tokens or 0,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        skip_special_tokens=body.skip_special_tokens and not keep_special_tokens,
        structured_output=structured_output,
    )
    params.validate(vocab_size=vocab_size)
    return params


def message_dict(message: ChatMessage, index: int) -> dict[str, Any]:
    content: str | None
    if isinstance(message.content, list):
        texts: list[str] = []
        for part in message.content:
            if part.type != "text" or part.text is None:
                raise InvalidArgument(
                    f"message {index}: only text content parts are supported, got {part.type!r}",
                    field="messages",
                )
            texts.append(part.text)
        content = "".join(texts)
    else:
        content = message.content
    role = "system" if message.role == "developer" else message.role
    out: dict[str, Any] = {"role": role, "content": content}
    for key in ("name", "tool_calls", "tool_call_id", "reasoning_content"):
        value = getattr(message, key)
        if value is not None:
            out[key] = value
    return out


def encode_checked(encode: Any, field: str, *args: Any, **kwargs: Any) -> list[int]:
    try:
        ids: list[int] = encode(*args, **kwargs)
    except InvalidArgument:
        raise
    except Exception as exc:
        # The tokenizer rejects text it cannot represent (e.g. lone surrogates): the input's fault.
        raise InvalidArgument(f"cannot be tokenized: {exc}", field=field) from exc
    return ids


def chat_prompt(
    body: ChatCompletionRequest,
    tokenizer: Tokenizer,
    tools: ToolSetup | None = None,
    context: ContextPrefix | None = None,
) -> Prompt:
    messages = [message_dict(m, i) for i, m in enumerate(body.messages)]
    if context is not None and context.messages:
        messages = [*context.messages, *messages]
    offered = [t.to_openai() for t in tools.offered] if tools is not None else []
    ids = encode_checked(
        tokenizer.encode_chat,
        "messages",
        messages,
        add_generation_prompt=body.add_generation_prompt,
        tools=offered or None,
        **(body.chat_template_kwargs or {}),
    )
    if context is not None and not context.messages:
        ids = [*context.token_ids, *ids]
    return Prompt(token_ids=ids)


def context_tokens(prompt: Prompt, context: ContextPrefix | None) -> int:
    """How many leading tokens of the prompt are the cached context's (their common prefix)."""
    if context is None:
        return 0
    shared = 0
    for ours, theirs in zip(prompt.token_ids, context.token_ids, strict=False):
        if ours != theirs:
            break
        shared += 1
    return shared


def output_constraint(
    body: ChatCompletionRequest | CompletionRequest, tools: ToolSetup | None
) -> StructuredOutput | None:
    """The one grammar the request's output must follow: response_format / guided_*, or the
    forced tool call; both at once is refused."""
    constraint = request_constraint(body)
    forced = tools.constraint() if tools is not None else None
    if forced is not None:
        if constraint is not None:
            raise InvalidArgument(
                "a forced tool call cannot be combined with a response format or guided field",
                field="tool_choice",
            )
        forced.validate()
        return forced
    return constraint


def completion_prompts(body: CompletionRequest, tokenizer: Tokenizer) -> list[Prompt]:
    raw = body.prompt
    if isinstance(raw, str):
        items: Sequence[str | list[int]] = [raw]
    elif raw and all(isinstance(x, int) for x in raw):
        items = [list(raw)]  # type: ignore[arg-type]
    else:
        items = raw  # type: ignore[assignment]
    if not items:
        raise InvalidArgument("must not be empty", field="prompt")
    prompts: list[Prompt] = []
    for item in items:
        if isinstance(item, str):
            ids = encode_checked(tokenizer.encode, "prompt", item)
            prompts.append(Prompt(ids, item if body.echo else ""))
        else:
            bad = [t for t in item if not 0 <= t < tokenizer.vocab_size]
            if bad:
                raise InvalidArgument(
                    f"token id {bad[0]} is outside the vocabulary", field="prompt"
                )
            text = tokenizer.decode(item) if body.echo else ""
            prompts.append(Prompt(list(item), text))
    return prompts


def check_context(prompts: list[Prompt], max_tokens: int | None, max_model_len: int) -> None:
    """OpenAI refuses a prompt (plus max_tokens) longer than the model's context up front."""
    for prompt in prompts:
        if not prompt.token_ids:
            raise InvalidArgument("the prompt is empty after tokenization", field="prompt")
        if max_model_len <= 0:
            continue
        length = len(prompt.token_ids)
        if length >= max_model_len or (
            max_tokens is not None and length + max_tokens > max_model_len
        ):
            asked = f" + {max_tokens} completion tokens" if max_tokens is not None else ""
            raise InvalidArgument(
                f"this model's maximum context length is {max_model_len} tokens; the request "
                f"has {length} prompt tokens{asked}",
                field="max_tokens"
                if max_tokens is not None and length < max_model_len
                else "messages",
            )


# (model, the sizes its instances disagreed on) already logged: a disagreement is logged once.
_logged_disagreements: set[tuple[str, tuple[int, ...]]] = set()


def prefix_block_size(model: str, instances: Iterable[InstanceRecord]) -> int:
    """The block size to hash `model`'s prompts with: the one its live instances cache with.

    The engines' own size is the only source (each instance record carries it). Instances that
    disagree (a rollout of a new engine setting) are hashed for with the most common size, the
    smaller on a tie, so the scheduler can credit those while the others score no cached prefix.
    0 when no live instance says: no hashes, routing by load alone.
    """
    sizes = Counter(i.block_size for i in instances if i.model == model and i.block_size > 0)
    if not sizes:
        return 0
    chosen = min(sizes, key=lambda size: (-sizes[size], size))
    if len(sizes) > 1:
        seen = (model, tuple(sorted(sizes)))
        if seen not in _logged_disagreements:
            _logged_disagreements.add(seen)
            log.warning(
                "live instances of %s cache blocks of different sizes %s; hashing prompts with %d",
                model,
                dict(sorted(sizes.items())),
                chosen,
            )
    return chosen


def with_block_hashes(prompts: list[Prompt], block_size: int, salt: str = "") -> list[Prompt]:
    if block_size <= 0:
        return prompts
    return [
        Prompt(p.token_ids, p.text, prompt_block_hashes(p.token_ids, block_size, salt))
        for p in prompts
    ]


def prepare_chat(
    body: ChatCompletionRequest,
    tokenizer: Tokenizer,
    *,
    request_id: str,
    tenant: str,
    max_model_len: int,
    block_size: int,
    tool_parser: str = "",
    context: ContextPrefix | None = None,
    adapter: AdapterTarget | None = None,
) -> GenerationJob:
    max_tokens = body.max_completion_tokens or body.max_tokens
    tools = tool_setup(
        body.tools,
        body.tool_choice,
        body.parallel_tool_calls,
        tokenizer,
        parser_override=tool_parser,
    )
    sampling = build_sampling(
        body,
        max_tokens=max_tokens,
        logprobs=body.logprobs,
        top_logprobs=body.top_logprobs or 0,
        vocab_size=tokenizer.vocab_size,
        defaults=tokenizer.generation_defaults,
        structured_output=output_constraint(body, tools),
        keep_special_tokens=bool(tools and tools.offered and tools.parser.needs_special_tokens),
    )
    prompts = [chat_prompt(body, tokenizer, tools, context)]
    check_context(prompts, max_tokens, max_model_len)
    salt = cache_salt_for(tenant, body.cache_salt)
    return GenerationJob(
        request_id=request_id,
        endpoint="chat",
        tenant=tenant,
        model=body.model,
        prompts=with_block_hashes(
            prompts, block_size, adapter_salt(salt, adapter.adapter_id if adapter else "")
        ),
        adapter=adapter,
        sampling=sampling,
        n=body.n,
        stream=body.stream,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        top_logprobs=body.top_logprobs or 0,
        priority=body.priority,
        block_size=max(block_size, 0),
        tools=tools,
        cache_salt=salt,
        context=context,
        context_tokens=context_tokens(prompts[0], context),
    )


def prepare_completion(
    body: CompletionRequest,
    tokenizer: Tokenizer,
    *,
    request_id: str,
    tenant: str,
    max_model_len: int,
    block_size: int,
    tool_parser: str = "",
    context: ContextPrefix | None = None,
    adapter: AdapterTarget | None = None,
) -> GenerationJob:
    del tool_parser  # completions have no tools
    if body.echo and body.logprobs is not None:
        raise InvalidArgument("echo with logprobs (prompt logprobs) is not supported", field="echo")
    if body.suffix:
        raise InvalidArgument("suffix is not supported", field="suffix")
    sampling = build_sampling(
        body,
        max_tokens=body.max_tokens,
        logprobs=body.logprobs is not None,
        top_logprobs=body.logprobs or 0,
        vocab_size=tokenizer.vocab_size,
        defaults=tokenizer.generation_defaults,
        structured_output=request_constraint(body),
    )
    prompts = completion_prompts(body, tokenizer)
    if context is not None:
        prompts = [Prompt([*context.token_ids, *p.token_ids], p.text) for p in prompts]
    check_context(prompts, body.max_tokens, max_model_len)
    salt = cache_salt_for(tenant, body.cache_salt)
    return GenerationJob(
        request_id=request_id,
        endpoint="text",
        tenant=tenant,
        model=body.model,
        prompts=with_block_hashes(
            prompts, block_size, adapter_salt(salt, adapter.adapter_id if adapter else "")
        ),
        adapter=adapter,
        sampling=sampling,
        n=body.n,
        stream=body.stream,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        echo=body.echo,
        top_logprobs=body.logprobs or 0,
        priority=body.priority,
        block_size=max(block_size, 0),
        cache_salt=salt,
        context=context,
        context_tokens=len(context.token_ids) if context is not None else 0,
    )

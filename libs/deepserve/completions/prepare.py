"""Turns a validated API body into a GenerationJob: sampling checks, chat template, tokenization.

This is the one place prompts are tokenized (and chat templates rendered) on their way to the
engines; the engines receive token ids only.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from deepserve.completions.prepared import GenerationJob, Prompt
from deepserve.completions.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
)
from deepserve.errors import InvalidArgument
from deepserve.prefix_hash import prompt_block_hashes
from deepserve.records import InstanceRecord
from deepserve.sampling_params import SamplingParams
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


def build_sampling(
    body: ChatCompletionRequest | CompletionRequest,
    *,
    max_tokens: int | None,
    logprobs: bool,
    top_logprobs: int,
    vocab_size: int,
) -> SamplingParams:
    """Sampling parameters with OpenAI's defaults for unset fields; InvalidArgument names a field."""
    for name in ("top_k", "min_tokens", "priority"):
        _int32(getattr(body, name), name)
    _int32(max_tokens, "max_tokens")
    if body.seed is not None and not INT64_MIN <= body.seed <= INT64_MAX:
        raise InvalidArgument("must fit in a signed 64-bit integer", field="seed")
    params = SamplingParams(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        min_p=body.min_p or 0.0,
        seed=body.seed,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        stop=_stops(body.stop),
        stop_token_ids=list(body.stop_token_ids or []),
        ignore_eos=body.ignore_eos,
        max_tokens=max_tokens,
        min_tokens=body.min_tokens or 0,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        skip_special_tokens=body.skip_special_tokens,
    )
    params.validate(vocab_size=vocab_size)
    return params


def _message_dict(message: ChatMessage, index: int) -> dict[str, Any]:
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


def _encode(encode: Any, field: str, *args: Any, **kwargs: Any) -> list[int]:
    try:
        ids: list[int] = encode(*args, **kwargs)
    except InvalidArgument:
        raise
    except Exception as exc:
        # The tokenizer rejects text it cannot represent (e.g. lone surrogates): the input's fault.
        raise InvalidArgument(f"cannot be tokenized: {exc}", field=field) from exc
    return ids


def chat_prompt(body: ChatCompletionRequest, tokenizer: Tokenizer) -> Prompt:
    messages = [_message_dict(m, i) for i, m in enumerate(body.messages)]
    ids = _encode(
        tokenizer.encode_chat,
        "messages",
        messages,
        add_generation_prompt=body.add_generation_prompt,
        tools=body.tools,
        **(body.chat_template_kwargs or {}),
    )
    return Prompt(token_ids=ids)


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
            ids = _encode(tokenizer.encode, "prompt", item)
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


def with_block_hashes(prompts: list[Prompt], block_size: int) -> list[Prompt]:
    if block_size <= 0:
        return prompts
    return [
        Prompt(p.token_ids, p.text, prompt_block_hashes(p.token_ids, block_size)) for p in prompts
    ]


def prepare_chat(
    body: ChatCompletionRequest,
    tokenizer: Tokenizer,
    *,
    request_id: str,
    tenant: str,
    max_model_len: int,
    block_size: int,
) -> GenerationJob:
    max_tokens = body.max_completion_tokens or body.max_tokens
    sampling = build_sampling(
        body,
        max_tokens=max_tokens,
        logprobs=body.logprobs,
        top_logprobs=body.top_logprobs or 0,
        vocab_size=tokenizer.vocab_size,
    )
    prompts = [chat_prompt(body, tokenizer)]
    check_context(prompts, max_tokens, max_model_len)
    return GenerationJob(
        request_id=request_id,
        endpoint="chat",
        tenant=tenant,
        model=body.model,
        prompts=with_block_hashes(prompts, block_size),
        sampling=sampling,
        n=body.n,
        stream=body.stream,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        top_logprobs=body.top_logprobs or 0,
        priority=body.priority,
        block_size=max(block_size, 0),
    )


def prepare_completion(
    body: CompletionRequest,
    tokenizer: Tokenizer,
    *,
    request_id: str,
    tenant: str,
    max_model_len: int,
    block_size: int,
) -> GenerationJob:
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
    )
    prompts = completion_prompts(body, tokenizer)
    check_context(prompts, body.max_tokens, max_model_len)
    return GenerationJob(
        request_id=request_id,
        endpoint="text",
        tenant=tenant,
        model=body.model,
        prompts=with_block_hashes(prompts, block_size),
        sampling=sampling,
        n=body.n,
        stream=body.stream,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        echo=body.echo,
        top_logprobs=body.logprobs or 0,
        priority=body.priority,
        block_size=max(block_size, 0),
    )

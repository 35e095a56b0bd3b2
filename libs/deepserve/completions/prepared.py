"""A prepared API call: tokenized prompts, validated sampling, who pays for it, and its deadline.

Built once per call (HTTP or gRPC) by `deepserve.completions.prepare`; the dispatcher turns it into
`len(prompts) * n` engine requests. Choice `i` of prompt `p` has index `p * n + i`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from deepserve.completions.protocol import Endpoint
from deepserve.completions.tools import ToolSetup
from deepserve.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class AdapterTarget:
    """A request served with a LoRA adapter: the id engines serve it under (the record's
    `serving_id`) and its files; the job's `model` names the base."""

    adapter_id: str
    path: str
    name: str  # what the caller asked for (the response's model)


@dataclass(frozen=True, slots=True)
class Prompt:
    """One prompt as token ids, plus its text when the response echoes it."""

    token_ids: list[int]
    text: str = ""
    block_hashes: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ContextPrefix:
    """An explicit cached context a prompt continues: its id, its tokens (the prompt's first
    ones), the messages it was made from (chat), and when it lapses (unix seconds)."""

    context_id: str
    token_ids: list[int]
    messages: list[dict[str, object]] | None = None
    expires_at: float = 0.0


@dataclass(slots=True)
class GenerationJob:
    """Everything the dispatcher needs to run one API call."""

    request_id: str
    endpoint: Endpoint
    tenant: str
    model: str
    prompts: list[Prompt]
    sampling: SamplingParams
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    # Completions API: alternatives per token as {token: logprob}; chat: as a list.
    top_logprobs: int = 0
    priority: int = 0
    # Tokens per block the prompts' block hashes were computed with (0: none were).
    block_size: int = 0
    created: int = 0
    # Absolute deadline on the event loop's clock.
    deadline: float = 0.0
    # Tools the model was offered and how to read its calls (chat and Responses).
    tools: ToolSetup | None = None
    # Seeds the prefix-cache hash chain (tenant isolation); see deepserve.prefix_hash.
    cache_salt: str = ""
    # The explicit cached context the prompts start with, and how many of their tokens it is.
    context: ContextPrefix | None = None
    context_tokens: int = 0
    # A LoRA adapter the request is served with (None: the base model alone).
    adapter: AdapterTarget | None = None

    @property
    def response_model(self) -> str:
        """The model the caller named: the adapter's name, else the model."""
        return self.adapter.name if self.adapter is not None else self.model

    @property
    def fanout(self) -> int:
        return len(self.prompts) * self.n

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p.token_ids) for p in self.prompts)

    def sampling_for(self, choice: int) -> SamplingParams:
        """Per-choice parameters: choices of one seeded call must still differ from each other."""
        offset = choice % self.n
        if self.sampling.seed is None or offset == 0:
            return self.sampling
        seed = self.sampling.seed + offset
        return replace(self.sampling, seed=seed if seed < 2**63 else seed - 2**64)

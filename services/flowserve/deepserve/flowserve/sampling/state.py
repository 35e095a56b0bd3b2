"""What the sampler keeps per request across steps: params, tokens seen, its own RNG."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import torch

from deepserve.sampling_params import SamplingParams


@dataclass(eq=False)
class SamplingState:
    """One request's sampling inputs that persist across steps.

    `output_token_ids` is read, never written, by the sampler: pass the engine's own list of the
    request's generated tokens so penalties and min_tokens always see the current output.

    A seeded request draws one uniform from its own generator per sampled token, so the
    generator's position is a function of (seed, output position). A request whose state is
    built when it already has output tokens (a migrated request resumed with the tokens another
    instance generated, or the decode side of a PD hand-off, whose first token the prefill
    instance sampled) fast-forwards its generator past those draws, and so samples exactly the
    tokens an uninterrupted run would.
    """

    params: SamplingParams
    prompt_token_ids: Sequence[int] = ()
    output_token_ids: list[int] = field(default_factory=list)
    # Masked while fewer than params.min_tokens tokens are out (with params.stop_token_ids).
    eos_token_ids: Collection[int] = ()
    _generators: dict[torch.device, torch.Generator] = field(
        default_factory=dict, init=False, repr=False
    )
    _prompt_ids: torch.Tensor | None = field(default=None, init=False, repr=False)
    # Draws made elsewhere before this state existed: one per output token it starts with.
    _draws_before: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        self._draws_before = len(self.output_token_ids)

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The request's seeded RNG on `device`, seeded once so draws continue across steps.

        A new generator skips the draws (one per token) of the output tokens the request
        started with.
        """
        if self.params.seed is None:
            return None
        generator = self._generators.get(device)
        if generator is None:
            generator = torch.Generator(device=device)
            generator.manual_seed(self.params.seed)
            skipped = torch.empty(1, dtype=torch.float32, device=device)
            for _ in range(self._draws_before):
                skipped.uniform_(generator=generator)
            self._generators[device] = generator
        return generator

    def unique_prompt_ids(self) -> torch.Tensor:
        """The prompt's distinct token ids (CPU, int64), computed once for repetition penalty."""
        if self._prompt_ids is None:
            ids = torch.tensor(list(self.prompt_token_ids), dtype=torch.int64)
            self._prompt_ids = torch.unique(ids)
        return self._prompt_ids

    def min_tokens_blocked_ids(self) -> list[int]:
        """Token ids that must not be sampled now because min_tokens is not reached yet."""
        params = self.params
        if not params.blocks_stop_tokens(len(self.output_token_ids)):
            return []
        blocked = set(params.stop_token_ids)
        if not params.ignore_eos:
            blocked.update(self.eos_token_ids)
        return sorted(blocked)

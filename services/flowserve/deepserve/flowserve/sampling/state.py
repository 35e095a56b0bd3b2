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

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The request's seeded RNG on `device`, seeded once so draws continue across steps."""
        if self.params.seed is None:
            return None
        generator = self._generators.get(device)
        if generator is None:
            generator = torch.Generator(device=device)
            generator.manual_seed(self.params.seed)
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

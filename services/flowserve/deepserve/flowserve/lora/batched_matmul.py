"""The batched LoRA matmuls of one step (Punica/S-LoRA's BGMV/SGMV, in plain torch).

A step's tokens are grouped by adapter slot. In the padded form each group is padded to the
largest group's length G: the rows are gathered once into [n, G, in], and each projection costs
two batched matmuls over the groups' slot weights — x @ A (shrink to the rank) then @ B (expand)
— and one scatter-add into the projection's output. When the groups span a contiguous range of
slots the slot weights are a view (no copy); otherwise they are gathered. When padding would
more than double the work (one long prompt chunk beside short decodes) each group runs as its
own segment instead. Base-model tokens are in no group and cost nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from deepserve.flowserve.lora.slots import LoRASlots

# Padding may at most double the rows the LoRA matmuls compute before segments are cheaper.
_MAX_PADDING_FACTOR = 2


@dataclass(slots=True)
class _Padded:
    rows: torch.Tensor  # [n * G] flat token index of each padded row (pads: 0)
    valid: torch.Tensor  # [n, G, 1] 1 for real rows, 0 for pads
    groups: int
    group_len: int
    slot_range: tuple[int, int] | None  # contiguous slots [start, stop) or None
    slot_index: torch.Tensor | None  # the slots when not contiguous


@dataclass(slots=True)
class _Segment:
    slot: int
    rows: torch.Tensor


class LoRAStep:
    """Adds each token's adapter delta to the fused projections of every layer of one step."""

    def __init__(
        self,
        slots: LoRASlots,
        token_slots: Sequence[int],
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.slots = slots
        groups: dict[int, list[int]] = {}
        for token, slot in enumerate(token_slots):
            if slot >= 0:
                groups.setdefault(slot, []).append(token)
        self.num_lora_tokens = sum(len(rows) for rows in groups.values())
        self._padded: _Padded | None = None
        self._segments: list[_Segment] = []
        if not groups:
            return
        ordered = sorted(groups)
        span = ordered[-1] - ordered[0] + 1
        # A contiguous span (with a few idle slots inside, as empty groups) needs no gather.
        contiguous = span <= 2 * len(ordered)
        used = list(range(ordered[0], ordered[-1] + 1)) if contiguous else ordered
        group_len = max(len(rows) for rows in groups.values())
        if len(used) * group_len > _MAX_PADDING_FACTOR * self.num_lora_tokens + 8:
            self._segments = [
                _Segment(slot, torch.tensor(groups[slot], dtype=torch.long, device=device))
                for slot in ordered
            ]
            return
        rows: list[int] = []
        valid: list[float] = []
        for slot in used:
            members = groups.get(slot, [])
            pad = group_len - len(members)
            rows.extend(members + [0] * pad)
            valid.extend([1.0] * len(members) + [0.0] * pad)
        self._padded = _Padded(
            rows=torch.tensor(rows, dtype=torch.long, device=device),
            valid=torch.tensor(valid, dtype=dtype, device=device).view(len(used), group_len, 1),
            groups=len(used),
            group_len=group_len,
            slot_range=(used[0], used[-1] + 1) if contiguous else None,
            slot_index=(
                None if contiguous else torch.tensor(used, dtype=torch.long, device=device)
            ),
        )

    @property
    def is_empty(self) -> bool:
        return self._padded is None and not self._segments

    def add(self, projection: str, layer: int, x: torch.Tensor, out: torch.Tensor) -> None:
        """out[t] += x[t] @ A[slot(t)] @ B[slot(t)] for every adapter token t of the step.

        One shrink over the fused targets' stacked A, then one expand per target into its
        columns of `out`."""
        slots = self.slots
        a = slots.a[projection][layer]  # [slots, in, targets * R]
        bs = [b[layer] for b in slots.b[projection]]  # each [slots, R, out_t]
        offsets = slots.out_offsets[projection]
        rank = slots.max_rank
        padded = self._padded
        if padded is None:
            for segment in self._segments:
                shrunk = x.index_select(0, segment.rows) @ a[segment.slot]
                for j, (b, start) in enumerate(zip(bs, offsets, strict=True)):
                    delta = shrunk[:, j * rank : (j + 1) * rank] @ b[segment.slot]
                    out[:, start : start + b.shape[-1]].index_add_(0, segment.rows, delta)
            return
        gathered = x.index_select(0, padded.rows)
        gathered = gathered.view(padded.groups, padded.group_len, x.shape[-1])
        if padded.slot_range is not None:
            first, stop = padded.slot_range
            a_sel, b_sels = a[first:stop], [b[first:stop] for b in bs]
        else:
            assert padded.slot_index is not None
            a_sel = a.index_select(0, padded.slot_index)
            b_sels = [b.index_select(0, padded.slot_index) for b in bs]
        # Pads are zeroed after the shrink (a few columns, not the input's width), so their
        # expanded rows add nothing to the row they point at.
        shrunk = torch.bmm(gathered, a_sel).mul_(padded.valid)  # [groups, G, targets * R]
        for j, (b_sel, start) in enumerate(zip(b_sels, offsets, strict=True)):
            delta = torch.bmm(shrunk[..., j * rank : (j + 1) * rank], b_sel)
            width = b_sel.shape[-1]
            out[:, start : start + width].index_add_(0, padded.rows, delta.view(-1, width))

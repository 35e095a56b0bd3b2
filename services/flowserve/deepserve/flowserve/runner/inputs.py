"""Turn a StepPlan into the flat tensors one forward step needs.

Everything here is computed once per step and shared by all layers: token ids, positions, the
slot each new token's KV is written to, which cached blocks each query reads (decodes bucketed
by context length), and which rows need logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deepserve.errors import InvalidArgument
from deepserve.flowserve.engine.step_plan import StepPlan
from deepserve.flowserve.model.attention import (
    AttentionMetadata,
    DecodeGroup,
    PrefillBatch,
    PrefillChunk,
)


@dataclass(slots=True)
class ModelInputs:
    """Device tensors for one step over the flat token axis."""

    token_ids: torch.Tensor  # [tokens] long
    positions: torch.Tensor  # [tokens] long
    max_position: int
    attention: AttentionMetadata
    # Flat index of the last token of each sequence with needs_logits, in plan order.
    logits_indices: torch.Tensor


def validate_plan(plan: StepPlan, *, num_blocks: int, block_size: int) -> None:
    """Raise InvalidArgument for a step plan whose tokens or blocks the cache cannot hold."""
    for seq in plan.sequences:
        if not seq.token_ids:
            raise InvalidArgument(f"{seq.request_id}: no tokens scheduled", field="token_ids")
        if seq.start_pos < 0:
            raise InvalidArgument(f"{seq.request_id}: negative start_pos", field="start_pos")
        needed = -(-(seq.start_pos + len(seq.token_ids)) // block_size)
        if len(seq.block_table) < needed:
            raise InvalidArgument(
                f"{seq.request_id}: {len(seq.block_table)} blocks cannot hold "
                f"{seq.start_pos + len(seq.token_ids)} positions of block size {block_size}",
                field="block_table",
            )
        for block in seq.block_table[:needed]:
            if not 0 <= block < num_blocks:
                raise InvalidArgument(
                    f"{seq.request_id}: block {block} outside [0, {num_blocks})",
                    field="block_table",
                )


def build_model_inputs(
    plan: StepPlan,
    *,
    block_size: int,
    device: torch.device,
    fused_decode: bool = False,
    fused_prefill: bool = False,
) -> ModelInputs:
    """Build the step's tensors on CPU with plain lists, then move them to `device` once each.

    `fused_decode` (the model attends decodes with the paged kernel, which reads each
    sequence's own length): all decodes form one group, with no buckets and no key mask.
    `fused_prefill` (the model attends prefill chunks with the paged prefill kernel): the
    chunks are described by one PrefillBatch, with no per-chunk masks.
    """
    token_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    logits_indices: list[int] = []
    decode_rows: list[int] = []  # plan index of each one-token sequence
    decode_tokens: list[int] = []  # its flat token index
    prefill_rows: list[tuple[int, int]] = []  # (plan index, flat start)
    for row, seq in enumerate(plan.sequences):
        start = len(token_ids)
        count = len(seq.token_ids)
        token_ids.extend(seq.token_ids)
        table = seq.block_table
        for pos in range(seq.start_pos, seq.start_pos + count):
            positions.append(pos)
            slots.append(table[pos // block_size] * block_size + pos % block_size)
        if seq.needs_logits:
            logits_indices.append(start + count - 1)
        if count == 1:
            decode_rows.append(row)
            decode_tokens.append(start)
        else:
            prefill_rows.append((row, start))

    buckets = (
        [(decode_rows, decode_tokens)]
        if fused_decode and decode_rows
        else _length_buckets(plan, decode_rows, decode_tokens)
    )
    decodes = [
        _decode_group(plan, rows, tokens, block_size, device, masked=not fused_decode)
        for rows, tokens in buckets
    ]
    if len(decodes) == 1 and not prefill_rows:
        decodes[0].token_indices = None  # the whole step, in order: no scatter needed
    prefills: list[PrefillChunk] = []
    prefill_batch = None
    if fused_prefill and prefill_rows:
        prefill_batch = _prefill_batch(plan, prefill_rows, block_size, device)
    else:
        prefills = [
            _prefill_chunk(plan, row, start, block_size, device) for row, start in prefill_rows
        ]
    return ModelInputs(
        token_ids=torch.tensor(token_ids, dtype=torch.long).to(device),
        positions=torch.tensor(positions, dtype=torch.long).to(device),
        max_position=max(positions),
        attention=AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long).to(device),
            decodes=decodes,
            prefills=prefills,
            prefill_batch=prefill_batch,
        ),
        logits_indices=torch.tensor(logits_indices, dtype=torch.long).to(device),
    )


def _blocks_for(length: int, block_size: int) -> int:
    return -(-length // block_size)


def _padded_tables(
    plan: StepPlan, rows: list[int], lengths: list[int], block_size: int
) -> list[list[int]]:
    """Each row's blocks covering its length, padded to the longest with the row's own first
    block: a valid id, whose keys past the length no kernel reads (and a mask hides)."""
    max_blocks = max(_blocks_for(length, block_size) for length in lengths)
    tables = []
    for row, length in zip(rows, lengths, strict=True):
        table = plan.sequences[row].block_table[: _blocks_for(length, block_size)]
        tables.append(table + [table[0]] * (max_blocks - len(table)))
    return tables


# A decode bucket costs a few kernel calls per layer (two gathers, attention, a scatter), about
# what gathering and reading this many padded key positions costs; a split must save more.
_BUCKET_SPLIT_MIN_SAVING = 1024


def _length_buckets(
    plan: StepPlan, rows: list[int], tokens: list[int]
) -> list[tuple[list[int], list[int]]]:
    """Split decode rows into buckets of similar context length, longest first.

    Walking the rows from the longest context down, a new bucket starts where padding every
    remaining row to the current bucket's length would waste more than a bucket costs. Rows keep
    their plan order inside a bucket, so a step of equal lengths stays one in-order bucket.
    """
    if not rows:
        return []
    lengths = {r: plan.sequences[r].start_pos + 1 for r in rows}
    order = sorted(range(len(rows)), key=lambda i: -lengths[rows[i]])
    buckets: list[list[int]] = [[]]
    bucket_len = lengths[rows[order[0]]]
    for rank, i in enumerate(order):
        length = lengths[rows[i]]
        remaining = len(order) - rank
        if buckets[-1] and remaining * (bucket_len - length) > _BUCKET_SPLIT_MIN_SAVING:
            buckets.append([])
            bucket_len = length
        buckets[-1].append(i)
    return [
        ([rows[i] for i in sorted(bucket)], [tokens[i] for i in sorted(bucket)])
        for bucket in buckets
    ]


def _decode_group(
    plan: StepPlan,
    rows: list[int],
    tokens: list[int],
    block_size: int,
    device: torch.device,
    *,
    masked: bool,
) -> DecodeGroup:
    lengths = [plan.sequences[r].start_pos + 1 for r in rows]
    max_len = max(lengths)
    tables = _padded_tables(plan, rows, lengths, block_size)
    key_mask = None
    if masked and any(length != max_len for length in lengths):
        key_mask = (
            (torch.arange(max_len)[None, :] < torch.tensor(lengths)[:, None])
            .view(len(rows), 1, 1, max_len)
            .to(device)
        )
    return DecodeGroup(
        token_indices=torch.tensor(tokens, dtype=torch.long).to(device),
        block_ids=torch.tensor(tables, dtype=torch.long).to(device),
        max_context_len=max_len,
        key_mask=key_mask,
        context_lens=torch.tensor(lengths, dtype=torch.long).to(device),
    )


def _prefill_chunk(
    plan: StepPlan, row: int, token_start: int, block_size: int, device: torch.device
) -> PrefillChunk:
    seq = plan.sequences[row]
    count = len(seq.token_ids)
    context_len = seq.start_pos + count
    mask = None
    if seq.start_pos:
        # Query i sits at position start + i and sees every key at or before it.
        query_pos = torch.arange(seq.start_pos, context_len)[:, None]
        mask = (torch.arange(context_len)[None, :] <= query_pos).to(device)
    table = seq.block_table[: _blocks_for(context_len, block_size)]
    return PrefillChunk(
        token_start=token_start,
        token_end=token_start + count,
        block_ids=torch.tensor(table, dtype=torch.long).to(device),
        context_len=context_len,
        mask=mask,
    )


def _prefill_batch(
    plan: StepPlan, rows: list[tuple[int, int]], block_size: int, device: torch.device
) -> PrefillBatch:
    contexts = [
        plan.sequences[row].start_pos + len(plan.sequences[row].token_ids) for row, _ in rows
    ]
    tables = _padded_tables(plan, [row for row, _ in rows], contexts, block_size)
    return PrefillBatch(
        block_tables=torch.tensor(tables, dtype=torch.long).to(device),
        query_starts=torch.tensor([start for _, start in rows], dtype=torch.long).to(device),
        query_lens=torch.tensor(
            [len(plan.sequences[row].token_ids) for row, _ in rows], dtype=torch.long
        ).to(device),
        context_lens=torch.tensor(contexts, dtype=torch.long).to(device),
    )

"""Which LoRA adapter sits in which device slot: the engine's bookkeeping, no tensors.

Slots are reused least-recently-used first, and never while a running request reads one. The
engine places at most one adapter per step (its copy runs between two steps), so a load never
stalls running decodes for more than one step.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection


class AdapterSlotTable:
    """adapter id <-> slot, with a least-recently-used order over the resident adapters."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # oldest use first

    def slot_of(self, adapter_id: str) -> int | None:
        return self._slot_of.get(adapter_id)

    def touch(self, adapter_id: str) -> None:
        if adapter_id in self._slot_of:
            self._slot_of.move_to_end(adapter_id)

    def place(self, adapter_id: str, busy: Collection[int]) -> int | None:
        """A slot for `adapter_id`: a free one, else the least recently used idle one (its
        adapter leaves the device). None when every slot is read by a running request."""
        if adapter_id in self._slot_of:
            return self._slot_of[adapter_id]
        taken = set(self._slot_of.values())
        free = next((s for s in range(self.num_slots) if s not in taken), None)
        if free is None:
            victim = next((a for a, s in self._slot_of.items() if s not in busy), None)
            if victim is None:
                return None
            free = self._slot_of.pop(victim)
        self._slot_of[adapter_id] = free
        return free

    @property
    def resident(self) -> list[str]:
        return list(self._slot_of)

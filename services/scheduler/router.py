"""Chooses the instance(s) for a request.

This first router spreads requests round-robin over the live instances of the request's model:
colocated instances serve alone; otherwise a prefill instance is paired with a decode instance.
The paper's Algorithm 1 (PD-aware, then cache-locality or load) replaces it in the control-plane
issue; the decision type already carries the branch and scores it will fill in.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from deepserve.errors import InvalidArgument, NotFound, Unavailable
from deepserve.records import InstanceRecord, Role
from deepserve.scheduler.instance_table import InstanceTable


@dataclass(slots=True)
class RouteFacts:
    """What routing knows about a request."""

    request_id: str
    model: str
    tenant: str = ""
    prompt_tokens: int = 0
    max_tokens: int = 0
    prefix_block_hashes: list[str] = field(default_factory=list)
    exclude_instance_ids: set[str] = field(default_factory=set)


@dataclass(slots=True)
class RouteDecision:
    """The chosen instances (prefill first when disaggregated) and why."""

    instances: list[InstanceRecord]
    disaggregated: bool
    branch: str
    reason: str
    scores: dict[str, float] = field(default_factory=dict)


class Router:
    """Round-robin over a model's live instances (branch "any")."""

    def __init__(self, table: InstanceTable) -> None:
        self._table = table
        self._counter = itertools.count()

    def route(self, facts: RouteFacts) -> RouteDecision:
        if not facts.model:
            raise InvalidArgument("model is required", field="model")
        live = [
            i
            for i in self._table.of_model(facts.model)
            if i.instance_id not in facts.exclude_instance_ids
        ]
        if not live:
            if not self._table.of_model(facts.model):
                raise NotFound(f"no live instance serves model {facts.model!r}")
            raise Unavailable(f"every instance of {facts.model!r} is excluded")
        turn = next(self._counter)
        colocated = [i for i in live if i.role == Role.COLOCATED]
        if colocated:
            chosen = colocated[turn % len(colocated)]
            return RouteDecision(
                [chosen], False, "any", f"round-robin over {len(colocated)} colocated instances"
            )
        prefill = [i for i in live if i.role == Role.PREFILL]
        decode = [i for i in live if i.role == Role.DECODE]
        if not prefill or not decode:
            raise Unavailable(f"model {facts.model!r} has no complete prefill/decode pair")
        pair = [prefill[turn % len(prefill)], decode[turn % len(decode)]]
        return RouteDecision(pair, True, "any", "round-robin over prefill/decode instances")

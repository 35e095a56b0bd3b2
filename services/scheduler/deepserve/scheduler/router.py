"""Chooses the instance(s) for a request: the paper's Algorithm 1, and simpler baselines.

    dist_sched(req, tes):
      tes <- PD_aware(req, tes)            colocated or disaggregated group, from the heatmap
      if tes.is_load_balanced():
          tes <- locality_aware(req, tes)  longest cached prefix (global prefix index)
      else:
          tes <- load_aware(req, tes)      least loaded

Everything a decision reads (live instances, loads, the prefix index, heatmaps, decode-length
histories) is a mirror of shared state in etcd and Redis, and ties break by instance id, so
every scheduler replica decides alike for the same state. Each decision names its branch, gives
its reason and the scores it compared, and is counted per branch.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from deepserve.errors import InvalidArgument, NotFound, Unavailable
from deepserve.jobs.records import RoutingPolicy
from deepserve.records import InstanceRecord
from deepserve.scheduler.decode_predictor import DecodeLengthPredictor, Prediction
from deepserve.scheduler.heatmap_table import HeatmapTable
from deepserve.scheduler.instance_table import RoleGroups
from deepserve.scheduler.load_tracker import LoadTracker
from deepserve.scheduler.policy_table import PolicyTable
from deepserve.scheduler.prefix_index import PrefixIndex


class InstanceSource(Protocol):
    """The live instances of a model by TE group (the InstanceTable)."""

    def groups(self, model: str) -> RoleGroups: ...


class SuspectSource(Protocol):
    """Instances reported failing (deepserve.scheduler.suspects.SuspectInstances)."""

    def suspects(self, instance_ids: Iterable[str]) -> set[str]: ...


@dataclass(slots=True)
class RouteFacts:
    """What routing knows about a request."""

    request_id: str
    model: str
    tenant: str = ""
    prompt_tokens: int = 0
    max_tokens: int = 0
    prefix_block_hashes: list[str] = field(default_factory=list)
    # Tokens per block the hashes were computed with: only instances of this block size can
    # hold the prompt's prefix under these hashes.
    block_size: int = 0
    exclude_instance_ids: set[str] = field(default_factory=set)
    # An explicit cached context the prompt starts with; its holders are preferred.
    cached_context_id: str = ""
    # A LoRA adapter (tenant/name): instances holding it are preferred, then load.
    adapter: str = ""


@dataclass(slots=True)
class RouteDecision:
    """The chosen instances (prefill first when disaggregated) and why."""

    instances: list[InstanceRecord]
    disaggregated: bool
    branch: str
    reason: str
    scores: dict[str, float] = field(default_factory=dict)
    policy: str = ""
    pd_reason: str = ""
    predicted_decode_tokens: int = 0


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    """Thresholds of Algorithm 1 (SchedulerSettings fills them)."""

    balance_abs_threshold: float = 4.0
    balance_rel_threshold: float = 1.5
    # Candidates whose scores a decision reports (the best first); all are compared.
    reported_scores: int = 8


@dataclass(frozen=True, slots=True)
class _Pick:
    instance: InstanceRecord
    branch: str
    reason: str
    scores: dict[str, float]


class Router:
    """Routes a request over the live instances of its model."""

    def __init__(
        self,
        table: InstanceSource,
        loads: LoadTracker,
        index: PrefixIndex,
        predictor: DecodeLengthPredictor,
        heatmaps: HeatmapTable,
        policies: PolicyTable,
        config: RoutingConfig | None = None,
        suspects: SuspectSource | None = None,
    ) -> None:
        self._table = table
        self.suspects = suspects
        self.loads = loads
        self.index = index
        self.predictor = predictor
        self.heatmaps = heatmaps
        self.policies = policies
        self.config = config or RoutingConfig()
        self.decisions: Counter[str] = Counter()
        self._turns: dict[str, itertools.count[int]] = defaultdict(itertools.count)

    def route(self, facts: RouteFacts) -> RouteDecision:
        if not facts.model:
            raise InvalidArgument("model is required", field="model")
        if facts.prompt_tokens < 0 or facts.max_tokens < 0:
            raise InvalidArgument("token counts must be >= 0", field="prompt_tokens")
        if facts.prefix_block_hashes and facts.block_size <= 0:
            raise InvalidArgument(
                "must be the positive block size the prefix hashes were computed with",
                field="block_size",
            )
        serving = self._table.groups(facts.model)
        live = (
            serving.without(facts.exclude_instance_ids) if facts.exclude_instance_ids else serving
        )
        if self.suspects is not None and live:
            # Instances a caller saw fail are avoided until their lease or load reports settle
            # it; with nothing else left they are tried rather than failing the request.
            suspect = self.suspects.suspects(
                i.instance_id for i in (*live.colocated, *live.prefill, *live.decode)
            )
            if suspect:
                healthy = live.without(suspect)
                if healthy.colocated or (healthy.prefill and healthy.decode):
                    live = healthy
        if not live:
            if not serving:
                raise NotFound(f"no live instance serves model {facts.model!r}")
            raise Unavailable(f"every instance of {facts.model!r} is excluded")
        colocated, prefill, decode = live.colocated, live.prefill, live.decode
        has_pair = bool(prefill) and bool(decode)
        if not colocated and not has_pair:
            raise Unavailable(f"model {facts.model!r} has no complete prefill/decode pair")
        policy = self.policies.policy_for(facts.model)
        prediction = self.predictor.predict(facts.model, facts.tenant, facts.max_tokens)
        disaggregated, pd_reason = self._pd_aware(
            facts, prediction, policy, has_colocated=bool(colocated), has_pair=has_pair
        )
        group = prefill if disaggregated else colocated
        first = self._pick(policy, facts, group, with_locality=True)
        chosen = [first.instance]
        scores = dict(first.scores)
        reason = first.reason
        if disaggregated:
            second = self._pick(policy, facts, decode, with_locality=False)
            chosen.append(second.instance)
            scores.update(second.scores)
            reason = f"prefill: {first.reason}; decode: {second.reason}"
        for instance in chosen:
            self.loads.note_routed(instance.instance_id)
            if facts.adapter:
                self.loads.note_adapter_routed(instance.instance_id, facts.adapter)
        self.decisions[first.branch] += 1
        self.decisions["pd:disaggregated" if disaggregated else "pd:colocated"] += 1
        return RouteDecision(
            instances=chosen,
            disaggregated=disaggregated,
            branch=first.branch,
            reason=reason,
            scores=scores,
            policy=policy.value,
            pd_reason=pd_reason,
            predicted_decode_tokens=prediction.tokens,
        )

    # --- step 1: PD-aware ------------------------------------------------------------------

    def _pd_aware(
        self,
        facts: RouteFacts,
        prediction: Prediction,
        policy: RoutingPolicy,
        *,
        has_colocated: bool,
        has_pair: bool,
    ) -> tuple[bool, str]:
        if not has_pair:
            return False, "only colocated instances are live"
        if facts.adapter and has_colocated:
            return False, "LoRA adapters are served by colocated instances"
        if not has_colocated:
            return True, "only prefill/decode pairs are live"
        if policy != RoutingPolicy.DEEPSERVE:
            return False, f"policy {policy.value} keeps to the colocated group"
        heatmap = self.heatmaps.for_model(facts.model)
        ratio = prediction.tokens / max(facts.prompt_tokens, 1)
        disaggregate, gain = heatmap.disaggregate(facts.prompt_tokens, ratio)
        basis = "history" if prediction.from_history else "max_tokens/default"
        return disaggregate, (
            f"heatmap ({heatmap.source}): prompt {facts.prompt_tokens} tokens, predicted decode "
            f"{prediction.tokens} ({basis}), ratio {ratio:.3f}: gain {gain:+.2f} "
            f"{'>' if disaggregate else '<='} {heatmap.threshold:.2f} -> "
            f"{'disaggregated' if disaggregate else 'colocated'}"
        )

    # --- step 2: locality or load, and the baselines ---------------------------------------

    def _pick(
        self,
        policy: RoutingPolicy,
        facts: RouteFacts,
        group: Sequence[InstanceRecord],
        *,
        with_locality: bool,
    ) -> _Pick:
        if policy == RoutingPolicy.ROUND_ROBIN:
            turn = next(self._turns[facts.model])
            chosen = group[turn % len(group)]
            return _Pick(
                chosen, "round_robin", f"round-robin turn {turn} -> {chosen.instance_id}", {}
            )
        if policy == RoutingPolicy.RANDOM:
            chosen = group[_draw(facts.request_id, len(group))]
            return _Pick(chosen, "random", f"random -> {chosen.instance_id}", {})
        loads = self.loads.scores(i.instance_id for i in group)
        if policy == RoutingPolicy.LEAST_LOADED or not with_locality:
            return self._least_loaded(group, loads, "least loaded")
        low, high = min(loads.values()), max(loads.values())
        if facts.adapter:
            return self._adapter_affinity(facts, group, loads, low)
        if facts.cached_context_id:
            pick = self._context_holder(facts, group, loads, low)
            if pick is not None:
                return pick
        if not self.is_balanced(low, high):
            return self._least_loaded(
                group,
                loads,
                f"group imbalanced (load {low:.1f}..{high:.1f}); least loaded",
            )
        return self._locality(facts, group, loads, low, high)

    def is_balanced(self, low: float, high: float) -> bool:
        """Balanced unless the spread beats the absolute AND the relative threshold."""
        cfg = self.config
        return high - low <= cfg.balance_abs_threshold or high <= cfg.balance_rel_threshold * low

    def _least_loaded(
        self, group: Sequence[InstanceRecord], loads: dict[str, float], why: str
    ) -> _Pick:
        # One sort ranks every candidate: the first is chosen, the first few are reported.
        ranked = sorted(group, key=lambda i: (loads[i.instance_id], i.instance_id))
        chosen = ranked[0]
        return _Pick(
            chosen,
            "load",
            f"{why}: {chosen.instance_id} (load {loads[chosen.instance_id]:.1f})",
            {i.instance_id: loads[i.instance_id] for i in ranked[: self.config.reported_scores]},
        )

    def _context_holder(
        self,
        facts: RouteFacts,
        group: Sequence[InstanceRecord],
        loads: dict[str, float],
        low: float,
    ) -> _Pick | None:
        """The least-loaded instance holding the request's cached context pinned, unless it
        is so loaded that the load branch would not have considered it balanced."""
        holders = set(self.loads.holders(facts.cached_context_id, loads))
        ranked = sorted(
            (i for i in group if i.instance_id in holders),
            key=lambda i: (loads[i.instance_id], i.instance_id),
        )
        if not ranked or not self.is_balanced(low, loads[ranked[0].instance_id]):
            return None
        chosen = ranked[0]
        return _Pick(
            chosen,
            "locality",
            f"holds cached context {facts.cached_context_id}: {chosen.instance_id} "
            f"(load {loads[chosen.instance_id]:.1f})",
            {i.instance_id: loads[i.instance_id] for i in ranked[: self.config.reported_scores]},
        )

    def _adapter_affinity(
        self,
        facts: RouteFacts,
        group: Sequence[InstanceRecord],
        loads: dict[str, float],
        low: float,
    ) -> _Pick:
        """The least-loaded instance holding the adapter, unless it is loaded past the balance
        thresholds; else the least-loaded instance of the base, which loads the adapter."""
        holders = set(self.loads.adapter_holders(facts.adapter, loads))
        ranked = sorted(
            (i for i in group if i.instance_id in holders),
            key=lambda i: (loads[i.instance_id], i.instance_id),
        )
        if ranked and self.is_balanced(low, loads[ranked[0].instance_id]):
            chosen = ranked[0]
            return _Pick(
                chosen,
                "adapter",
                f"holds adapter {facts.adapter}: {chosen.instance_id} "
                f"(load {loads[chosen.instance_id]:.1f})",
                {
                    i.instance_id: loads[i.instance_id]
                    for i in ranked[: self.config.reported_scores]
                },
            )
        why = "no instance holds adapter" if not ranked else "adapter holders too loaded"
        return self._least_loaded(group, loads, f"{why} {facts.adapter}; least loaded")

    def _locality(
        self,
        facts: RouteFacts,
        group: Sequence[InstanceRecord],
        loads: dict[str, float],
        low: float,
        high: float,
    ) -> _Pick:
        # An instance caching blocks of another size holds none of these hashes' blocks: it is
        # credited with nothing rather than matched against a chain it never built.
        same_size = [i.instance_id for i in group if i.block_size == facts.block_size]
        matched = dict.fromkeys(loads, 0)
        matched.update(self.index.match(facts.prefix_block_hashes, same_size))
        ranked = sorted(
            group, key=lambda i: (-matched[i.instance_id], loads[i.instance_id], i.instance_id)
        )
        chosen = ranked[0]
        best = matched[chosen.instance_id]
        balanced = f"group balanced (load {low:.1f}..{high:.1f})"
        if best == 0:
            why = (
                f"{balanced}; no instance holds a prefix of the prompt "
                f"({len(facts.prefix_block_hashes)} blocks); least loaded {chosen.instance_id}"
            )
        else:
            why = (
                f"{balanced}; longest cached prefix {best}/{len(facts.prefix_block_hashes)} "
                f"blocks on {chosen.instance_id}"
            )
        reported = {
            i.instance_id: float(matched[i.instance_id])
            for i in ranked[: self.config.reported_scores]
        }
        return _Pick(chosen, "locality", why, reported)


def _draw(request_id: str, n: int) -> int:
    """The same request id draws the same index on every replica; no id draws at random."""
    if not request_id:
        return random.randrange(n)
    digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % n

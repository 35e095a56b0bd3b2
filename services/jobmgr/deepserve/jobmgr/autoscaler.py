"""The autoscaler's policy: a deployment's load signals in, a replica count out (pure, no I/O).

Per deployment with autoscaling enabled:
- load: each group (colocated; or prefill and decode, sized separately) needs enough
  instances to keep queued + running requests per instance at the target, one more when its
  KV cache use is above the target, and one more when too many recent requests missed the
  group's latency objective (TTFT for prefill, TPOT for decode, either for colocated). The
  replica count is the largest any group needs, so a disaggregated deployment keeps its
  configured prefill:decode ratio;
- bounds: within [min_replicas, max_replicas], and at least one while there is traffic;
- cooldowns: no scale-up within `scale_up_cooldown_s` of the last scale-up (new instances take
  load first), no scale-down within `scale_down_cooldown_s` of any change (against flapping);
- to zero: after `scale_to_zero_after_s` without traffic (only when min_replicas is 0);
- from zero: requests held by a gateway (demand) bring it to max(1, min_replicas) at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from deepserve.jobs.records import ServingMode, ServingSpec
from deepserve.records import Role

# Fraction of recent requests that may miss an objective before a replica is added.
SLO_MISS_TOLERANCE = 0.1


@dataclass(frozen=True, slots=True)
class GroupLoad:
    """One role group of a deployment, summed over its live instances."""

    instances: int = 0
    # Queued + running requests.
    requests: int = 0
    # Mean KV cache use of its instances, 0..1.
    kv_usage: float = 0.0
    tokens_per_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Signals:
    """What the autoscaler knows about one deployment now."""

    now: float
    groups: dict[Role, GroupLoad] = field(default_factory=dict)
    # Fractions of recent requests over the TTFT / TPOT objective.
    ttft_miss: float = 0.0
    tpot_miss: float = 0.0
    # Requests held by a gateway because no instance serves the model.
    demand: bool = False
    # Requests that finished within the idle window (the gateway's latency reports).
    recent_requests: int = 0

    @property
    def busy(self) -> bool:
        # Not tokens/s: an idle engine's last snapshot keeps its old rate.
        return (
            self.demand
            or self.recent_requests > 0
            or any(g.requests > 0 for g in self.groups.values())
        )


@dataclass(slots=True)
class ScalerMemory:
    """What the autoscaler remembers about one deployment between passes."""

    last_up_at: float = float("-inf")
    last_change_at: float = float("-inf")
    idle_since: float | None = None
    # The replica count of the last pass (None: not seen yet). A count that changed without the
    # autoscaler (an operator's ScaleJob, a new deployment, a new leader) restarts the
    # scale-down cooldown, so a manual scale-up is not undone on the next pass.
    replicas_seen: int | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    replicas: int
    reason: str


def _per_replica(spec: ServingSpec) -> dict[Role, int]:
    if spec.mode == ServingMode.DISAGGREGATED:
        return {Role.PREFILL: spec.prefill_instances, Role.DECODE: spec.decode_instances}
    return {Role.COLOCATED: 1}


def _needed_replicas(spec: ServingSpec, signals: Signals) -> tuple[int, str]:
    policy = spec.autoscaling
    best, why = 0, "no load"
    for role, per_replica in _per_replica(spec).items():
        group = signals.groups.get(role, GroupLoad())
        instances = math.ceil(group.requests / policy.target_requests_per_instance)
        reasons = [f"{group.requests} requests"] if group.requests else []
        if group.instances and group.kv_usage > policy.target_kv_usage:
            instances = max(instances, group.instances + 1)
            reasons.append(f"KV {group.kv_usage:.0%}")
        slo_miss = {
            Role.PREFILL: signals.ttft_miss,
            Role.DECODE: signals.tpot_miss,
            Role.COLOCATED: max(signals.ttft_miss, signals.tpot_miss),
        }[role]
        if group.instances and slo_miss > SLO_MISS_TOLERANCE:
            instances = max(instances, group.instances + 1)
            reasons.append(f"{slo_miss:.0%} SLO misses")
        replicas = math.ceil(instances / per_replica)
        if replicas > best:
            best, why = replicas, f"{role.value}: {', '.join(reasons) or 'load'}"
    return best, why


def decide(
    spec: ServingSpec, current: int, signals: Signals, memory: ScalerMemory
) -> Decision | None:
    """The replica count the deployment should have now, or None to leave it as is.

    Updates `memory.idle_since`; the caller records a change it applied with `applied`.
    """
    policy = spec.autoscaling
    if not policy.enabled:
        return None
    lower, upper = spec.min_replicas, max(spec.max_replicas, spec.min_replicas)
    if memory.replicas_seen != current:
        memory.last_change_at = signals.now
        if memory.replicas_seen is not None and current > memory.replicas_seen:
            memory.last_up_at = signals.now
        memory.replicas_seen = current
    if signals.busy:
        memory.idle_since = None
    elif memory.idle_since is None:
        memory.idle_since = signals.now
    if current == 0:
        if signals.demand and upper > 0:
            return Decision(max(1, lower), "scale from zero: requests are waiting")
        return None
    idle_for = 0.0 if memory.idle_since is None else signals.now - memory.idle_since
    if (
        lower == 0
        and policy.scale_to_zero_after_s > 0
        and not signals.busy
        and idle_for >= policy.scale_to_zero_after_s
    ):
        return Decision(0, f"scale to zero: idle for {idle_for:.0f}s")
    needed, why = _needed_replicas(spec, signals)
    target = min(upper, max(lower, 1, needed))
    if target > current:
        if signals.now - memory.last_up_at < policy.scale_up_cooldown_s:
            return None
        return Decision(target, f"scale up: {why}")
    if target < current:
        if signals.now - memory.last_change_at < policy.scale_down_cooldown_s:
            return None
        return Decision(target, f"scale down: {why}")
    return None


def applied(memory: ScalerMemory, before: int, after: int, now: float) -> None:
    """Remembers a change the autoscaler made (for its cooldowns)."""
    memory.last_change_at = now
    memory.replicas_seen = after
    if after > before:
        memory.last_up_at = now

"""Algorithm 1 and the baseline policies over in-memory state."""

from __future__ import annotations

import pytest

from deepserve.errors import InvalidArgument, NotFound, Unavailable
from deepserve.jobs.records import RoutingPolicy
from deepserve.records import Role
from deepserve.scheduler.load_tracker import InstanceLoad
from deepserve.scheduler.router import RouteFacts, RoutingConfig

from .router_fixtures import BLOCK, MODEL, instance, make_router

PROMPT = [f"b{i}" for i in range(16)]


def facts(request_id: str = "r", **kw: object) -> RouteFacts:
    base: dict[str, object] = {
        "prompt_tokens": 256,
        "max_tokens": 64,
        "prefix_block_hashes": PROMPT,
        "block_size": BLOCK,
    }
    base.update(kw)
    return RouteFacts(request_id=request_id, model=MODEL, **base)  # type: ignore[arg-type]


def test_balanced_group_goes_to_the_longest_cached_prefix() -> None:
    router = make_router([instance("a"), instance("b"), instance("c")], loads={"b": 2})
    router.index.store("b", PROMPT[:12])
    router.index.store("c", PROMPT[:4])
    decision = router.route(facts())
    assert [i.instance_id for i in decision.instances] == ["b"]
    assert decision.branch == "locality"
    assert decision.scores == {"a": 0.0, "b": 12.0, "c": 4.0}
    assert "longest cached prefix 12/16 blocks on b" in decision.reason


def test_only_instances_caching_blocks_of_the_hashed_size_get_locality_credit() -> None:
    # "b" holds the chain's hashes but caches blocks of 8 tokens: the prompt was hashed in
    # blocks of 16, so what "b" holds is not this prefix. It scores no cached blocks.
    router = make_router([instance("a"), instance("b", block_size=8), instance("c")])
    router.index.store("b", PROMPT)
    router.index.store("c", PROMPT[:4])
    decision = router.route(facts())
    assert [i.instance_id for i in decision.instances] == ["c"]
    assert decision.scores == {"a": 0.0, "b": 0.0, "c": 4.0}
    assert "longest cached prefix 4/16 blocks on c" in decision.reason
    # Hashed with b's size instead, only b is credited.
    by_eight = router.route(facts("r8", block_size=8))
    assert [i.instance_id for i in by_eight.instances] == ["b"]
    assert by_eight.scores["b"] == 16.0 and by_eight.scores["c"] == 0.0


def test_prefix_hashes_without_their_block_size_are_refused() -> None:
    router = make_router([instance("a")])
    with pytest.raises(InvalidArgument) as refused:
        router.route(facts(block_size=0))
    assert refused.value.field == "block_size"
    # No hashes need no size: routing by load alone.
    assert router.route(facts(prefix_block_hashes=[], block_size=0)).instances[0].instance_id == "a"


def test_imbalanced_group_goes_to_the_least_loaded_instead() -> None:
    router = make_router([instance("a"), instance("b"), instance("c")], loads={"b": 20, "c": 3})
    router.index.store("b", PROMPT)
    decision = router.route(facts())
    assert decision.instances[0].instance_id == "a"
    assert decision.branch == "load"
    assert "imbalanced" in decision.reason
    assert decision.scores["b"] == 20.0


def test_balance_thresholds_are_configurable() -> None:
    loads = {"b": 20, "a": 14}
    strict = make_router([instance("a"), instance("b")], loads=loads)
    strict.index.store("b", PROMPT)
    assert strict.route(facts()).branch == "locality"  # 20 <= 1.5 * 14
    tight = make_router(
        [instance("a"), instance("b")],
        loads=loads,
        config=RoutingConfig(balance_abs_threshold=1, balance_rel_threshold=1.1),
    )
    tight.index.store("b", PROMPT)
    assert tight.route(facts()).instances[0].instance_id == "a"


def test_no_cached_prefix_anywhere_falls_back_to_least_loaded_then_id() -> None:
    router = make_router([instance("b"), instance("a")], loads={"a": 1})
    decision = router.route(facts())
    assert decision.instances[0].instance_id == "b"
    assert "no instance holds a prefix" in decision.reason


def test_routed_requests_count_as_load_until_the_next_report() -> None:
    router = make_router(
        [instance("a"), instance("b")],
        policy=RoutingPolicy.LEAST_LOADED,
    )
    chosen = [router.route(facts(f"r{i}")).instances[0].instance_id for i in range(6)]
    assert sorted(chosen) == ["a", "a", "a", "b", "b", "b"]


def test_pd_aware_sends_long_prompt_short_output_to_the_pair() -> None:
    router = make_router(
        [instance("c0"), instance("p0", Role.PREFILL), instance("d0", Role.DECODE)]
    )
    long_short = router.route(facts(prompt_tokens=4000, max_tokens=16))
    assert long_short.disaggregated
    assert [i.role for i in long_short.instances] == [Role.PREFILL, Role.DECODE]
    assert "-> disaggregated" in long_short.pd_reason
    short_long = router.route(facts(prompt_tokens=100, max_tokens=1000))
    assert not short_long.disaggregated
    assert short_long.instances[0].instance_id == "c0"
    assert router.decisions["pd:disaggregated"] == 1
    assert router.decisions["pd:colocated"] == 1


def test_pd_aware_uses_the_predicted_length_not_only_max_tokens() -> None:
    router = make_router(
        [instance("c0"), instance("p0", Role.PREFILL), instance("d0", Role.DECODE)]
    )
    for _ in range(20):
        router.predictor.observe(MODEL, "terse", 10, max_tokens=2000)
    decision = router.route(facts(prompt_tokens=4000, max_tokens=2000, tenant="terse"))
    assert decision.disaggregated
    assert decision.predicted_decode_tokens == 128
    assert "history" in decision.pd_reason


def test_only_one_group_live_needs_no_heatmap() -> None:
    pair = make_router([instance("p0", Role.PREFILL), instance("d0", Role.DECODE)])
    assert pair.route(facts(prompt_tokens=10)).disaggregated
    alone = make_router([instance("p0", Role.PREFILL)])
    with pytest.raises(Unavailable):
        alone.route(facts())


def test_round_robin_and_random_policies() -> None:
    rr = make_router(
        [instance("a"), instance("b"), instance("c")], policy=RoutingPolicy.ROUND_ROBIN
    )
    picks = [rr.route(facts(f"r{i}")).instances[0].instance_id for i in range(6)]
    assert picks == ["a", "b", "c", "a", "b", "c"]
    assert rr.decisions["round_robin"] == 6
    rnd = make_router([instance("a"), instance("b"), instance("c")], policy=RoutingPolicy.RANDOM)
    draws = {rnd.route(facts(f"req-{i}")).instances[0].instance_id for i in range(30)}
    assert draws == {"a", "b", "c"}
    # The same request id draws the same instance (on any replica).
    again = [rnd.route(facts("same")).instances[0].instance_id for _ in range(5)]
    assert len(set(again)) == 1


def test_two_routers_with_the_same_state_decide_alike() -> None:
    def build():  # type: ignore[no-untyped-def]
        r = make_router(
            [instance(f"i{n}") for n in range(8)], loads={f"i{n}": n % 3 for n in range(8)}
        )
        r.index.store("i5", PROMPT[:6])
        r.index.store("i2", PROMPT[:6])
        return r

    one, two = build(), build()
    for n in range(20):
        f = facts(f"r{n}", prefix_block_hashes=PROMPT if n % 2 else [])
        d1, d2 = one.route(f), two.route(f)
        assert [i.instance_id for i in d1.instances] == [i.instance_id for i in d2.instances]
        assert d1.reason == d2.reason


def test_exclusions_and_errors() -> None:
    router = make_router([instance("a"), instance("b")])
    router.index.store("a", PROMPT)
    assert router.route(facts(exclude_instance_ids={"a"})).instances[0].instance_id == "b"
    with pytest.raises(Unavailable):
        router.route(facts(exclude_instance_ids={"a", "b"}))
    with pytest.raises(NotFound):
        router.route(RouteFacts(request_id="r", model="other"))
    with pytest.raises(InvalidArgument):
        router.route(RouteFacts(request_id="r", model=""))


def test_a_request_naming_a_cached_context_goes_to_an_instance_holding_it() -> None:
    router = make_router(
        [instance("a"), instance("b"), instance("c")], loads={"a": 0, "b": 2, "c": 3}
    )
    router.loads.set_pinned({"b": frozenset({"ctx_1"}), "c": frozenset({"ctx_1"})})
    decision = router.route(RouteFacts("r1", MODEL, cached_context_id="ctx_1"))
    assert decision.instances[0].instance_id == "b"  # the least-loaded holder
    assert "cached context" in decision.reason
    # A context nobody holds routes as usual; an overloaded holder is passed over.
    assert (
        router.route(RouteFacts("r2", MODEL, cached_context_id="ctx_2")).instances[0].instance_id
        == "a"
    )
    router.loads.set_loads({"a": InstanceLoad(waiting=0), "b": InstanceLoad(waiting=40)})
    router.loads.set_pinned({"b": frozenset({"ctx_1"})})
    overloaded = router.route(RouteFacts("r3", MODEL, cached_context_id="ctx_1"))
    assert overloaded.instances[0].instance_id != "b"

"""Multi-LoRA routing: adapter affinity first, then load; a new adapter goes to the least loaded."""

from __future__ import annotations

from deepserve.scheduler.load_tracker import InstanceLoad
from deepserve.scheduler.router import RouteFacts

from .router_fixtures import MODEL, instance, make_router


def ids(decision) -> list[str]:  # type: ignore[no-untyped-def]
    return [i.instance_id for i in decision.instances]


def test_an_instance_holding_the_adapter_is_preferred_over_a_less_loaded_one() -> None:
    router = make_router(
        [instance("a"), instance("b"), instance("c")], loads={"a": 0, "b": 2, "c": 3}
    )
    router.loads.set_adapters({"b": frozenset({"acme/lora1"}), "c": frozenset({"acme/lora1"})})
    decision = router.route(RouteFacts("r1", MODEL, adapter="acme/lora1"))
    assert ids(decision) == ["b"]  # the least-loaded holder, not the idle "a"
    assert decision.branch == "adapter"
    assert "holds adapter acme/lora1" in decision.reason


def test_an_adapter_nobody_holds_goes_to_the_least_loaded_and_its_burst_follows() -> None:
    router = make_router(
        [instance("a"), instance("b"), instance("c")], loads={"a": 3, "b": 1, "c": 2}
    )
    first = router.route(RouteFacts("r1", MODEL, adapter="acme/new"))
    assert ids(first) == ["b"] and first.branch == "load"
    assert "no instance holds adapter" in first.reason
    # Before b's next load report lists it, this replica remembers where it sent the adapter.
    second = router.route(RouteFacts("r2", MODEL, adapter="acme/new"))
    assert ids(second) == ["b"] and second.branch == "adapter"
    # Once reports arrive they are the truth again.
    router.loads.set_adapters({"c": frozenset({"acme/new"})})
    router.loads.set_loads({i: InstanceLoad(waiting=1) for i in "abc"})
    assert ids(router.route(RouteFacts("r3", MODEL, adapter="acme/new"))) == ["c"]


def test_an_overloaded_holder_is_passed_over_for_load() -> None:
    router = make_router([instance("a"), instance("b")], loads={"a": 0, "b": 40})
    router.loads.set_adapters({"b": frozenset({"acme/lora1"})})
    decision = router.route(RouteFacts("r1", MODEL, adapter="acme/lora1"))
    assert ids(decision) == ["a"]
    assert "too loaded" in decision.reason


def test_base_model_requests_ignore_adapters() -> None:
    router = make_router([instance("a"), instance("b")], loads={"a": 2, "b": 0})
    router.loads.set_adapters({"a": frozenset({"acme/lora1"})})
    assert ids(router.route(RouteFacts("r1", MODEL))) == ["b"]

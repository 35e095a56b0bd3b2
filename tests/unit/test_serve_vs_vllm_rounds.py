"""bench.serve_vs_vllm's rounds: medians per system, ratios paired round by round."""

from __future__ import annotations

from bench.serve_vs_vllm import QUICK, SystemRun, _paired_ratio, prefix_chat_calls, report


def _figures(tok_s: float, ttft: float, tpot: float) -> dict[str, float]:
    return {"output_tok_s": tok_s, "ttft_p50_ms": ttft, "tpot_p50_ms": tpot, "wall_s": 1.0}


def test_results_are_the_median_over_rounds() -> None:
    run = SystemRun(system="deepserve", ready_s=1.0)
    for tok_s in (10.0, 30.0, 20.0):
        run.add("mixed", _figures(tok_s, 100.0, 10.0))
    assert run.results["mixed"]["output_tok_s"] == 20.0
    assert [r["output_tok_s"] for r in run.rounds["mixed"]] == [10.0, 30.0, 20.0]


def test_ratios_pair_each_round_with_the_same_round_of_the_other_server() -> None:
    # The host slows down 2x in round 2 for both: paired ratios stay 1.5x, while the ratio of
    # medians of unpaired figures would not see that each round was a 1.5x win.
    ours = [_figures(15.0, 1, 1), _figures(7.5, 1, 1), _figures(30.0, 1, 1)]
    theirs = [_figures(10.0, 1, 1), _figures(5.0, 1, 1), _figures(20.0, 1, 1)]
    assert _paired_ratio(ours, theirs, "output_tok_s") == "1.50x [1.50-1.50]"
    assert _paired_ratio(ours[:1], theirs[:1], "output_tok_s") == "1.50x"


def test_the_report_names_the_better_vllm_and_the_paired_ratios() -> None:
    ours = SystemRun(system="deepserve", ready_s=1.0)
    pinned = SystemRun(system="vllm-pinned", ready_s=1.0)
    default = SystemRun(system="vllm-default", ready_s=1.0)
    for i in range(2):
        ours.add("mixed", _figures(12.0 + i, 900.0, 40.0))
        pinned.add("mixed", _figures(10.0, 1000.0, 50.0))
        default.add("mixed", _figures(8.0, 1000.0, 50.0))
    text = report([pinned, ours, default], ["mixed"])
    assert "vllm-pinned (best)" in text
    assert "| mixed    | vllm-pinned (best) | 1.25x [1.20-1.30]" in text


def test_each_chat_session_has_its_own_shared_prefix() -> None:
    first, second = prefix_chat_calls(QUICK, 0), prefix_chat_calls(QUICK, 1)
    system = [c.body["messages"][0]["content"] for c in first]
    assert len(set(system)) == 1  # one round shares its system prompt
    assert second[0].body["messages"][0]["content"] != system[0]

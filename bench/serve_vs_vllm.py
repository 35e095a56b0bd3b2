"""DeepServe (`deepserve up`, through the gateway) against vLLM's CPU server, same model and host.

All servers start first and stay up, each on the same model directory, dtype and KV cache size;
then `--rounds` rounds run every workload on each server in turn (the order rotates each round),
so the systems compared take turns within seconds of each other. This host's speed swings by up
to 2x from one minute to the next, which one-server-after-the-other runs mistook for differences
between the systems. A server waits idle while another is measured, and each run starts once the
host has gone quiet: vLLM's CPU worker keeps a core busy for about a second after its last
request, which billed whoever ran next. Each figure is the median over rounds; each ratio is the
median of the rounds' paired ratios. Every round draws its own prompts (seeds and the chat
session differ), so no round reads what an earlier one cached.

Servers:
- deepserve: `deepserve up` with the model (etcd, valkey, scheduler, podpool, gateway, one pod);
  every request goes through the gateway's HTTP API.
- vllm-default: `python -m vllm.entrypoints.openai.api_server` from vLLM's own virtual
  environment (bench/vllm_env.py makes it once), its thread settings left alone.
- vllm-pinned: the same with VLLM_CPU_OMP_THREADS_BIND over all cores (one OpenMP thread per
  core, pinned), vLLM's best setting on this host. Ratios are taken against the better vLLM.

Workloads (greedy, ignore_eos, streamed; TTFT and TPOT per request):
- mixed: N requests at once, prompts as token ids 16-512 tokens, outputs 16-256 tokens;
- bench-c8 / bench-c32: `vllm bench serve` (vLLM's own client), random dataset 256 in / 64 out,
  at max concurrency 8 and 32;
- prefix-chat: chat requests sharing a long system prompt, different questions, concurrency 8.

Once the servers are gone, the host's best matmul rate is measured in the run's dtype, and the
report gives each workload's arithmetic ceiling (its FLOPs at that rate, bench.compute_ceiling)
with each system's share of it, and the share the throughput goal asks: whether a ratio goal is
reachable at all on this host.

    .venv/bin/python -m bench.serve_vs_vllm            # the full run, 3 rounds (~40 min)
    .venv/bin/python -m bench.serve_vs_vllm --quick    # smaller workloads (~15 min)
    .venv/bin/python -m bench.serve_vs_vllm --quick --systems deepserve  # our side alone
    .venv/bin/python -m bench.serve_vs_vllm --quick --report run.json  # a saved --json run
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.common import markdown_table, progress
from bench.compute_ceiling import (
    DecoderShape,
    ceiling_tok_s,
    measured_matmul_rate,
    workload_flops,
)
from bench.machine import wait_until_quiet
from bench.serving_client import (
    Call,
    StreamingClient,
    WorkloadResult,
    chat_call,
    completion_call,
)
from bench.vllm_env import DEFAULT_VENV, ensure_vllm_venv
from deepserve.models.catalog import DEFAULT_MODEL, default_cache_dir, find_catalog_model
from deepserve.models.pull import pull_model
from deepserve.processes import free_port

HOST = "127.0.0.1"
FIRST_PLAIN_TOKEN_ID = 100  # SmolLM2 keeps its special tokens below
SYSTEMS = ("deepserve", "vllm-default", "vllm-pinned")
WORKLOADS = ("mixed", "bench-c8", "bench-c32", "prefix-chat")
THROUGHPUT_GOAL = 1.3
BENCH_INPUT_TOKENS = 256  # `vllm bench serve`'s random dataset, per prompt
BENCH_OUTPUT_TOKENS = 64


@dataclass(frozen=True, slots=True)
class Sizes:
    mixed_requests: int
    mixed_prompt: tuple[int, int]
    mixed_output: tuple[int, int]
    bench_prompts: int
    chat_requests: int
    chat_output: int


FULL = Sizes(64, (16, 512), (16, 256), 32, 32, 64)
QUICK = Sizes(16, (16, 384), (16, 64), 8, 8, 32)


@dataclass(slots=True)
class SystemRun:
    """One server's results over the workloads, with the load average around them."""

    system: str
    ready_s: float
    # Median over rounds, per workload.
    results: dict[str, dict[str, float]] = field(default_factory=dict)
    # Each round's figures, per workload, in round order.
    rounds: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def add(self, workload: str, summary: dict[str, float]) -> None:
        self.rounds.setdefault(workload, []).append(summary)
        per_round = self.rounds[workload]
        self.results[workload] = {
            key: statistics.median(r[key] for r in per_round) for key in per_round[0]
        }


# ----- servers --------------------------------------------------------------------------------


def _models_listed(base_url: str, model: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/v1/models", timeout=5) as response:
            data = json.load(response)
    except OSError:
        return False
    return any(m.get("id") == model for m in data.get("data", []))


def _wait_listed(
    proc: subprocess.Popen[bytes], base_url: str, model: str, timeout_s: float, log: Path
) -> None:
    deadline = time.monotonic() + timeout_s
    while not _models_listed(base_url, model):
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"server exited ({proc.returncode}) before serving:\n{tail}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{base_url} did not list {model} in {timeout_s:.0f}s (log: {log})")
        time.sleep(1.0)


def _stop(proc: subprocess.Popen[bytes], grace_s: float = 60.0) -> None:
    """SIGINT to the server's own process group (it was started in one), then SIGKILL."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group (workers, pods)
    except ProcessLookupError:
        pass
    proc.wait()


@contextmanager
def _serving(
    command: list[str], env: dict[str, str], log: Path, base_url: str, model: str
) -> Iterator[None]:
    """Runs a server in its own session until it lists `model`; stops its whole group after."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        _wait_listed(proc, base_url, model, 900, log)
        yield
    finally:
        _stop(proc)


@contextmanager
def deepserve_server(
    name: str, model: str, kv_gib: int, work_dir: Path, extra_env: dict[str, str]
) -> Iterator[str]:
    ports = {
        name: free_port()
        for name in ("etcd", "etcd-peer", "redis", "http", "gateway", "jobmgr", "scheduler")
    }
    ports["podpool"] = free_port()
    command = [str(Path(sys.executable).with_name("deepserve")), "up", "--model", model]
    command += ["--run-dir", str(work_dir / f"{name}-run"), "--warm-pods", "0"]
    command += ["--startup-timeout", "900"]
    for name, port in ports.items():
        command += [f"--{name}-port", str(port)]
    env = {
        **os.environ,
        "DEEPSERVE_FLOWSERVE_KV_CACHE_MEMORY_MB": str(int(kv_gib * 1024)),
        # A loaded shared host stretches a request past the gateway's default 600 s.
        "DEEPSERVE_GATEWAY_REQUEST_TIMEOUT_S": "7200",
        **extra_env,
    }
    base_url = f"http://{HOST}:{ports['http']}"
    with _serving(command, env, work_dir / f"{name}.log", base_url, model):
        yield base_url


@contextmanager
def vllm_server(
    python: Path,
    model_dir: Path,
    served_name: str,
    dtype: str,
    kv_gib: int,
    pinned: bool,
    work_dir: Path,
) -> Iterator[str]:
    port = free_port()
    command = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
    command += ["--served-model-name", served_name, "--dtype", dtype]
    command += ["--host", HOST, "--port", str(port)]
    env = {
        **os.environ,
        "VLLM_TARGET_DEVICE": "cpu",
        "VLLM_CPU_KVCACHE_SPACE": str(kv_gib),  # whole GiB only
        "VLLM_LOGGING_LEVEL": "WARNING",
    }
    if pinned:
        env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{(os.cpu_count() or 1) - 1}"
    log = work_dir / f"vllm-{'pinned' if pinned else 'default'}.log"
    base_url = f"http://{HOST}:{port}"
    with _serving(command, env, log, base_url, served_name):
        yield base_url


# ----- workloads ------------------------------------------------------------------------------


def mixed_calls(sizes: Sizes, vocab_size: int, seed: int) -> list[Call]:
    rng = random.Random(seed)
    calls = []
    for _ in range(sizes.mixed_requests):
        length = rng.randint(*sizes.mixed_prompt)
        prompt = [rng.randrange(FIRST_PLAIN_TOKEN_ID, vocab_size) for _ in range(length)]
        calls.append(completion_call(prompt, rng.randint(*sizes.mixed_output)))
    return calls


_MANUAL = (
    "You are the support assistant of Northwind Outfitters, a shop for hiking and camping gear. "
    "Answer in two or three sentences, politely, and only about our products and policies. "
    "Returns: unused items within 60 days with the receipt; worn boots within 14 days if they "
    "hurt. Shipping: free above 80 euros, otherwise 6 euros; express next day for 15 euros. "
    "Tents: the Ridge 2 weighs 1.9 kg, sleeps two, and pitches in four minutes; the Basecamp 6 "
    "sleeps six and has a vestibule for boots. Sleeping bags are rated by comfort temperature; "
    "the Alpine Down is good to minus 8 degrees, the Summer Light to plus 10. Stoves: canister "
    "stoves boil a litre in three minutes; liquid fuel stoves work better in cold weather. "
    "Repairs: we patch tents and resole boots in our workshop within two weeks, at cost. "
    "Membership: members collect 5 percent back on every purchase and get early sale access. "
)
_QUESTIONS = (
    "Can I return boots I wore on one hike?",
    "Which sleeping bag should I take for a night at minus five degrees?",
    "How heavy is the Ridge 2 and how long does it take to pitch?",
    "What does express shipping cost?",
    "Do you repair torn tents, and how long does it take?",
    "Which stove is better for winter camping?",
    "What do members get?",
    "Is shipping free for a 50 euro order?",
)


def prefix_chat_calls(sizes: Sizes, session: int) -> list[Call]:
    # The session number leads the system prompt: requests of one round share it (the prefix
    # cache's case), and no round finds an earlier round's prompt cached.
    system = {"role": "system", "content": f"Session {session}. " + _MANUAL * 2}
    return [
        chat_call(
            [system, {"role": "user", "content": _QUESTIONS[i % len(_QUESTIONS)]}],
            sizes.chat_output,
        )
        for i in range(sizes.chat_requests)
    ]


def vllm_bench_serve(
    python: Path,
    base_url: str,
    served_name: str,
    model_dir: Path,
    prompts: int,
    concurrency: int,
    work_dir: Path,
    seed: int,
) -> WorkloadResult:
    """`vllm bench serve`: random 256 in / 64 out; its own JSON result, read back."""
    name = f"bench-c{concurrency}"
    result_file = f"{name}-{time.time_ns()}.json"
    command = [str(python), "-m", "vllm.entrypoints.cli.main", "bench", "serve"]
    command += ["--backend", "openai", "--base-url", base_url, "--endpoint", "/v1/completions"]
    command += ["--model", served_name, "--tokenizer", str(model_dir)]
    command += ["--dataset-name", "random", "--random-input-len", str(BENCH_INPUT_TOKENS)]
    command += ["--random-output-len", str(BENCH_OUTPUT_TOKENS), "--num-prompts", str(prompts)]
    command += ["--max-concurrency", str(concurrency), "--ignore-eos", "--seed", str(seed)]
    command += ["--save-result", "--result-dir", str(work_dir), "--result-filename", result_file]
    log = work_dir / f"{name}.log"
    with log.open("ab") as out:
        subprocess.run(command, check=True, stdout=out, stderr=subprocess.STDOUT)
    data = json.loads((work_dir / result_file).read_text())
    tokens = int(data["total_output_tokens"])
    return WorkloadResult(
        workload=name,
        output_tokens=tokens,
        wall_s=tokens / float(data["output_throughput"]),
        ttft_s=[float(data["median_ttft_ms"]) / 1e3],
        tpot_s=[float(data["median_tpot_ms"]) / 1e3],
    )


def _round_seed(args: argparse.Namespace, workload: str, round_index: int) -> int:
    """The seed of a round's prompts: each round and workload draws its own."""
    return args.seed + 1000 * round_index + WORKLOADS.index(workload)


def _bench_prompts(sizes: Sizes, workload: str) -> tuple[int, int]:
    """(prompts, concurrency) of a `vllm bench serve` workload: at least one prompt per slot."""
    concurrency = int(workload.removeprefix("bench-c"))
    return max(sizes.bench_prompts, concurrency), concurrency


def workload_requests(
    workload: str, round_index: int, args: argparse.Namespace, vocab_size: int
) -> list[tuple[int, int]] | None:
    """(prompt tokens, output tokens) of each request of a round's workload, as `run_workload`
    sends them; None for prefix-chat, whose work depends on what the prefix cache finds."""
    sizes = QUICK if args.quick else FULL
    if workload == "mixed":
        calls = mixed_calls(sizes, vocab_size, _round_seed(args, workload, round_index))
        return [(len(c.body["prompt"]), c.max_tokens) for c in calls]
    if workload.startswith("bench-c"):
        prompts, _ = _bench_prompts(sizes, workload)
        return [(BENCH_INPUT_TOKENS, BENCH_OUTPUT_TOKENS)] * prompts
    return None


def workload_ceilings(
    args: argparse.Namespace, shape: DecoderShape, vocab_size: int, rate: float
) -> dict[str, list[float]]:
    """Each workload's arithmetic ceiling in tok/s, round by round (see bench.compute_ceiling)."""
    ceilings: dict[str, list[float]] = {}
    for workload in args.workloads:
        for round_index in range(args.rounds):
            requests = workload_requests(workload, round_index, args, vocab_size)
            if requests is None:
                break
            flops, tokens = workload_flops(shape, requests)
            ceilings.setdefault(workload, []).append(ceiling_tok_s(flops, tokens, rate))
    return ceilings


def warm_up(base_url: str, served_name: str) -> None:
    """The same for every server: 8 concurrent requests (256 tokens in, 48 out) make a
    full-size prefill step and 48 decode steps, which pay the one-time costs (kernels for new
    shapes; DeepServe reorders its weights over its first ~34 steps, vLLM compiles and profiles
    at startup instead) before anything is measured."""
    client = StreamingClient(base_url, served_name)
    warm = [completion_call([FIRST_PLAIN_TOKEN_ID + i] * 256, 48) for i in range(8)]
    asyncio.run(client.run("warmup", warm, None))


def run_workload(
    workload: str,
    round_index: int,
    base_url: str,
    args: argparse.Namespace,
    vllm_python: Path | None,
    model_dir: Path,
    vocab_size: int,
    work_dir: Path,
) -> dict[str, float]:
    """One workload on one server; the prompts depend on the round (and the seed) only."""
    sizes = QUICK if args.quick else FULL
    client = StreamingClient(base_url, args.served_name)
    seed = _round_seed(args, workload, round_index)
    if workload == "mixed":
        result = asyncio.run(client.run(workload, mixed_calls(sizes, vocab_size, seed), None))
    elif workload == "prefix-chat":
        calls = prefix_chat_calls(sizes, args.seed + round_index)
        result = asyncio.run(client.run(workload, calls, 8))
    else:
        assert vllm_python is not None
        prompts, concurrency = _bench_prompts(sizes, workload)
        result = vllm_bench_serve(
            vllm_python,
            base_url,
            args.served_name,
            model_dir,
            prompts,
            concurrency,
            work_dir,
            seed,
        )
    return result.summary()


# ----- report ---------------------------------------------------------------------------------


def report(
    runs: list[SystemRun],
    workloads: list[str],
    ceilings: dict[str, list[float]] | None = None,
    rate: float = 0.0,
) -> str:
    lines = []
    rows = []
    for run in runs:
        for w in workloads:
            s = run.results.get(w)
            if s is None:
                continue
            rows.append(
                [run.system, w, s["output_tok_s"], s["ttft_p50_ms"], s["tpot_p50_ms"], s["wall_s"]]
            )
    lines.append(
        markdown_table(
            ["system", "workload", "output tok/s", "TTFT p50 ms", "TPOT p50 ms", "wall s"], rows
        )
    )
    loads = [
        [
            r.system,
            r.ready_s,
            " / ".join(f"{x:.1f}" for x in r.load_before),
            " / ".join(f"{x:.1f}" for x in r.load_after),
        ]
        for r in runs
    ]
    lines.append("")
    lines.append(markdown_table(["system", "ready s", "load avg before", "load avg after"], loads))
    ours = next((r for r in runs if r.system == "deepserve"), None)
    theirs = [r for r in runs if r.system.startswith("vllm")]
    if ours is not None and theirs:
        ratio_rows = []
        for w in workloads:
            mine = ours.results.get(w)
            candidates = [r for r in theirs if w in r.results]
            if mine is None or not candidates:
                continue
            best = max(candidates, key=lambda r: r.results[w]["output_tok_s"])
            for other in candidates:
                row = [w, other.system + (" (best)" if other is best else "")]
                for key in ("output_tok_s", "ttft_p50_ms", "tpot_p50_ms"):
                    row.append(_paired_ratio(ours.rounds[w], other.rounds[w], key))
                ratio_rows.append(row)
        lines.append("")
        lines.append(
            f"DeepServe / vLLM, median of the rounds' ratios [lowest-highest] (tok/s goal >= "
            f"{THROUGHPUT_GOAL}x; TTFT and TPOT: <= 1.00x is as good or better)"
        )
        lines.append(
            markdown_table(["workload", "vs", "output tok/s", "TTFT p50", "TPOT p50"], ratio_rows)
        )
    if ceilings:
        lines.append("")
        lines.append(ceiling_report(runs, ceilings, rate))
    return "\n".join(lines)


def ceiling_report(runs: list[SystemRun], ceilings: dict[str, list[float]], rate: float) -> str:
    """Each system's tok/s as a share of the workload's arithmetic ceiling (median of the
    rounds' shares), and the share the throughput goal asks of DeepServe."""
    rows = []
    theirs = [r for r in runs if r.system.startswith("vllm")]
    for workload, per_round in ceilings.items():
        row: list[object] = [workload, statistics.median(per_round)]
        for run in runs:
            row.append(_share(run.rounds.get(workload, []), per_round))
        best = [r for r in theirs if workload in r.results]
        if best:
            vllm = max(best, key=lambda r: r.results[workload]["output_tok_s"])
            shares = [
                f["output_tok_s"] / c
                for f, c in zip(vllm.rounds[workload], per_round, strict=False)
            ]
            row.append(f"{THROUGHPUT_GOAL * statistics.median(shares):.0%}")
        else:
            row.append("-")
        rows.append(row)
    headers = ["workload", "ceiling tok/s", *(f"{r.system} share" for r in runs)]
    headers.append(f"goal ({THROUGHPUT_GOAL}x the better vLLM)")
    title = (
        f"Arithmetic ceiling: the workload's FLOPs at this host's best matmul rate "
        f"({rate / 1e9:.0f} GFLOP/s, bench.compute_ceiling); no server exceeds 100%"
    )
    return title + "\n" + markdown_table(headers, rows)


def _share(figures: list[dict[str, float]], ceilings: list[float]) -> str:
    shares = [f["output_tok_s"] / c for f, c in zip(figures, ceilings, strict=False)]
    return f"{statistics.median(shares):.0%}" if shares else "-"


def _paired_ratio(ours: list[dict[str, float]], theirs: list[dict[str, float]], key: str) -> str:
    """Median of round-by-round ratios (round i of one server against round i of the other,
    run seconds apart), with their range when there is more than one round."""
    ratios = sorted(a[key] / b[key] for a, b in zip(ours, theirs, strict=False) if b[key])
    if not ratios:
        return "-"
    text = f"{statistics.median(ratios):.2f}x"
    if len(ratios) > 1:
        text += f" [{ratios[0]:.2f}-{ratios[-1]:.2f}]"
    return text


# ----- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="catalog name or model directory")
    parser.add_argument("--quick", action="store_true", help="smaller workloads")
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16, both servers")
    parser.add_argument("--kv-gib", type=int, default=2, help="KV cache GiB, both servers")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"from {','.join(SYSTEMS)}")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"from {WORKLOADS}")
    parser.add_argument(
        "--deepserve-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for `deepserve up` (e.g. DEEPSERVE_FLOWSERVE_THREADS=1)",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL:KEY=VALUE[,KEY=VALUE]",
        help="also run `deepserve up` with this environment, as system deepserve-LABEL (A/B)",
    )
    parser.add_argument("--vllm-venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--json", type=Path, default=None, help="write the raw figures here")
    parser.add_argument(
        "--report",
        type=Path,
        default=None,
        metavar="JSON",
        help="only print the report of a saved --json run (give it the run's --quick/--rounds)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--rounds", type=int, default=3, help="turns of every workload on every server"
    )
    args = parser.parse_args(argv)
    args.systems = [s for s in args.systems.split(",") if s]
    args.variants = {}
    for item in args.variant:
        label, _, pairs = item.partition(":")
        args.variants[f"deepserve-{label}"] = dict(p.split("=", 1) for p in pairs.split(",") if p)
    args.workloads = [w for w in args.workloads.split(",") if w]
    for s in args.systems:
        if s not in SYSTEMS:
            parser.error(f"--systems: unknown {s!r}")
    for w in args.workloads:
        if w not in WORKLOADS:
            parser.error(f"--workloads: unknown {w!r}")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def _model_dir(model: str) -> tuple[Path, str]:
    as_path = Path(model).expanduser()
    if as_path.is_dir():
        return as_path.resolve(), str(as_path.resolve())
    entry = find_catalog_model(model)
    if entry is None:
        raise SystemExit(f"{model!r} is neither a model directory nor a catalog model")
    return pull_model(model, default_cache_dir(), progress=progress), entry.name


def _ceilings(
    args: argparse.Namespace, model_dir: Path, vocab_size: int
) -> tuple[float, dict[str, list[float]]]:
    """The host's matmul rate in the servers' dtype (measured on a quiet host, no server
    running) and the workloads' ceilings at it."""
    wait_until_quiet()
    shape = DecoderShape.of(model_dir)
    rate = measured_matmul_rate(shape, getattr(torch, args.dtype), os.cpu_count() or 1)
    ceilings = workload_ceilings(args, shape, vocab_size, rate)
    progress(f"matmul rate {rate / 1e9:.0f} GFLOP/s ({args.dtype}); ceilings {ceilings}")
    return rate, ceilings


def _save(path: Path, runs: list[SystemRun], **extra: object) -> None:
    """The run's figures as JSON: the systems' rounds, and the ceilings once measured."""
    path.write_text(json.dumps({"runs": [dataclasses.asdict(r) for r in runs], **extra}, indent=1))


def _report_saved(args: argparse.Namespace, model_dir: Path, vocab_size: int) -> int:
    """The report of a saved --json run (same --quick, --seed, --rounds and --dtype as it was
    run with), with the ceilings measured now if the file has none."""
    saved = json.loads(args.report.read_text())
    if isinstance(saved, list):  # files written before the ceilings were added
        saved = {"runs": saved}
    runs = [SystemRun(**r) for r in saved["runs"]]
    for run in runs:
        run.load_before, run.load_after = tuple(run.load_before), tuple(run.load_after)
    args.workloads = [w for w in args.workloads if any(w in r.rounds for r in runs)]
    if "ceilings" in saved:
        rate, ceilings = float(saved["rate"]), saved["ceilings"]
    else:
        rate, ceilings = _ceilings(args, model_dir, vocab_size)
    print(report(runs, args.workloads, ceilings, rate))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model_dir, args.served_name = _model_dir(args.model)
    vocab_size = int(json.loads((model_dir / "config.json").read_text())["vocab_size"])
    if args.report is not None:
        return _report_saved(args, model_dir, vocab_size)
    needs_vllm = any(s.startswith("vllm") for s in args.systems) or any(
        w.startswith("bench-") for w in args.workloads
    )
    vllm_python = ensure_vllm_venv(args.vllm_venv, progress) if needs_vllm else None
    # FlowServe's C++ kernels (built once per host; pods only load them).
    subprocess.run([sys.executable, "-m", "deepserve.flowserve.kernels"], check=False)
    extra_env = dict(item.split("=", 1) for item in args.deepserve_env)
    if args.dtype:
        extra_env.setdefault("DEEPSERVE_FLOWSERVE_DTYPE", args.dtype)
    progress(
        f"model {args.served_name} ({model_dir}), {args.dtype}, KV {args.kv_gib} GiB, "
        f"{os.cpu_count()} cores; systems {args.systems}; workloads {args.workloads}"
    )
    runs: list[SystemRun] = []
    urls: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="serve-vs-vllm-") as tmp, ExitStack() as servers:
        work_dir = Path(tmp)
        # vLLM first: its start (torch.compile) is the long one.
        systems = sorted([*args.systems, *args.variants], key=lambda s: not s.startswith("vllm"))
        for system in systems:
            started = time.monotonic()
            progress(f"{system}: starting (load avg {os.getloadavg()[0]:.1f})")
            if system.startswith("deepserve"):
                env = {**extra_env, **args.variants.get(system, {})}
                server = deepserve_server(system, args.served_name, args.kv_gib, work_dir, env)
            else:
                assert vllm_python is not None
                server = vllm_server(
                    vllm_python,
                    model_dir,
                    args.served_name,
                    args.dtype,
                    args.kv_gib,
                    system == "vllm-pinned",
                    work_dir,
                )
            urls[system] = servers.enter_context(server)
            run = SystemRun(system=system, ready_s=time.monotonic() - started)
            progress(f"{system}: ready in {run.ready_s:.0f}s at {urls[system]}; warming up")
            warm_up(urls[system], args.served_name)
            runs.append(run)
        for run in runs:
            run.load_before = os.getloadavg()
        for round_index in range(args.rounds):
            # Rotate who goes first, so no system always runs right after the same other one.
            order = runs[round_index % len(runs) :] + runs[: round_index % len(runs)]
            for workload in args.workloads:
                for run in order:
                    waited = wait_until_quiet()
                    progress(
                        f"round {round_index + 1}/{args.rounds}: {run.system}: {workload} "
                        f"(host quiet after {waited:.1f}s) ..."
                    )
                    s = run_workload(
                        workload,
                        round_index,
                        urls[run.system],
                        args,
                        vllm_python,
                        model_dir,
                        vocab_size,
                        work_dir,
                    )
                    run.add(workload, s)
                    progress(
                        f"round {round_index + 1}/{args.rounds}: {run.system}: {workload}: "
                        f"{s['output_tok_s']:.1f} tok/s, TTFT p50 {s['ttft_p50_ms']:.0f} ms, "
                        f"TPOT p50 {s['tpot_p50_ms']:.1f} ms"
                    )
            if args.json is not None:  # after each round: a long run cut short keeps its part
                _save(args.json, runs)
        for run in runs:
            run.load_after = os.getloadavg()
    rate, ceilings = _ceilings(args, model_dir, vocab_size)
    if args.json is not None:
        _save(args.json, runs, rate=rate, ceilings=ceilings)
    print(report(runs, args.workloads, ceilings, rate))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

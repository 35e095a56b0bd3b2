"""Cross-host data paths against the wire (issue #16): weight fork and KV bytes between two
network-namespace hosts (veth pair + bridge, 198.18.0.0/15), beside a plain socket copy of the
same kind of bytes between the same two hosts in the same run.

Paths, each timed `--repeats` times, alternating (median reported, GB/s and % of the socket):
  socket     one TCP connection, `sendall` from memory / `recv_into` memory already touched
             (the wire's speed; the KV paths write into such memory too);
  socket_to_shm  the same, received into a new /dev/shm file's mapping, where a fork target
             writes its copy (tmpfs allocates pages as they fill: the ceiling of any fork);
  fork_grpc  the real fork (`StreamWeights` + `receive_weights`) over gRPC chunks;
  fork_tcp   the real fork with `bulk_tcp`: manifest and offer over gRPC, the bytes over TCP;
  kv_grpc    a KV tensor through the real PD hand-off: `serve_prefill` on host a (over a fixed
             tensor instead of a model), `GrpcPrefillSource.prefill` on host b writing into a
             block-indexed tensor (as the engine copies into its cache); gRPC chunks, 4 MB each;
  kv_tcp     the same hand-off with KV_TRANSPORT_TCP: an offer, then each chunk's metadata in a
             message and its bytes on the socket, sent from the tensor's memory and read into
             the transfer's landing tensor (`transfer.landing`), then written into place.
Needs root. netem (`tc qdisc netem`) is probed and reported; where available, `--delay-ms`
adds one-way delay on host a's link.

    .venv/bin/python -m bench.crosshost                # 512 MB of weights, 64 MB of KV
    .venv/bin/python -m bench.crosshost --quick        # small sizes: checks the pipeline
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import markdown_table, progress

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.multihost.netns import fabric, netem_available

BLOCK_SIZE = 16


def make_random_llama(path: Path, hidden: int, layers: int, vocab: int) -> dict[str, int]:
    """A random Llama in Hugging Face format (fp32), sized by hidden size and layer count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 256),
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    if not (path / "config.json").exists():
        torch.manual_seed(0)
        LlamaForCausalLM(config).to(torch.float32).save_pretrained(path, safe_serialization=True)
    return {
        "layers": layers,
        "kv_heads": config.num_key_value_heads,
        "head_dim": hidden // config.num_attention_heads,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-crosshost-"))
    progress("making the model")
    shape = make_random_llama(work / "model", args.hidden, args.layers, args.vocab)
    kv_shape = (
        shape["layers"], 2, args.kv_tokens // BLOCK_SIZE, BLOCK_SIZE,
        shape["kv_heads"], shape["head_dim"],
    )  # fmt: skip
    common = [
        "--model", str(work / "model"), "--socket-bytes", str(args.socket_mb << 20),
        "--kv-shape", ",".join(map(str, kv_shape)),
    ]  # fmt: skip
    netem = netem_available()
    with fabric(["a", "b"]) as fab:
        if args.delay_ms and netem:
            fab.delay("a", args.delay_ms)
        source = fab.spawn(
            "a", "crosshost-source",
            [sys.executable, "-m", "bench.crosshost_worker", "serve", "--host", fab["a"].address,
             *common],
            work / "source.log", dict(os.environ),
        )  # fmt: skip
        deadline = time.monotonic() + 300
        while "ready" not in (work / "source.log").read_text(errors="replace"):
            if not source.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"source did not start:\n{source.tail()}")
            time.sleep(0.2)
        progress(f"source up on {fab['a'].address}; fetching from {fab['b'].address}")
        load_before = os.getloadavg()
        done = subprocess.run(
            ["ip", "netns", "exec", fab["b"].netns, sys.executable, "-m",
             "bench.crosshost_worker", "fetch", "--source-host", fab["a"].address,
             "--repeats", str(args.repeats), *common],
            capture_output=True, text=True, timeout=1800, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"fetch failed:\n{done.stderr[-3000:]}")
        out = json.loads(done.stdout.strip().splitlines()[-1])
    out["loadavg"] = [load_before, os.getloadavg()]
    out["netem"] = netem
    out["delay_ms"] = args.delay_ms if netem else 0
    return out


def report(out: dict[str, Any]) -> str:
    rates = {k: statistics.median(v) for k, v in out["gbps"].items()}
    socket_rate = rates["socket"]
    sizes = {
        "socket": out["socket_bytes"],
        "socket_to_shm": out["socket_bytes"],
        "fork_grpc": out["weights_bytes"],
        "fork_tcp": out["weights_bytes"],
        "kv_grpc": out["kv_bytes"],
        "kv_tcp": out["kv_bytes"],
    }
    rows = [
        [path, f"{sizes[path] / 1e6:.0f}", f"{rate:.2f}", f"{rate / socket_rate:.0%}",
         " ".join(f"{r:.2f}" for r in out["gbps"][path])]
        for path, rate in rates.items()
    ]  # fmt: skip
    (l1, _, _), (l2, _, _) = out["loadavg"]
    lines = [
        markdown_table(["path", "MB", "GB/s (median)", "of socket", "runs GB/s"], rows),
        "",
        f"load average {l1:.1f} before, {l2:.1f} after; netem "
        + ("available" if out["netem"] else "unavailable in this kernel (no delay added)"),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--kv-tokens", type=int, default=4096)
    parser.add_argument("--socket-mb", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.layers, args.vocab = 256, 2, 4096
        args.kv_tokens, args.socket_mb, args.repeats = 512, 32, 2
    if os.geteuid() != 0:
        raise SystemExit("bench.crosshost makes network namespaces: run it as root")
    out = run(args)
    print(json.dumps(out))
    print(report(out))


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# The accelerator check of issue #19, sized for one 10-minute device call (untested: no GPU was
# lent when it was written). Run from the repository root on a CUDA host:
#   bash scripts/gpu_check.sh            # prints the device, parity tests, then bench/engine.py
# Steps: the device seen by torch; the engine's runner/model tests with the pods' device set to
# cuda (greedy parity with transformers); bench/engine.py --quick on the GPU against
# transformers on the same GPU, in the same call. Record its tables in bench/RESULTS.md with
# the device name it prints.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
[ -x .venv/bin/python ] || source scripts/bootstrap.sh dev
PY=.venv/bin/python
"$PY" - <<'PYEOF'
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
PYEOF
export DEEPSERVE_FLOWSERVE_DEVICE=cuda
timeout 240 "$PY" -m pytest -q -p no:randomly tests/unit/flowserve/runner tests/unit/flowserve/model \
  tests/unit/flowserve/test_engine_llama.py || echo "[gpu_check] parity tests failed (see above)"
timeout 300 "$PY" -m bench.engine --quick --device cuda

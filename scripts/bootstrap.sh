#!/usr/bin/env bash
# Creates .venv (if needed) and installs every DeepServe unit into it, editable, so the path on
# disk is the import path. Sourced by up.sh ("all") and test.sh ("dev": plus the dev tools), so
# both work on a fresh machine. Re-installs only when a pyproject.toml changes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODE="${1:-all}"
VENV="${DEEPSERVE_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"

# Every unit with the extras a full local cluster needs (deepserve up runs them all here).
UNITS=(
  "libs[tokenizer,models]"
  "services/scheduler"
  "services/jobmgr"
  "services/podpool[local]"
  "services/gateway"
  "services/flowserve"
  "apps[local]"
)

if [ ! -x "$VENV/bin/python" ]; then
  echo "[bootstrap] creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.deepserve-$MODE.stamp"
want="$(cat "$ROOT"/pyproject.toml "$ROOT"/libs/pyproject.toml "$ROOT"/apps/pyproject.toml \
  "$ROOT"/services/*/pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  # pip 25.1 reads dependency groups (--group); older pips do not.
  "$VENV/bin/python" -m pip install --quiet --upgrade "pip>=25.1"
  args=()
  for unit in "${UNITS[@]}"; do args+=(-e "$ROOT/$unit"); done
  if [ "$MODE" = dev ]; then args+=(--group "$ROOT/pyproject.toml:dev"); fi
  echo "[bootstrap] installing the DeepServe units ($MODE; torch pinned to the 2.13.0 CPU build)"
  "$VENV/bin/python" -m pip install --progress-bar off "${args[@]}"
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
# FlowServe's C++ CPU kernels, built once per host into ~/.cache/deepserve/kernels (engines only
# load them; without a compiler they keep their pure-torch paths, so a failure is not fatal).
"$VENV/bin/python" -m deepserve.flowserve.kernels || true

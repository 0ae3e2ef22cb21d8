#!/usr/bin/env bash
# Sets up .venv with the test extras and runs the fast test suite (add --runslow for all).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec .venv/bin/python -m pytest -q -n 2 "$@"

#!/usr/bin/env bash
# Sets up .venv and runs the main job: an audited fine-tune of the built-in default,
# then challenge, opening and verification, printing the verdict.
#   bash scripts/demo.sh            the tiny run sheet (a few minutes on 2 cores)
#   bash scripts/demo.sh --quick    the smoke run sheet (well under a minute): the same code
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
sheet=tiny
if [ "${1:-}" = "--quick" ]; then
  sheet=smoke
  shift
fi
exec .venv/bin/python -m experiments.demo --config "configs/finetune.py:$sheet" \
  --workdir "${WORKDIR:-workdirs/demo_$sheet}" "$@"

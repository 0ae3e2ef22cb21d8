#!/usr/bin/env bash
# Sets up .venv and runs the main job: an audited fine-tune of the built-in default,
# then challenge, opening and verification, printing the verdict.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m experiments.demo --config configs/finetune.py:tiny \
  --workdir "${WORKDIR:-workdirs/demo}" "$@"

#!/usr/bin/env bash
# Sets up .venv and runs the main job: an audited fine-tune of the built-in default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m experiments.finetune --config configs/finetune.py:tiny \
  --workdir "${WORKDIR:-workdirs/demo}" "$@"

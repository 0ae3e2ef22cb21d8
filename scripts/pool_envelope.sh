#!/usr/bin/env bash
# The platform envelope of exact replay on CPU (docs/determinism.md): trains the tiny sheet
# for 3 blocked steps under several intra-op pool sizes, affinities and ISA caps, and prints
# the final model hash of each. Equal hashes: the same bits.
set -euo pipefail
cd "$(dirname "$0")/.."
run() {
  env "$@" .venv/bin/python - <<'PY' 2>/dev/null | tail -1
import json, tempfile
from configs import finetune
from aftune.train import trainer
c = finetune.get_config("tiny"); c.num_steps = 3
d = tempfile.mkdtemp()
trainer.train(c, d)
print(json.load(open(d + "/commitment.json"))["final_model_hash"][:16])
PY
}
printf '%-48s %s\n' "setting" "final model hash"
printf '%-48s %s\n' "nothing set" "$(run A=1)"
printf '%-48s %s\n' "taskset -c 0, PJRT_NPROC=2" "$(run PJRT_NPROC=2 taskset -c 0)"
printf '%-48s %s\n' "PJRT_NPROC=1" "$(run PJRT_NPROC=1)"
printf '%-48s %s\n' "taskset -c 0" "$(run taskset -c 0)"
printf '%-48s %s\n' "PJRT_NPROC=8" "$(run PJRT_NPROC=8)"
for isa in AVX2 AVX SSE4_2; do
  printf '%-48s %s\n' "XLA_FLAGS=--xla_cpu_max_isa=$isa" "$(run XLA_FLAGS=--xla_cpu_max_isa=$isa)"
done

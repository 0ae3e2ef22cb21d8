r"""XLA:CPU options against speed and bits: which ones speed aftune's blocked step up and
stay bitwise across runs.

  .venv/bin/python scripts/xla_cpu_options.py --sheet tiny --steps 6 [--dtype bfloat16]

For each option set (XLA_FLAGS), two fresh processes each run the blocked step from the
initial state of the sheet (the first 2 steps untimed: compilation) and report the median
seconds per step and the digest of the parameters after the last step. The table gives
each option's speed relative to the default (the runs alternate between options, so
drift on a shared machine spreads over all of them), whether its two runs agree bitwise,
and whether it computes the default's bits. Only an option that is stable across runs
can be used for exact audits, and the option then becomes part of what is committed
(`xla_flags` in the job spec).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OPTIONS = {
    "default": "",
    "onednn": "--xla_cpu_use_onednn=true",
    "xnnpack": "--xla_cpu_use_xnnpack=true",
    "no multi-thread eigen": "--xla_cpu_multi_thread_eigen=false",
    "concurrency scheduler": "--xla_cpu_enable_concurrency_optimized_scheduler=true",
    "no fusion emitters": "--xla_cpu_use_fusion_emitters=false",
    "fast math": "--xla_cpu_enable_fast_math=true",
}

CHILD = r"""
import json, sys, time
sys.path.insert(0, ".")
import jax
import numpy as np
from configs import finetune
from aftune.crypto import hashing
from aftune.train import job as job_lib
from aftune.train import step as step_lib
sheet, steps, dtype = sys.argv[1], int(sys.argv[2]), sys.argv[3]
c = finetune.get_config(sheet)
c.model.dtype = dtype
c.num_steps = steps + 2
job = job_lib.build_job(c)
params, opt = list(job.blocked.trainable), job.init_opt_states()
times = []
for i in range(steps + 2):
  _, batch = job.batch(i)
  t0 = time.perf_counter()
  params, opt, tr = step_lib.blocked_step(job.blocked.specs, job.opt_cfg, params, opt,
                                          job.blocked.frozen, batch, job.step_key(i))
  jax.block_until_ready((params, opt))
  times.append(time.perf_counter() - t0)
print(json.dumps({"s_per_step": float(np.median(times[2:])),
                  "digest": hashing.hexdigest(hashing.hash_pytree(params))}))
"""


def run(flags: str, args) -> dict:
  env = {**os.environ, "XLA_FLAGS": flags}
  r = subprocess.run([sys.executable, "-c", CHILD, args.sheet, str(args.steps), args.dtype],
                     cwd=ROOT, capture_output=True, text=True, env=env)
  if r.returncode != 0:
    return {"error": (r.stderr.strip().splitlines() or ["?"])[-1][:120]}
  return json.loads(r.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sheet", default="tiny")
  parser.add_argument("--steps", type=int, default=6)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--json")
  args = parser.parse_args()
  results = {name: [] for name in OPTIONS}
  for _ in range(2):  # two fresh processes per option, alternating between options
    for name, flags in OPTIONS.items():
      results[name].append(run(flags, args))
  base = results["default"]
  base_s = statistics.median(r["s_per_step"] for r in base if "s_per_step" in r)
  rows = []
  print(f"{args.sheet} sheet, {args.dtype}, blocked step, median of {args.steps} steps per run")
  print(f"{'option':24s} {'XLA_FLAGS':58s} {'s/step':>8s} {'vs default':>10s} "
        f"{'stable':>7s} {'default bits':>12s}")
  for name, flags in OPTIONS.items():
    runs = results[name]
    if any("error" in r for r in runs):
      print(f"{name:24s} {flags:58s} error: {next(r['error'] for r in runs if 'error' in r)}")
      continue
    s = statistics.median(r["s_per_step"] for r in runs)
    stable = runs[0]["digest"] == runs[1]["digest"]
    same = runs[0]["digest"] == base[0]["digest"]
    rows.append({"option": name, "xla_flags": flags, "s_per_step": s, "vs_default": s / base_s,
                 "stable": stable, "default_bits": same})
    print(f"{name:24s} {flags:58s} {s:8.4f} {s / base_s:9.3f}x {'yes' if stable else 'NO':>7s} "
          f"{'yes' if same else 'no':>12s}")
  if args.json:
    Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
  main()

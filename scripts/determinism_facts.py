r"""Measures the determinism facts (b), (c) and (d) of docs/determinism.md; prints tables.

  .venv/bin/python scripts/determinism_facts.py                  # all parts, ~2.5 min on 2 cores
  .venv/bin/python scripts/determinism_facts.py --part b --set optim.clip_norm=0
  .venv/bin/python scripts/determinism_facts.py --part c --json /tmp/facts.json

(b) blocked vs single-jit. The tiny run sheet (configs/finetune.py:tiny, `--steps` steps)
    trained twice from one job, once with `step.blocked_step` and once with
    `step.plain_step`, in four variants (full / LoRA x fp32 / bf16 compute). Reported
    after 1, 4 and `--steps` steps: whether the trainable parameters are bitwise equal,
    max |param diff|, and the first step (0-based) whose updated parameters, loss or
    global gradient norm differ.
(c) the CPU thread count. The tiny run sheet is recorded on 2 threads
    (`--steps` steps, B_S=8, I_C=1, so every cell opens without regeneration), every
    cell is opened, and the bundles are verified in fresh processes:
      - pinned to the 2 recorded CPUs, exact mode (the control: must all pass);
      - `taskset -c <one cpu>`, exact mode with the environment check off: cells failing;
      - the same 1-CPU process, tolerance mode with infinite thresholds: the worst honest
        relative error per tensor kind (what verifier.TOLERANCES is calibrated from).
(d) the layer-block size. The tiny run sheet trained with `blocked_step` at B_L = 1, 2, 3
    and 7 (one block); parameters compared per unit with B_L = 1 after 1, 4 and `--steps`
    steps, and the first step whose parameters, loss or gradient norm differ.

The process pins itself to 2 CPUs before JAX starts, so the numbers do not depend on how
many cores the machine has (it needs at least 2). `--set key=value` overrides any config
field of every part (e.g. `--set optim.warmup_steps=0`).
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

AFTER = (1, 4)  # plus the last step


def _pin(n: int) -> list[int]:
  """Restricts this process to its first n CPUs (before JAX starts: XLA reads it once)."""
  cpus = sorted(os.sched_getaffinity(0))
  if len(cpus) < n:
    sys.exit(f"error: this process may use {len(cpus)} CPU(s); the measurement needs {n}")
  os.sched_setaffinity(0, cpus[:n])
  return cpus[:n]


def _config(steps: int, sets: list[str], **extra):
  from configs import finetune  # pylint: disable=g-import-not-at-top
  c = finetune.get_config("tiny")
  c.num_steps = steps
  c.log_every = steps
  for key, value in [*extra.items(), *(s.split("=", 1) for s in sets)]:
    node, *path = key.split(".")
    target = c
    for p in [node, *path][:-1]:
      target = target[p]
    if isinstance(value, str):
      try:
        value = ast.literal_eval(value)
      except (ValueError, SyntaxError):
        pass  # a plain string
    target[[node, *path][-1]] = value
  return c


# ---- (b) blocked vs plain ----------------------------------------------------------------

VARIANTS = {
  "full fp32": {},
  "LoRA fp32": {"lora.enabled": True},
  "full bf16": {"model.dtype": "bfloat16"},
  "LoRA bf16": {"lora.enabled": True, "model.dtype": "bfloat16"},
}


def _blocked_vs_plain(name: str, steps: int, sets: list[str]) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from aftune.train import job as job_lib  # pylint: disable=g-import-not-at-top
  from aftune.train import step as step_lib  # pylint: disable=g-import-not-at-top

  job = job_lib.build_job(_config(steps, sets, record=False, **VARIANTS[name]))
  specs, frozen, opt_cfg = job.blocked.specs, job.blocked.frozen, job.opt_cfg
  pb = pp = list(job.blocked.trainable)
  ob = op = job.init_opt_states()
  rows, first = [], {"params": None, "loss": None, "grad_norm": None}
  max_loss_diff = max_norm_diff = 0.0
  for t in range(steps):
    _, batch = job.batch(t)
    key = job.step_key(t)
    pb, ob, tr = step_lib.blocked_step(specs, opt_cfg, pb, ob, frozen, batch, key)
    pp, op, loss_p, norm_p = step_lib.plain_step(specs, opt_cfg, pp, op, frozen, batch, key)
    la, lb = jax.tree.leaves(pb), jax.tree.leaves(pp)
    bitwise = all(np.array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
                  for a, b in zip(la, lb))
    d_loss, d_norm = abs(float(tr.loss) - float(loss_p)), abs(float(tr.grad_norm) - float(norm_p))
    max_loss_diff, max_norm_diff = max(max_loss_diff, d_loss), max(max_norm_diff, d_norm)
    for what, same in (("params", bitwise), ("loss", d_loss == 0), ("grad_norm", d_norm == 0)):
      if not same and first[what] is None:
        first[what] = t  # 0-based step index, as the verifier's CellReport.step
    if t + 1 in AFTER or t + 1 == steps:
      diff = max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
                 for a, b in zip(la, lb))
      scale = max(float(np.max(np.abs(np.asarray(a)))) for a in la)
      rows.append({"after_step": t + 1, "bitwise": bitwise, "max_abs_diff": diff,
                   "max_abs_param": scale})
  return {"variant": name, "rows": rows, "first_differing_step": first,
          "max_loss_diff": max_loss_diff, "max_grad_norm_diff": max_norm_diff}


def part_b(steps: int, sets: list[str]) -> list[dict]:
  out = []
  for name in VARIANTS:
    t0 = time.perf_counter()
    out.append(_blocked_vs_plain(name, steps, sets))
    print(f"  (b) {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
  return out


def _diff_cells(r: dict) -> tuple[str, str]:
  """The table cells of one compared run: the param diffs per checkpoint, first differences."""
  diffs = " | ".join("0 (bitwise)" if row["bitwise"] else f"{row['max_abs_diff']:.3g}"
                     for row in r["rows"])
  f = r["first_differing_step"]
  firsts = " / ".join("none" if f[w] is None else str(f[w]) for w in ("params", "loss", "grad_norm"))
  return diffs, firsts


def format_b(results: list[dict]) -> str:
  after = [row["after_step"] for row in results[0]["rows"]]
  lines = ["(b) blocked_step vs plain_step (single jit) from the same start, batches and keys",
           "",
           "| variant | " + " | ".join(f"max abs param diff after {n}" for n in after)
           + " | max abs param | first step t (0-based) whose updated params / loss / grad norm "
           "differ | max abs loss diff | max abs grad-norm diff |",
           "|---|" + "---|" * len(after) + "---|---|---|---|"]
  for r in results:
    diffs, firsts = _diff_cells(r)
    lines.append(f"| {r['variant']} | {diffs} | {r['rows'][-1]['max_abs_param']:.3g} | {firsts} "
                 f"| {r['max_loss_diff']:.3g} | {r['max_grad_norm_diff']:.3g} |")
  return "\n".join(lines)


# ---- (c) thread count --------------------------------------------------------------------


def _record_and_open(workdir: Path, steps: int, sets: list[str]) -> tuple[Path, int]:
  from aftune.audit import train_provider as opening  # pylint: disable=g-import-not-at-top
  from aftune.train import trainer as train  # pylint: disable=g-import-not-at-top
  config = _config(steps, sets, **{"audit.checkpoint_interval": 1})
  train.train(config, workdir / "run")
  provider = opening.Provider(workdir / "run")
  cells = [(k, s) for k in range(provider.grid.num_layer_blocks)
           for s in range(provider.grid.num_step_blocks)]
  provider.open_challenge(cells, workdir / "bundles")
  return workdir / "bundles", len(cells)


def _child(workdir: Path, check_env: bool, tolerance: bool) -> dict:
  """Runs in a fresh process: verifies every bundle of workdir (exact, and tolerance)."""
  from aftune import provenance  # pylint: disable=g-import-not-at-top
  from aftune.audit import bundle as bundle_lib  # pylint: disable=g-import-not-at-top
  from aftune.audit import train_verifier as verifier  # pylint: disable=g-import-not-at-top

  commitment = json.loads((workdir / "run" / "commitment.json").read_text())
  spec = json.loads((workdir / "run" / "trace" / "job_spec.json").read_text())
  agreed = {f: spec[f] for f in verifier.AGREED_FIELDS}
  bundles = [bundle_lib.read_bundle(p) for p in sorted((workdir / "bundles").glob("*.bundle"))]
  out = {"cpu_threads": provenance.cpu_threads(), "exact": [], "max_rel_err": {}}
  for b in bundles:
    r = verifier.verify_bundle(b, commitment=commitment, agreed=agreed, mode="exact",
                               check_environment=check_env)
    out["exact"].append({"cell": list(b.cell), "passed": r.passed, "check": r.check,
                         "step": r.step, "where": r.where, "reason": r.reason})
  if tolerance:
    inf = {k: math.inf for k in verifier.TOLERANCES}
    for b in bundles:
      r = verifier.verify_bundle(b, commitment=commitment, agreed=agreed, mode="tolerance",
                                 tolerances=inf)
      assert r.passed, (b.cell, r.check, r.reason)
      for kind, err in r.max_rel_err.items():
        worst = out["max_rel_err"].get(kind, [0.0, None])
        if err > worst[0] or kind not in out["max_rel_err"]:
          out["max_rel_err"][kind] = [err, list(b.cell) if err else None]
  return out


def _spawn(workdir: Path, cpus: list[int], *, check_env: bool, tolerance: bool) -> dict:
  cmd = ["taskset", "-c", ",".join(map(str, cpus)), sys.executable, __file__, "--_child",
         str(workdir)]
  cmd += (["--_check_env"] if check_env else []) + (["--_tolerance"] if tolerance else [])
  r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
  if r.returncode:
    sys.exit(f"child {' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
  return json.loads(r.stdout.strip().splitlines()[-1])


def part_c(steps: int, sets: list[str], cpus: list[int], workdir: Path) -> dict:
  t0 = time.perf_counter()
  _, n_cells = _record_and_open(workdir, steps, sets)
  print(f"  (c) recorded and opened {n_cells} cells: {time.perf_counter() - t0:.0f} s",
        file=sys.stderr, flush=True)
  t0 = time.perf_counter()
  same = _spawn(workdir, cpus[:2], check_env=True, tolerance=False)
  print(f"  (c) verified on 2 CPUs: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
  t0 = time.perf_counter()
  one = _spawn(workdir, cpus[:1], check_env=False, tolerance=True)
  print(f"  (c) verified on 1 CPU: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
  spec = json.loads((workdir / "run" / "trace" / "job_spec.json").read_text())
  return {"recorded_cpu_threads": spec["environment"]["intra_op_threads"], "num_cells": n_cells,
          "cpus": {"same_threads": cpus[:2], "one_thread": cpus[:1]},
          "grid": spec["grid"], "same_threads": same, "one_thread": one}


def format_c(r: dict) -> str:
  from aftune.audit import train_verifier as verifier  # pylint: disable=g-import-not-at-top
  g = r["grid"]
  lines = [(f"(c) recorded on {r['recorded_cpu_threads']} CPU threads; tiny config, "
            f"{g['num_steps']} steps, {g['num_layer_blocks']} layer blocks x "
            f"{g['num_step_blocks']} step blocks = {r['num_cells']} cells, each verified in a "
            "fresh process"), "",
           "| verifier | mode | cells failing "
           "| first failing check per failing cell (step, where) |",
           "|---|---|---|---|"]
  for key in ("same_threads", "one_thread"):
    d = r[key]
    label = f"taskset -c {','.join(map(str, r['cpus'][key]))}"
    fails = [c for c in d["exact"] if not c["passed"]]
    detail = ", ".join(f"{tuple(c['cell'])}: {c['check']} ({c['step']}"
                       + (f", {' '.join(c['where'])}" if c.get("where") else "") + ")"
                       for c in fails) or "-"
    threads = f"{d['cpu_threads']} thread{'s' if d['cpu_threads'] > 1 else ''}"
    lines.append(f"| {label} ({threads}) | exact | {len(fails)} / {len(d['exact'])} | {detail} |")
  lines += ["", ("Worst honest relative error on 1 CPU (tolerance mode, infinite thresholds), "
                 "max |replay - revealed| / max |revealed| per kind:"), "",
            "| kind | worst error | in cell | threshold (verifier.TOLERANCES) | margin |",
            "|---|---|---|---|---|"]
  for kind, thr in verifier.TOLERANCES.items():
    err, cell = r["one_thread"]["max_rel_err"].get(kind, [0.0, None])
    margin = "-" if not err else (f"{thr / err:.0f}x" if thr >= 10 * err else f"{thr / err:.2f}x")
    lines.append(f"| {kind} | {err:.3g} | {tuple(cell) if cell else '-'} | {thr:g} | {margin} |")
  return "\n".join(lines)


# ---- (d) layer-block size ---------------------------------------------------------------

BLOCK_SIZES = (1, 2, 3, 7)  # B_L; the tiny model has 7 units (embed, 4 layers, norm, head)


def _blocked_run(steps: int, sets: list[str], units_per_block: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from aftune.train import job as job_lib  # pylint: disable=g-import-not-at-top
  from aftune.train import step as step_lib  # pylint: disable=g-import-not-at-top

  job = job_lib.build_job(_config(steps, sets, record=False,
                                  **{"audit.units_per_block": units_per_block}))
  specs, frozen, opt_cfg = job.blocked.specs, job.blocked.frozen, job.opt_cfg
  p, o = list(job.blocked.trainable), job.init_opt_states()
  out = {"params": {}, "loss": [], "grad_norm": []}
  for t in range(steps):
    _, batch = job.batch(t)
    p, o, tr = step_lib.blocked_step(specs, opt_cfg, p, o, frozen, batch, job.step_key(t))
    out["loss"].append(float(tr.loss))
    out["grad_norm"].append(float(tr.grad_norm))
    # unit name -> parameters: comparable across groupings
    flat = {name: unit for block in p for name, unit in block.items()}
    out["params"][t] = [np.asarray(x) for x in jax.tree.leaves(flat)]
  return out


def part_d(steps: int, sets: list[str]) -> list[dict]:
  import numpy as np  # pylint: disable=g-import-not-at-top
  runs = {}
  for b_l in BLOCK_SIZES:
    t0 = time.perf_counter()
    runs[b_l] = _blocked_run(steps, sets, b_l)
    print(f"  (d) B_L={b_l}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
  ref = runs[BLOCK_SIZES[0]]
  out = []
  for b_l in BLOCK_SIZES[1:]:
    r = runs[b_l]
    first = {"params": None, "loss": None, "grad_norm": None}
    rows = []
    for t in range(steps):
      same_p = all(np.array_equal(a.view(np.uint8), b.view(np.uint8))
                   for a, b in zip(r["params"][t], ref["params"][t]))
      for what, same in (("params", same_p), ("loss", r["loss"][t] == ref["loss"][t]),
                         ("grad_norm", r["grad_norm"][t] == ref["grad_norm"][t])):
        if not same and first[what] is None:
          first[what] = t
      if t + 1 in AFTER or t + 1 == steps:
        diff = max(float(np.max(np.abs(a.astype(np.float64) - b))) for a, b in
                   zip(r["params"][t], ref["params"][t]))
        rows.append({"after_step": t + 1, "bitwise": same_p, "max_abs_diff": diff})
    out.append({"units_per_block": b_l, "rows": rows, "first_differing_step": first})
  return out


def format_d(results: list[dict]) -> str:
  after = [row["after_step"] for row in results[0]["rows"]]
  lines = [(f"(d) blocked_step with B_L = {', '.join(str(r['units_per_block']) for r in results)} "
            f"vs B_L = {BLOCK_SIZES[0]}, parameters per unit"),
           "",
           "| B_L | " + " | ".join(f"max abs param diff after {n}" for n in after)
           + " | first step t (0-based) whose updated params / loss / grad norm differ |",
           "|---|" + "---|" * len(after) + "---|"]
  for r in results:
    diffs, firsts = _diff_cells(r)
    lines.append(f"| {r['units_per_block']} | {diffs} | {firsts} |")
  return "\n".join(lines)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--part", choices=["b", "c", "d", "all"], default="all")
  ap.add_argument("--steps", type=int, default=16, help="Optimizer steps of the tiny config.")
  ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                  help="Config override for every part, e.g. optim.warmup_steps=0.")
  ap.add_argument("--workdir", help="Keep part (c)'s run and bundles here (must not exist).")
  ap.add_argument("--json", help="Also write the results here.")
  ap.add_argument("--_child", help=argparse.SUPPRESS)
  ap.add_argument("--_check_env", action="store_true", help=argparse.SUPPRESS)
  ap.add_argument("--_tolerance", action="store_true", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args._child:  # pylint: disable=protected-access
    print(json.dumps(_child(Path(args._child), args._check_env, args._tolerance)))
    return

  cpus = _pin(2)
  import jax  # pylint: disable=g-import-not-at-top

  from aftune import provenance  # pylint: disable=g-import-not-at-top
  env = provenance.environment_manifest()
  print(f"jax {jax.__version__} on {env['backend']} ({env['device_kind']}, {env['machine']}), "
        f"intra-op pool {env['intra_op_threads']} (CPUs {cpus}); tiny config, {args.steps} steps"
        + (f"; overrides {args.set}" if args.set else ""), flush=True)
  results: dict = {"environment": env, "steps": args.steps, "overrides": args.set}
  if args.part in ("b", "all"):
    results["b"] = part_b(args.steps, args.set)
    print("\n" + format_b(results["b"]), flush=True)
  if args.part in ("c", "all"):
    if args.workdir:
      workdir = Path(args.workdir)
      workdir.mkdir(parents=True)
      results["c"] = part_c(args.steps, args.set, cpus, workdir)
    else:
      with tempfile.TemporaryDirectory(prefix="aftune_determinism_") as tmp:
        results["c"] = part_c(args.steps, args.set, cpus, Path(tmp))
    print("\n" + format_c(results["c"]), flush=True)
  if args.part in ("d", "all"):
    results["d"] = part_d(args.steps, args.set)
    print("\n" + format_d(results["d"]), flush=True)
  if args.json:
    Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
  main()

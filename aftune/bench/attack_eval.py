"""The attack suite's run: every attack of a sheet trained, verified and challenged, and its
files written (`experiments.attack_eval` is its command line; `paper_figures` calls it too).

  run(cfg, out) -> {"detection", "cells", "economics", "success"}: the rows it wrote to
  out/detection.csv (+ .json), cells.csv, economics.csv, success.csv and summary.md.
The measuring is `aftune.attacks.suite` and `aftune.attacks.edits`; this module runs them
over a sheet and writes their rows.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

from aftune.attacks import suite
from aftune.crypto import hashing
from aftune.train import job as job_lib
from aftune.train import trainer


def _write_csv(path: Path, rows: list[dict]) -> None:
  if not rows:
    return
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)


def _md_table(rows: list[dict], cols: list[str]) -> str:
  fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
  return "\n".join(lines)


def run(cfg, out: Path, progress_stream=None) -> dict[str, list[dict]]:
  """Runs the suite of an attack sheet into `out` (resuming) and writes its files.

  Args:
    cfg: an attack sheet (`configs/attacks.py`); `cfg.success_options`, when present, is
      passed to `edits.success_table` (its step counts: smaller for smoke runs).
    out: the results directory.
    progress_stream: where the progress lines go (default stderr).

  Returns:
    {"detection": rows, "cells": rows, "economics": rows, "success": rows}, as written
    to the CSVs.
  """
  out.mkdir(parents=True, exist_ok=True)
  job = job_lib.build_job(cfg.train)
  grid = suite.job_grid(job)
  L, S = grid.num_layer_blocks, grid.num_step_blocks
  honest = out / "runs" / "honest"
  if not (honest / "commitment.json").exists():
    trainer.train(cfg.train, honest, job=job)
  agreed = suite.agreed_fields(honest)
  specs = [(a.split(":")[0], float(a.split(":")[1])) for a in cfg.attacks]
  progress = suite.Progress(len(specs), stream=progress_stream)
  detection_rows, cell_rows = [], []
  for name, strength in specs:
    attack, verdicts, commitment = suite.run_attack(cfg.train, name, strength, out,
                                                    honest_agreed=agreed, job=job, grid=grid,
                                                    mode=cfg.mode)
    flagged = frozenset(c for c, v in verdicts.items() if not v["passed"])
    for (k, s), v in sorted(verdicts.items()):
      cell_rows.append({"attack": attack.name, "strength": attack.strength, "layer_block": k,
                        "step_block": s, "tampered": (k, s) in attack.footprint, **v})
    rows = suite.measure(attack, flagged, job_id=hashing.from_hex(commitment["job_id"]),
                         root=hashing.from_hex(commitment["merkle_root"]), L=L, S=S,
                         strategies=tuple(cfg.strategies), rates=tuple(cfg.rates),
                         guarantee_ps=tuple(cfg.guarantee_ps),
                         draws=int(cfg.draws), sims=int(cfg.sims))
    for r in rows:
      r.update(B_S=grid.steps_per_block, B_L=grid.units_per_block, mode=cfg.mode,
               what=attack.what)
    detection_rows += rows
    progress.step(f"{attack.name} {attack.strength}: {len(flagged)} of {L * S} cells flagged, "
                  f"footprint {len(attack.footprint)}")
  econ = suite.economics(grid, rates=tuple(cfg.economics_rates))
  success = []
  if cfg.success and job.tokenizer is not None:
    from aftune.attacks import edits  # pylint: disable=g-import-not-at-top
    from aftune.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
    from aftune.train import loop  # pylint: disable=g-import-not-at-top
    ckpt = ckpt_lib.Checkpointer(honest / "checkpoints", create=False)
    final, _ = loop.restore_state(ckpt, job.num_steps, job)
    ckpt.close()
    model = dataclasses.replace(job.blocked, trainable=final)
    options = cfg.get("success_options")
    options = options.to_dict() if options is not None else {}
    for key in ("norms", "backdoor_blocks", "activation_blocks"):
      if key in options:
        options[key] = tuple(options[key])
    success = edits.success_table(model, job.tokenizer, job.template,
                                  noise=edits.honest_noise(job), **options)
    _write_csv(out / "success.csv", success)
    progress.step("attack success (backdoor, rank-one edit, PGD)", 0)
  _write_csv(out / "detection.csv", detection_rows)
  (out / "detection.json").write_text(json.dumps(
      {"config": json.loads(cfg.to_json_best_effort()), "grid": grid.to_dict(),
       "rows": detection_rows}, indent=1, default=str))
  _write_csv(out / "cells.csv", cell_rows)
  _write_csv(out / "economics.csv", econ)
  econ_cols = list(econ[0])
  (out / "summary.md").write_text("\n\n".join([
      f"# Attack suite: {L} x {S} grid (B_S={grid.steps_per_block}, B_L={grid.units_per_block}), "
      f"{cfg.draws} draws per row, {cfg.mode} mode",
      _md_table(detection_rows, ["attack", "strength", "strategy", "rate", "m", "k", "k_flagged",
                                 "measured", "ci_low", "ci_high", "predicted", "misses"]),
      "## Economics of cheating (uniform challenges)", _md_table(econ, econ_cols),
      "## Attack success beside the tolerance thresholds",
      _md_table(success, ["attack", "target", "kind", "success", "verifier_rel_err",
                          "tolerance", "fits_under_tolerance", "honest_noise"])
      if success else "(not measured)"]) + "\n")
  return {"detection": detection_rows, "cells": cell_rows, "economics": econ, "success": success}

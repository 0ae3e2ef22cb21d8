r"""The attack suite, measured: each attack trained once, every cell verified, many challenges.

  python -m experiments.attack_eval --config configs/attacks.py:small --out /tmp/attacks

Writes to --out (resuming: finished runs and their cell verdicts are reused):
  detection.csv / .json  attack, strength, B_S, B_L, strategy, rate, m, tampered cells k
                         (the attack's footprint), cells the verifier flagged, N, draws,
                         measured detection with a 95% Wilson interval, the prediction and
                         how it is computed, misses (draws that sampled a tampered cell and
                         passed: 0 in exact mode)
  cells.csv              every attack's verdict per cell (check, step, reason)
  economics.csv          compute saved vs P(caught) per sampling rate (suite.economics)
  success.csv            attack success beside detection (aftune/attacks/edits.py): the
                         smallest weight backdoor, rank-one edit and activation perturbation
                         that flip a yes/no answer of the honest final model, their sizes in
                         the verifier's metric, the tolerance threshold of that tensor kind,
                         whether they fit under it, and the honest replay noise
  summary.md             the tables, readable
  runs/<attack>/         each dishonest provider's workdir
The library does the work (`aftune/attacks/suite.py`).
"""

import csv
import dataclasses
import json
from pathlib import Path

from absl import app
from absl import flags
from ml_collections import config_flags

from aftune import errors
from aftune.attacks import suite
from aftune.crypto import hashing
from aftune.train import job as job_lib
from aftune.train import trainer

_CONFIG = config_flags.DEFINE_config_file("config", "configs/attacks.py:small", "Attack sheet.",
                                          lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Results directory.", required=True)


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


def main(argv):
  del argv
  cfg = _CONFIG.value
  out = Path(_OUT.value)
  with errors.exit_on_input_error():
    out.mkdir(parents=True, exist_ok=True)
    job = job_lib.build_job(cfg.train)
    grid = suite.job_grid(job)
    L, S = grid.num_layer_blocks, grid.num_step_blocks
    honest = out / "runs" / "honest"
    if not (honest / "commitment.json").exists():
      trainer.train(cfg.train, honest, job=job)
    agreed = suite.agreed_fields(honest)
    specs = [(a.split(":")[0], float(a.split(":")[1])) for a in cfg.attacks]
    progress = suite.Progress(len(specs))
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
      success = edits.success_table(model, job.tokenizer, job.template,
                                    noise=edits.honest_noise(job))
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
  print((out / "summary.md").read_text())


if __name__ == "__main__":
  app.run(main)

"""The attack suite measured: the verifier flags exactly each attack's footprint, no sampled
tampered cell is ever missed in exact mode, and the measured detection rates agree with the
predictions (hypergeometric, or the stratified sampler simulated).

The CI test runs `experiments.attack_eval` on `configs/attacks.py:smoke` (3 attacks on a
3 x 4 grid, 150 draws per row); the whole `small` table is the slow test.
"""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from aftune.attacks import suite
from aftune.audit import detection
from aftune.record import layout as trace

ROOT = Path(__file__).resolve().parent.parent
Z_BONFERRONI = 3.29  # two-sided 99.9%: the rows of one table are many tests at once


def run_eval(variant, out):
  r = subprocess.run([sys.executable, "-m", "experiments.attack_eval", "--config",
                      f"configs/attacks.py:{variant}", "--out", str(out)], cwd=ROOT,
                     capture_output=True, text=True)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "ETA" in r.stderr  # the progress bar
  rows = list(csv.DictReader(open(out / "detection.csv")))
  cells = list(csv.DictReader(open(out / "cells.csv")))
  return rows, cells


def check_table(rows, cells):
  # 1. the verifier flags exactly the cells each attack touched
  by_attack = {}
  for c in cells:
    by_attack.setdefault((c["attack"], c["strength"]), []).append(c)
  for key, cs in by_attack.items():
    wrong = [(c["layer_block"], c["step_block"], c["check"]) for c in cs
             if (c["passed"] == "True") == (c["tampered"] == "True")]
    assert not wrong, (key, wrong)
  for r in rows:
    n, det = int(r["draws"]), int(r["detected"])
    pred, measured = float(r["predicted"]), float(r["measured"])
    assert int(r["k"]) == int(r["k_flagged"]), r
    # 2. exact mode: a draw that samples a tampered cell is always caught
    assert int(r["misses"]) == 0, r
    # 3. the measured rate agrees with the prediction (deterministic nonces: reproducible)
    lo, hi = suite.wilson(det, n, z=Z_BONFERRONI)
    assert lo <= pred <= hi, (r["attack"], r["strategy"], r["rate"], measured, pred, lo, hi)
    lo95, hi95 = suite.wilson(det, n)
    assert math.isclose(float(r["ci_low"]), lo95) and math.isclose(float(r["ci_high"]), hi95)
    if r["prediction"] == "hypergeometric" and r["strategy"] in ("uniform", "guarantee"):
      assert math.isclose(pred, detection.detection_probability(int(r["N"]), int(r["k"]), int(r["m"])))


def test_smoke_suite_agrees_with_the_predictions(tmp_path):
  rows, cells = run_eval("smoke", tmp_path)
  check_table(rows, cells)
  assert {r["attack"] for r in rows} == {"skip_steps", "substitute_data", "adaptive_middle"}
  assert {r["strategy"] for r in rows} == set(suite.STRATEGIES)
  # the adaptive adversary (L = 3: it forges the last block) is invisible to input_only
  adaptive = {(r["strategy"], r["rate"]): r for r in rows if r["attack"] == "adaptive_middle"}
  assert all(int(adaptive[("input_only", rate)]["detected"]) == 0 for rate in ("0.1", "0.25"))
  assert int(adaptive[("output_only", "0.25")]["detected"]) > 0
  assert int(adaptive[("uniform", "0.25")]["detected"]) > 0
  econ = list(csv.DictReader(open(tmp_path / "economics.csv")))
  assert float(econ[-1]["P_caught@0.25"]) == pytest.approx(detection.detection_probability(12, 1, 3))
  summary = (tmp_path / "summary.md").read_text()
  assert "| skip_steps | 25% | uniform |" in summary
  # resuming reuses the runs and the cell verdicts: the same table
  rows2, _ = run_eval("smoke", tmp_path)
  assert rows2 == rows


def test_footprints_follow_from_what_the_attacks_do():
  grid = trace.Grid(num_steps=16, steps_per_block=2, num_layer_blocks=4, units_per_block=2,
                    checkpoint_interval=1, activation_interval=1, num_units=7)
  assert suite._steps_footprint(grid, [3, 4]) == {(k, s) for k in range(4) for s in (1, 2)}
  assert suite.wilson(0, 10)[0] == 0 and suite.wilson(10, 10)[1] == 1
  lo, hi = suite.wilson(50, 100)
  assert lo < 0.5 < hi and hi - lo == pytest.approx(2 * 1.96 * 0.05, rel=0.05)


@pytest.mark.slow
def test_small_suite_agrees_with_the_predictions(tmp_path):
  rows, cells = run_eval("small", tmp_path)
  check_table(rows, cells)
  assert len({r["attack"] for r in rows}) >= 10
  adaptive = [r for r in rows if r["attack"] == "adaptive_middle"
              and r["strategy"] in ("input_only", "output_only")]
  assert adaptive and all(int(r["detected"]) == 0 for r in adaptive)
  json.loads((tmp_path / "detection.json").read_text())

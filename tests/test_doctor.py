"""The platform doctor: its table, its verdict and the settings it advises."""

import json
import subprocess
import sys
from pathlib import Path

from aftune import doctor

ROOT = Path(__file__).resolve().parent.parent


def test_the_doctor_runs_and_finds_this_platform_bitwise(tmp_path):
  r = subprocess.run([sys.executable, "-m", "experiments.doctor", "--config",
                      "configs/finetune.py:smoke", "--config.num_steps=2", "--pools", "1",
                      "--repeats", "5", "--out", str(tmp_path / "d.json")], cwd=ROOT,
                     capture_output=True, text=True)
  assert r.returncode == 0, r.stdout + r.stderr[-3000:]
  assert "| the same steps again, this process |" in r.stdout and "bitwise here" in r.stdout
  doc = json.loads((tmp_path / "d.json").read_text())
  rows = {row["check"]: row for row in doc["rows"]}
  reference = rows["this process"]["digest"]
  assert len(reference) == 64 and doc["healthy"]
  for check in ("the same steps again, this process", "one compiled block forward, 5 calls",
                "a fresh process"):
    assert rows[check]["bitwise"] is True, rows[check]
  assert rows["a fresh process"]["digest"] == reference
  # A committed vector for this platform must match; another platform has none.
  assert rows["the committed test vector"]["bitwise"] in (True, None)


def _rows(**bitwise):
  base = [doctor.Row("this process", "PJRT_NPROC=2", "a" * 64, None)]
  return base + [doctor.Row(check, "PJRT_NPROC=2", "b" * 64, ok) for check, ok in bitwise.items()]


def test_drift_or_a_differing_fresh_process_is_not_healthy():
  good = _rows(**{"the same steps again, this process": True, "a fresh process": True,
                  "one compiled block forward, 20 calls": True})
  assert doctor.healthy(good) and "bitwise here" in doctor.advice(good)[0]
  for check in ("one compiled block forward, 20 calls", "a fresh process",
                "the same steps again, this process", "the committed test vector"):
    bad = _rows(**{"the same steps again, this process": True, "a fresh process": True,
                   "one compiled block forward, 20 calls": True, check: False})
    assert not doctor.healthy(bad), check
  drift = _rows(**{"one compiled block forward, 20 calls": False})
  assert "NOT bitwise" in doctor.advice(drift)[0] and "one compiled" in doctor.advice(drift)[0]
  # Another pool giving other bits is information, not a failure.
  pools = _rows(**{"a fresh process, another pool": False})
  assert doctor.healthy(pools) and "other bits" in doctor.advice(pools)[1]
  assert "| a fresh process, another pool | PJRT_NPROC=2 | bbbbbbbbbbbbbbbb | NO |" in doctor.render(
      pools, doctor.advice(pools))

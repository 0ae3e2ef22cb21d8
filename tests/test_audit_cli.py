"""The audit as three roles exchanging files: challenge, open, verify (CLI exit codes)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from aftune.audit import bundle as bundle_lib
from aftune.audit import client as audit
from aftune.train import job as job_lib
from aftune.train import trainer as train

ROOT = Path(__file__).resolve().parent.parent
# One worker runs the whole module: its tests share the expensive fixture (pytest.ini).
pytestmark = pytest.mark.xdist_group("audit_cli")


def _run(*args):
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True)


@pytest.fixture(scope="session")  # session: xdist may tear a module fixture down mid-module
def audited(small_config, tmp_path_factory):
  base = tmp_path_factory.mktemp("cli")
  workdir = base / "run"
  config = small_config(num_steps=8)
  train.train(config, workdir)
  agreed = audit.agreed_fields(job_lib.build_job(config))
  (base / "agreed.json").write_text(json.dumps(agreed))
  r = _run("experiments.challenge", "--commitment", str(workdir / "commitment.json"),
           "--strategy", "stratified", "--out", str(base / "challenge.json"))
  assert r.returncode == 0, r.stderr
  assert "P(detect)" in r.stdout
  r = _run("experiments.open", "--workdir", str(workdir), "--challenge", str(base / "challenge.json"),
           "--out", str(base / "bundles"))
  assert r.returncode == 0, r.stderr
  return base, workdir


def _verify(base, bundles, *extra):
  return _run("experiments.verify", "--commitment", str(base / "run" / "commitment.json"),
              "--challenge", str(base / "challenge.json"), "--agreed", str(base / "agreed.json"),
              "--bundles", str(bundles), "--out", str(base / "verdict.json"), *extra)


def test_honest_opening_passes_and_writes_the_verdict(audited):
  base, _ = audited
  r = _verify(base, base / "bundles")
  assert r.returncode == 0, r.stdout + r.stderr
  verdict = json.loads((base / "verdict.json").read_text())
  challenge = json.loads((base / "challenge.json").read_text())
  assert verdict["passed"] and verdict["num_cells"] == len(challenge["cells"])
  assert verdict["format"] == "aftune-verdict/v1" and verdict["guarantee"]["text"]
  assert "PASS" in (base / "verdict.md").read_text()


def test_tampered_bundle_fails_with_exit_1(audited, tmp_path):
  base, _ = audited
  bundles = tmp_path / "bundles"
  shutil.copytree(base / "bundles", bundles)
  path = sorted(bundles.glob("*.bundle"))[0]
  b = bundle_lib.read_bundle(path)
  name = next(n for n in b.tensors if n.startswith("state/start/params/"))
  b.tensors[name] = b.tensors[name] + 1e-3
  path.unlink()
  bundle_lib.write_bundle(path, b)
  r = _verify(base, bundles, f"--out={tmp_path / 'v.json'}")
  assert r.returncode == 1, r.stdout + r.stderr
  verdict = json.loads((tmp_path / "v.json").read_text())
  failed = [c for c in verdict["cells"] if not c["passed"]]
  assert len(failed) == 1 and failed[0]["check"] == "opening"


def test_missing_cell_fails(audited, tmp_path):
  base, _ = audited
  bundles = tmp_path / "bundles"
  shutil.copytree(base / "bundles", bundles)
  sorted(bundles.glob("*.bundle"))[-1].unlink()
  r = _verify(base, bundles, f"--out={tmp_path / 'v.json'}")
  assert r.returncode == 1
  assert "did not open" in (tmp_path / "v.md").read_text()


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "not_a_bundle"])
def test_damaged_bundle_is_bad_input_exit_2(audited, tmp_path, damage):
  base, _ = audited
  bundles = tmp_path / "bundles"
  shutil.copytree(base / "bundles", bundles)
  path = sorted(bundles.glob("*.bundle"))[0]
  data = bytearray(path.read_bytes())
  if damage == "truncate":
    data = data[: len(data) // 3]
  elif damage == "bitflip":
    data[len(data) // 2] ^= 0x10
  else:
    data = b"hello"
  path.write_bytes(bytes(data))
  r = _verify(base, bundles, f"--out={tmp_path / 'v.json'}")
  assert r.returncode == 2, r.stdout + r.stderr
  assert path.name in r.stderr
  assert not (tmp_path / "v.json").exists()  # nothing written on bad input


def test_challenge_outside_the_grid_is_refused(audited, tmp_path):
  base, workdir = audited
  doc = json.loads((base / "challenge.json").read_text())
  doc["cells"] = doc["cells"] + [[99, 0]]
  (tmp_path / "bad.json").write_text(json.dumps(doc))
  r = _run("experiments.open", "--workdir", str(workdir), "--challenge", str(tmp_path / "bad.json"),
           "--out", str(tmp_path / "b"))
  assert r.returncode == 2 and "bad.json" in r.stderr
  assert not (tmp_path / "b").exists()


def test_challenge_cli_refuses_a_forged_commitment(audited, tmp_path):
  _, workdir = audited
  doc = json.loads((workdir / "commitment.json").read_text())
  doc["merkle_root"] = "11" * 32
  (tmp_path / "c.json").write_text(json.dumps(doc))
  r = _run("experiments.challenge", "--commitment", str(tmp_path / "c.json"), "--out",
           str(tmp_path / "ch.json"))
  assert r.returncode == 2 and "signature" in r.stderr


def _comparable(verdict):
  """A verdict without what depends on where and when it ran (timings)."""
  out = {k: v for k, v in verdict.items() if k != "verify_s"}
  out["cells"] = [{k: v for k, v in c.items() if k not in ("auth_s", "replay_s")}
                  for c in verdict["cells"]]
  return out


def test_parallel_audit_gives_the_same_verdict(audited, tmp_path):
  base, _ = audited
  r = _verify(base, base / "bundles", f"--out={tmp_path / 'one.json'}")
  assert r.returncode == 0, r.stderr[-2000:]
  r = _verify(base, base / "bundles", f"--out={tmp_path / 'two.json'}", "--workers=2")
  assert r.returncode == 0, r.stderr[-2000:]
  one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
  assert len(one["cells"]) > 3 and _comparable(one) == _comparable(two)


@pytest.mark.slow  # two more verifier runs; run with --runslow
def test_parallel_audit_judges_failures_the_same(audited, tmp_path):
  base, _ = audited
  # A failing cell and a damaged bundle are judged the same way when the cells are spread.
  bundles = tmp_path / "bundles"
  shutil.copytree(base / "bundles", bundles)
  path = sorted(bundles.glob("*.bundle"))[1]
  b = bundle_lib.read_bundle(path)
  name = next(n for n in b.tensors if n.startswith("state/start/params/"))
  b.tensors[name] = b.tensors[name] + 1e-3
  path.unlink()
  bundle_lib.write_bundle(path, b)
  r = _verify(base, bundles, f"--out={tmp_path / 'bad.json'}", "--workers=3")
  assert r.returncode == 1, r.stderr[-2000:]
  bad = json.loads((tmp_path / "bad.json").read_text())
  assert [c["passed"] for c in bad["cells"]].count(False) == 1
  sorted(bundles.glob("*.bundle"))[-1].write_bytes(b"hello")
  r = _verify(base, bundles, f"--out={tmp_path / 'worse.json'}", "--workers=2")
  assert r.returncode == 2 and sorted(bundles.glob("*.bundle"))[-1].name in r.stderr
  assert not (tmp_path / "worse.json").exists()

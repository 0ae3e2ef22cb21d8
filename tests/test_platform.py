"""The platform envelope of exact replay: the intra-op pool size is bound, not the cores.

XLA:CPU sizes its intra-op thread pool from PJRT_NPROC (then NPROC, then the visible
cores); the pool size decides the summation order of CPU reductions. A run records it in
the job spec (`environment.intra_op_threads`), and every replay sets it before JAX starts,
so a verifier with fewer cores than the provider replays bitwise, only slower.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from aftune import errors
from aftune import provenance
from aftune.attacks import forgery
from aftune.audit import bundle as bundle_lib
from aftune.audit import train_provider
from aftune.crypto import hashing
from aftune.record import recorder
from aftune.record import tensorfile

ROOT = Path(__file__).resolve().parent.parent


def _run(*args, env=None, prefix=()):
  return subprocess.run([*prefix, sys.executable, "-m", *map(str, args)], cwd=ROOT,
                        capture_output=True, text=True, env={**os.environ, **(env or {})})


def test_the_pool_size_follows_xla_rules(monkeypatch):
  monkeypatch.delenv("PJRT_NPROC", raising=False)
  monkeypatch.delenv("NPROC", raising=False)
  assert provenance.intra_op_threads() == provenance.cpu_threads()
  monkeypatch.setenv("NPROC", "3")
  assert provenance.intra_op_threads() == 3
  monkeypatch.setenv("PJRT_NPROC", "5")
  assert provenance.intra_op_threads() == 5
  monkeypatch.setenv("PJRT_NPROC", "zero")
  assert provenance.intra_op_threads() == 3
  assert provenance.environment_manifest()["intra_op_threads"] == 3


def test_the_pool_cannot_change_once_jax_runs(monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  jax.devices()  # the backend runs with the pool this process started with
  here = provenance.intra_op_threads()
  monkeypatch.setenv("PJRT_NPROC", str(here))
  provenance.set_intra_op_threads(here)  # the same size: fine
  with pytest.raises(errors.ConfigError, match="before JAX starts"):
    provenance.set_intra_op_threads(here + 1)
  with pytest.raises(errors.ConfigError, match="positive int"):
    provenance.set_intra_op_threads(0)


@pytest.fixture(scope="session")  # session: xdist may tear a module fixture down mid-module
def two_pool_audit(tmp_path_factory):
  """A run recorded with an intra-op pool of 2, challenged and opened (subprocesses)."""
  base = tmp_path_factory.mktemp("pool")
  sheet = ["--config", "configs/finetune.py:smoke", "--config.num_steps=4",
           "--config.platform.intra_op_threads=2"]
  r = _run("experiments.finetune", *sheet, "--workdir", base / "run")
  assert r.returncode == 0, r.stderr[-3000:]
  spec = json.loads((base / "run" / "trace" / "job_spec.json").read_text())
  assert spec["environment"]["intra_op_threads"] == 2
  r = _run("experiments.agree", *sheet, "--out", base / "agreed.json")
  assert r.returncode == 0, r.stderr[-3000:]
  r = _run("experiments.challenge", "--commitment", base / "run" / "commitment.json",
           "--strategy", "uniform", "--m", 6, "--out", base / "challenge.json")
  assert r.returncode == 0, r.stderr[-3000:]
  r = _run("experiments.open", "--workdir", base / "run", "--challenge", base / "challenge.json",
           "--out", base / "bundles")
  assert r.returncode == 0, r.stderr[-3000:]
  return base


def _verify(base, bundles, out):
  # One core: `taskset -c 0`. Without the pool pinned, XLA would run a pool of 1.
  return _run("experiments.verify", "--commitment", base / "run" / "commitment.json",
              "--challenge", base / "challenge.json", "--agreed", base / "agreed.json",
              "--bundles", bundles, "--out", out, prefix=("taskset", "-c", "0"),
              env={"PJRT_NPROC": "", "NPROC": ""})


@pytest.mark.skipif(shutil.which("taskset") is None, reason="needs taskset (util-linux)")
def test_a_two_thread_record_verifies_exactly_on_one_core(two_pool_audit, tmp_path):
  base = two_pool_audit
  r = _verify(base, base / "bundles", tmp_path / "v.json")
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  verdict = json.loads((tmp_path / "v.json").read_text())
  assert verdict["mode"] == "exact" and verdict["passed"] and verdict["num_cells"] == 6
  assert verdict["verifier_environment"]["intra_op_threads"] == 2


@pytest.mark.skipif(shutil.which("taskset") is None, reason="needs taskset (util-linux)")
def test_a_forged_loss_still_fails_the_replay_on_one_core(two_pool_audit, tmp_path):
  """A consistent forgery (stored loss and its leaf rewritten, commitment re-signed) opens
  cleanly and fails only the replay, which runs on one core with the recorded pool."""
  base = two_pool_audit
  workdir = tmp_path / "run"
  shutil.copytree(base / "run", workdir)
  fwd_path = recorder.step_file(workdir, 1, "fwd")
  fwd = tensorfile.read(fwd_path)
  fwd["loss"] = fwd["loss"] + np.float32(1e-3)
  fwd_path.unlink()
  tensorfile.write(fwd_path, fwd)
  commitment = forgery.forge_leaf(workdir, "loss", 1, -1, hashing.hash_array(fwd["loss"]))
  k = commitment["grid"]["num_layer_blocks"] - 1
  (tmp_path / "bundles").mkdir()
  bundle_lib.write_bundle(tmp_path / "bundles" / bundle_lib.bundle_name(k, 0),
                          train_provider.Provider(workdir).open_cell(k, 0))
  r = _run("experiments.verify", "--commitment", workdir / "commitment.json",
           "--agreed", base / "agreed.json", "--bundles", tmp_path / "bundles", "--allow_unbound",
           "--out", tmp_path / "v.json", prefix=("taskset", "-c", "0"),
           env={"PJRT_NPROC": "", "NPROC": ""})
  assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
  (cell,) = json.loads((tmp_path / "v.json").read_text())["cells"]
  assert cell["check"] == "loss" and cell["step"] == 1, cell

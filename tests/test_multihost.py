"""A run of 2 processes (jax.distributed, 2 CPU devices each) on a (1, 4) FSDP mesh, from the
command line as a user runs it: recorded, killed and resumed to the same root, opened by one
process, verified exactly by 2 processes; a 1-process exact verifier is refused, tolerance
mode passes on one device (docs/sharding.md, "Several processes")."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

# One worker runs the whole module: its tests share the expensive fixture (pytest.ini).
pytestmark = pytest.mark.xdist_group("multihost")
ROOT = Path(__file__).resolve().parent.parent
SHEET = ["--config", "configs/finetune.py:smoke", "--config.mesh.shape=(1,4)",
         "--config.audit.checkpoint_interval=1"]


def _port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  return env


def _start(module, args, port, logdir, tag):
  return [subprocess.Popen(
      [sys.executable, "-m", module, *args, "--coordinator", f"localhost:{port}",
       "--num_processes", "2", "--process_id", str(p)], cwd=ROOT, env=_env(),
      stdout=open(logdir / f"{tag}.p{p}.log", "w"), stderr=subprocess.STDOUT) for p in (0, 1)]


def _wait(procs, logdir, tag, timeout=600):
  codes = [p.wait(timeout=timeout) for p in procs]
  logs = "".join((logdir / f"{tag}.p{i}.log").read_text()[-2000:] for i in (0, 1))
  return codes, logs


def _train(workdir, logdir, tag):
  codes, logs = _wait(_start("experiments.finetune", [*SHEET, "--workdir", str(workdir)], _port(),
                             logdir, tag), logdir, tag)
  assert codes == [0, 0], logs
  return json.loads((workdir / "commitment.json").read_text())


def _cli(*args):
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=_env(), capture_output=True,
                        text=True, timeout=600)


@pytest.fixture(scope="session")  # session: xdist may tear a module fixture down mid-module
def run2(tmp_path_factory):
  root = tmp_path_factory.mktemp("multihost")
  return root, _train(root / "w", root, "train")


def test_two_processes_record_one_trace(run2):
  root, commitment = run2
  w = root / "w"
  spec = json.loads((w / "trace" / "job_spec.json").read_text())
  assert spec["environment"]["process_count"] == 2
  assert spec["hyperparameters"]["mesh"]["shape"] == [1, 4]
  assert commitment["num_leaves"] > 100
  # Each process wrote its own rows of the stored boundary tensors; process 0 signed.
  steps = w / "trace" / "steps"
  assert (steps / "00000003.fwd.p0.safetensors.zst").exists()
  assert (steps / "00000003.fwd.p1.safetensors.zst").exists()
  assert len(list((w / "trace" / "roots").glob("*.json"))) >= 6
  from aftune.record import integrity
  from aftune.record import recorder
  fwd = recorder.read_step(w, 3, "fwd")
  assert fwd["fwd_out/0"].shape[0] == 4  # the whole batch, from both processes' rows
  # Every stored tensor, joined from the processes' runs, matches its committed hash.
  assert integrity.check_workdir(w)["step_files"] == 24


@pytest.mark.slow  # two more 2-process runs (~1 min); run with --runslow
def test_killed_and_resumed_gives_the_same_root(run2, tmp_path):
  _, commitment = run2
  w = tmp_path / "w"
  procs = _start("experiments.finetune", [*SHEET, "--workdir", str(w)], _port(), tmp_path, "kill")
  deadline = time.time() + 300
  while not (w / "checkpoints" / "6").is_dir():  # a committed checkpoint past the middle
    assert time.time() < deadline and all(p.poll() is None for p in procs), "no checkpoint 6"
    time.sleep(0.05)
  for p in procs:
    p.send_signal(signal.SIGKILL)
  for p in procs:
    p.wait()
  assert not (w / "commitment.json").exists()
  resumed = _train(w, tmp_path, "resume")
  log = (tmp_path / "resume.p0.log").read_text()
  assert "resumed from checkpoint at step" in log
  for key in ("job_id", "merkle_root", "final_model_hash", "num_leaves"):
    assert resumed[key] == commitment[key], key


@pytest.mark.slow  # open + 3 verifier runs (~1.5 min); run with --runslow
def test_challenge_open_verify_across_processes(run2):
  root, _ = run2
  w, ch, bundles = root / "w", root / "ch.json", root / "bundles"
  r = _cli("experiments.challenge", "draw", "--commitment", str(w / "commitment.json"),
           "--strategy", "uniform", "--m", "3", "--nonce", "05" * 32, "--out", str(ch))
  assert r.returncode == 0, r.stderr[-2000:]
  r = _cli("experiments.open", "--workdir", str(w), "--challenge", str(ch), "--out", str(bundles))
  assert r.returncode == 0, r.stderr[-2000:]
  agreed = root / "agreed.json"
  r = _cli("experiments.agree", *SHEET, "--out", str(agreed))
  assert r.returncode == 0, r.stderr[-2000:]
  common = ["--commitment", str(w / "commitment.json"), "--challenge", str(ch), "--bundles",
            str(bundles), "--agreed", str(agreed)]
  # Exact: replayed as the run ran, 2 processes on the (1, 4) mesh: bitwise.
  codes, logs = _wait(_start("experiments.verify", [*common, "--out", str(root / "v2.json")],
                             _port(), root, "verify"), root, "verify")
  assert codes == [0, 0], logs
  verdict = json.loads((root / "v2.json").read_text())
  assert verdict["passed"] and verdict["mode"] == "exact"
  assert len(verdict["cells"]) == 3 and all(c["passed"] for c in verdict["cells"])
  # One process cannot replay the cross-process sums bitwise: one clear error, exit 2.
  r = _cli("experiments.verify", *common, "--out", str(root / "v1.json"))
  assert r.returncode == 2 and "2 process(es)" in r.stderr and "--mode=tolerance" in r.stderr
  assert not (root / "v1.json").exists()
  r = _cli("experiments.verify", *common, "--mode", "tolerance", "--out", str(root / "vt.json"))
  assert r.returncode == 0, r.stderr[-2000:]
  assert json.loads((root / "vt.json").read_text())["passed"]

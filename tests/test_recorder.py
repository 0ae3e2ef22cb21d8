"""The recorder: layout, signed commitment, resume = uninterrupted root, corruption."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from aftune.attacks import forgery
from aftune.crypto import hashing
from aftune.crypto import merkle
from aftune.crypto import signing
from aftune.record import commitment as commitment_lib
from aftune.record import history as history_lib
from aftune.record import integrity
from aftune.record import layout as trace
from aftune.record import tensorfile
from aftune.train import trainer as train

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("num_steps,b_s,k,units", [(12, 4, 3, 5), (10, 4, 2, 4), (1, 1, 1, 1),
                                                   (7, 3, 5, 9)])
def test_layout_positions_are_a_bijection(num_steps, b_s, k, units):
  grid = trace.Grid(num_steps, b_s, k, 2, num_units=units)
  keys = [grid.key_at(i) for i in range(grid.num_leaves)]
  assert len(set(keys)) == grid.num_leaves
  assert [grid.index(*key) for key in keys] == list(range(grid.num_leaves))
  n_state_steps = len([t for t in range(num_steps + 1) if grid.is_state_step(t)])
  inner = len(grid.inner_units)  # every unit but the last of each block
  assert inner == units - k
  assert grid.num_leaves == 1 + num_steps * (5 + 3 * k + inner) + n_state_steps * 2 * k
  with pytest.raises(ValueError):
    grid.index("params", 1, 0) if b_s > 1 else grid.index("loss", num_steps, -1)


def test_tensorfile_roundtrip_and_damage(tmp_path):
  tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3),
             "b": np.ones((3,), ml_dtypes.bfloat16) * 1.5, "s": np.float32(2.0).reshape(())}
  path = tmp_path / "t.safetensors.zst"
  tensorfile.write(path, tensors)
  back = tensorfile.read(path)
  for name, a in tensors.items():
    assert back[name].dtype == a.dtype and back[name].shape == a.shape
    assert hashing.hash_array(back[name]) == hashing.hash_array(a)
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  with pytest.raises(tensorfile.TensorFileError, match="t.safetensors.zst"):
    tensorfile.read(path)
  with pytest.raises(tensorfile.TensorFileError, match="missing"):
    tensorfile.read(tmp_path / "nope.safetensors.zst")


@pytest.fixture(scope="module")
def recorded(small_config, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("recorded")
  result = train.train(small_config(), workdir)
  return workdir, result


def test_recorded_run_has_a_signed_commitment_over_the_whole_trace(recorded):
  workdir, result = recorded
  summary = integrity.check_workdir(workdir)
  grid = trace.Grid(12, 2, 3, 2, 2, 1, num_units=5)  # 2 layers + 3 units, in blocks of 2
  assert summary["num_leaves"] == grid.num_leaves
  assert summary["signed_roots"] == 4  # steps 0, 4, 8, 12
  doc = json.loads((workdir / "commitment.json").read_text())
  signing.verify_document(doc)
  spec = json.loads((workdir / "trace" / "job_spec.json").read_text())
  assert hashing.hexdigest(hashing.hash_json(spec)) == doc["job_id"]
  assert set(spec["program_fingerprint"]) >= {"block_fwd/0", "block_bwd/2", "block_update/1",
                                               "combine_norms"}
  # The committed losses are the training losses.
  leaves = trace.read_leaves(workdir / "trace" / "leaves.bin", grid)
  for t in (0, 5, 11):
    loss_leaf = leaves[grid.index("loss", t, -1)]
    assert loss_leaf.payload == hashing.hash_array(np.float32(result.losses[t]).reshape(()))
  storage = json.loads((workdir / "storage.json").read_text())
  assert all(storage["bytes"][c] > 0 for c in
             ("parameters", "optimizer_state", "activations", "cotangents", "hashes"))


def test_signature_cli(recorded):
  workdir, _ = recorded
  cmd = [sys.executable, "-m", "experiments.sign", "verify", str(workdir / "commitment.json")]
  assert subprocess.run(cmd, cwd=ROOT, capture_output=True).returncode == 0


def test_inclusion_proofs_for_every_kind(recorded):
  workdir, _ = recorded
  doc = commitment_lib.load(workdir / "commitment.json")
  grid, leaves = integrity.load_leaves(workdir, doc)
  hashes = [l.hash() for l in leaves]
  root = hashing.from_hex(doc["merkle_root"])
  for key in [("job_spec", -1, -1), ("params", 4, 1), ("batch", 7, -1), ("bwd_in", 11, 2),
              ("opt_state", 12, 0)]:
    i = grid.index(*key)
    proof = merkle.inclusion_proof(hashes, i, len(hashes))
    assert merkle.verify_inclusion(hashes[i], i, len(hashes), proof, root)
    assert not merkle.verify_inclusion(hashes[i], i + 1, len(hashes), proof, root)


@pytest.mark.parametrize("damage", ["flip_leaf", "truncate_leaves", "flip_tensor", "resign"])
def test_damaged_trace_is_detected(recorded, tmp_path, damage):
  import shutil
  workdir = tmp_path / "copy"
  shutil.copytree(recorded[0], workdir)
  leaves = workdir / "trace" / "leaves.bin"
  if damage == "flip_leaf":
    data = bytearray(leaves.read_bytes())
    data[trace.RECORD.size * 40 + 20] ^= 1
    leaves.write_bytes(bytes(data))
    match = "committed root"
  elif damage == "truncate_leaves":
    leaves.write_bytes(leaves.read_bytes()[:-7])
    match = "truncated"
  elif damage == "flip_tensor":
    # rewrite a step file with one value changed (valid file, wrong content)
    path = workdir / "trace" / "steps" / f"{5:08d}.bwd.safetensors.zst"
    t = tensorfile.read(path)
    t["bwd_in/1"] = t["bwd_in/1"].copy()
    t["bwd_in/1"].flat[3] += 1e-3
    path.unlink()
    tensorfile.write(path, t)
    match = "bwd_in of block 1"
  else:
    doc = json.loads((workdir / "commitment.json").read_text())
    doc["merkle_root"] = "00" * 32
    (workdir / "commitment.json").write_text(json.dumps(doc))
    match = "bad signature"
  with pytest.raises((trace.TraceError, tensorfile.TensorFileError), match=match):
    integrity.check_workdir(workdir)


def test_resume_reproduces_the_uninterrupted_root(small_config, recorded, tmp_path):
  workdir, _ = recorded
  c = small_config()
  train.train(c, tmp_path, stop_after_steps=7)  # last checkpoint at step 4, leaves past it
  resumed = train.train(c, tmp_path)
  assert resumed.step == 12
  a = json.loads((workdir / "commitment.json").read_text())
  b = json.loads((tmp_path / "commitment.json").read_text())
  assert a["merkle_root"] != "" and b["merkle_root"] == a["merkle_root"]  # same trace
  assert b["job_id"] == a["job_id"]
  integrity.check_workdir(tmp_path)


def test_record_flag_off_writes_no_trace(small_config, tmp_path):
  train.train(small_config(num_steps=2, record=False), tmp_path)
  assert not (tmp_path / "trace").exists() and not (tmp_path / "commitment.json").exists()


def test_job_id_binds_hyperparameters(small_config, tmp_path):
  from aftune.record import jobspec
  from aftune.train import job as job_lib
  a = jobspec.build_job_spec(job_lib.build_job(small_config()))
  b = jobspec.build_job_spec(job_lib.build_job(small_config(**{"optim.learning_rate": 0.5})))
  assert jobspec.job_id(a) != jobspec.job_id(b)
  assert a["base_model_hash"] == b["base_model_hash"] and a["dataset_root"] == b["dataset_root"]


@pytest.mark.slow
def test_sigkill_at_any_point_then_resume_gives_the_same_root(recorded, tmp_path):
  workdir, _ = recorded
  want = json.loads((workdir / "commitment.json").read_text())["merkle_root"]
  script = (
      "import sys; sys.path.insert(0, 'tests'); sys.path.insert(0, '.')\n"
      "from conftest import make_small_config\n"
      "from aftune.train import trainer as train\n"
      f"train.train(make_small_config(), {str(tmp_path)!r})\n")
  rng = np.random.default_rng(0)
  for delay in rng.uniform(4.0, 12.0, size=2):
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, capture_output=True)
  got = json.loads((tmp_path / "commitment.json").read_text())["merkle_root"]
  assert got == want
  integrity.check_workdir(tmp_path)


def test_history_of_signed_roots_is_proven_to_the_client(recorded, tmp_path):
  import shutil
  workdir = tmp_path / "copy"
  shutil.copytree(recorded[0], workdir)
  received = [json.loads(p.read_text()) for p in sorted((workdir / "trace" / "roots").glob("*.json"))]
  commitment = json.loads((workdir / "commitment.json").read_text())
  history = history_lib.prove_history(workdir)
  assert len(history["roots"]) == 4
  assert history_lib.verify_history(history, commitment, received) == []
  # The provider rewrites a leaf of step 1 (before the signed roots of steps 4, 8, 12)
  # and re-signs the final commitment: the new final tree no longer extends them.
  forged = forgery.forge_leaf(workdir, "loss", 1, -1)
  problems = history_lib.verify_history(history_lib.prove_history(workdir), forged, received)
  assert len(problems) == 3 and all("history rewritten" in p for p in problems)
  # Dropping a root the client received is caught too.
  history["roots"] = history["roots"][1:]
  assert any("missing" in p for p in history_lib.verify_history(history, commitment, received))


def test_history_cli(recorded, tmp_path):
  workdir, _ = recorded
  r = subprocess.run([sys.executable, "-m", "experiments.history", "prove", "--workdir",
                      str(workdir), "--out", str(tmp_path / "h.json")], cwd=ROOT, capture_output=True)
  assert r.returncode == 0, r.stderr
  r = subprocess.run([sys.executable, "-m", "experiments.history", "check", "--commitment",
                      str(workdir / "commitment.json"), "--history", str(tmp_path / "h.json"),
                      "--received", str(workdir / "trace" / "roots")], cwd=ROOT, capture_output=True,
                     text=True)
  assert r.returncode == 0 and "OK: 4 signed roots" in r.stdout, r.stdout + r.stderr

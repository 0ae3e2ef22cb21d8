"""Sharded audited fine-tuning on CPU devices: data parallel, FSDP and both, from the run
sheet's mesh (`aftune/train/mesh.py`), recorded and verified.

Each case runs `tests/sharded_run.py` in a subprocess (XLA must see the forced CPU devices
before JAX starts): 4 devices for training and exact verification on the committed mesh,
2 for a verifier with fewer devices than the mesh.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

# One worker runs the whole module: its tests share the expensive fixture (pytest.ini).
pytestmark = pytest.mark.xdist_group("sharding")
ROOT = Path(__file__).resolve().parent.parent


def run(devices, root, what):
  r = subprocess.run([sys.executable, str(ROOT / "tests" / "sharded_run.py"), str(devices),
                      str(root), what], cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  line = next(l for l in r.stdout.splitlines() if l.startswith("RESULT "))
  return json.loads(line[len("RESULT "):])


@pytest.fixture(scope="session")  # session: xdist may tear a module fixture down mid-module
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp("sharded")
  return root, run(4, root, "train")


def test_layouts_train_the_same_job_and_hash_logical_arrays(trained):
  _, r = trained
  assert r["devices"] == 4 and r["layout_hashes_equal"]
  one = r["one"]
  for name, shape, rules in (("fsdp", [1, 4], "fsdp"), ("both", [2, 2], "fsdp"),
                             ("tp", [1, 2, 2], "fsdp+tensor")):
    assert r[name]["mesh"]["shape"] == shape and r[name]["mesh"]["rules"] == rules
    assert r[name]["base"] == one["base"]  # the same base model, whatever the layout
    # sums over sharded axes change the order: close, not bitwise (docs/sharding.md)
    assert max(abs(a - b) for a, b in zip(r[name]["losses"], one["losses"])) < 1e-4
  assert one["mesh"] is None
  # Tensor parallel: the family's rules split every attention and MLP projection, nothing else.
  split = r["tp"]["tensor_split"]
  assert split and all(any(p in s for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                            "up_proj", "down_proj")) for s in split), split
  assert not r["fsdp"]["tensor_split"]


def test_exact_replay_on_the_committed_mesh_is_bitwise(trained):
  _, r = trained
  for name in ("one", "fsdp", "both", "tp"):
    for cell, (passed, check, reason, _) in r[name]["exact"].items():
      assert passed, (name, cell, check, reason)
  assert len(r["fsdp"]["exact"]) == 12  # every cell of the FSDP run
  for cell, (passed, check, reason, regenerated) in r["fsdp_sparse"].items():
    assert passed and regenerated, (cell, check, reason)  # the provider regenerates on the mesh


def test_tolerance_replays_across_layouts_and_exact_needs_the_mesh(trained):
  root, r = trained
  for name in ("fsdp", "both", "tp"):
    assert all(v[0] for v in r[name]["tolerance"].values()), r[name]["tolerance"]
  fewer = run(2, root, "verify_fewer")
  assert fewer["error"] and "committed mesh" in fewer["error"] and "tolerance" in fewer["error"]
  assert all(v[0] for v in fewer["tolerance"].values()), fewer["tolerance"]


@pytest.mark.parametrize("variant,shape,processes", [
    ("tiny_fsdp", (1, 4), 1), ("llama3_8b", (1, 8), 1), ("qwen3_14b", (1, 8), 1),
    ("llama3_8b_2hosts", (2, 4, 2), 2), ("qwen3_14b_2hosts", (2, 4, 2), 2)])
def test_run_sheets_carry_their_meshes(variant, shape, processes):
  from aftune.train import mesh as mesh_lib
  from configs.finetune import get_config
  c = get_config(variant)
  spec = mesh_lib.spec_from_sheet(c)
  assert spec.shape == shape and spec.size % processes == 0
  # the batch splits evenly over the data-parallel devices (data x fsdp)
  assert c.batch_size % (spec.sizes["data"] * spec.sizes["fsdp"]) == 0
  assert spec.rules == ("fsdp+tensor" if len(shape) == 3 else "fsdp")
  assert mesh_lib.MeshSpec.from_dict(spec.to_dict()) == spec
  if processes > 1:  # opened without regeneration (docs/sharding.md)
    assert c.audit.checkpoint_interval == 1 and c.audit.activation_interval == 1

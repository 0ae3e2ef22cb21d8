"""Run in a subprocess by tests/test_sharding.py: XLA must see N CPU devices before JAX starts.

  python tests/sharded_run.py DEVICES WORKROOT train|verify_fewer
"""

import json
import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={int(sys.argv[1])}"
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from conftest import make_small_config  # noqa: E402

from aftune import errors  # noqa: E402
from aftune.audit import bundle as bundle_lib  # noqa: E402
from aftune.audit import train_provider  # noqa: E402
from aftune.audit import train_verifier  # noqa: E402
from aftune.crypto import hashing  # noqa: E402
from aftune.train import mesh as mesh_lib  # noqa: E402
from aftune.train import trainer  # noqa: E402

# data parallel: "both" (2 x 2); "tp": FSDP x tensor parallel (1 x 2 x 2)
LAYOUTS = {"one": None, "fsdp": (1, 4), "both": (2, 2), "tp": (1, 2, 2)}


def config(shape, **over):
  c = make_small_config(num_steps=8, **{"audit.steps_per_block": 2, "audit.checkpoint_interval": 1,
                                        **over})
  if shape:
    c.mesh = {"shape": shape, "axes": ("data", "fsdp", "tensor")[:len(shape)]}
  return c


def verify(workdir, cells, mode, bundles=None):
  """Opens the cells (on this process's mesh), or reads them from `bundles`, and verifies."""
  spec = json.loads((workdir / "trace" / "job_spec.json").read_text())
  com = json.loads((workdir / "commitment.json").read_text())
  agreed = {f: spec[f] for f in train_verifier.AGREED_FIELDS}
  prov = train_provider.Provider(workdir) if bundles is None else None
  out = {}
  for cell in cells:
    b = (prov.open_cell(*cell) if prov is not None
         else bundle_lib.read_bundle(bundles / bundle_lib.bundle_name(*cell)))
    rep = train_verifier.verify_bundle(b, commitment=com, agreed=agreed, mode=mode)
    out[str(cell)] = [rep.passed, rep.check, rep.reason, b.manifest["regenerated"]]
  return out


def main():
  root = Path(sys.argv[2])
  result = {"devices": jax.device_count()}
  if sys.argv[3] == "train":
    # The same logical array hashes the same on any layout (the commitment's construction).
    x = np.arange(64 * 48, dtype=np.float32).reshape(64, 48)
    want = hashing.hash_array(x)
    hashes = []
    for shape in [(1, 1), (4, 1), (1, 4), (2, 2), (1, 2)]:
      p = mesh_lib.Placement(mesh_lib.MeshSpec(shape, min_shard_elems=1))
      for placed in (p.state({"w": x})["w"], p.batch({"x": x})["x"]):
        hashes.append(hashing.hash_array(np.asarray(placed)) == want)
    result["layout_hashes_equal"] = all(hashes)
    all_cells = [(k, s) for k in range(3) for s in range(4)]
    for name, shape in LAYOUTS.items():
      w = root / name
      r = trainer.train(config(shape), w)
      com = json.loads((w / "commitment.json").read_text())
      spec = json.loads((w / "trace" / "job_spec.json").read_text())
      result[name] = {
          "losses": [float(v) for v in r.losses], "base": com["base_model_hash"],
          "final": com["final_model_hash"], "mesh": spec["hyperparameters"].get("mesh"),
          "tensor_split": sorted(
              "/".join(hashing.path_components(path)) for path, leaf in
              jax.tree_util.tree_flatten_with_path(r.job.blocked.trainable)[0]
              if "tensor" in getattr(leaf.sharding, "spec", ())),
          "exact": verify(w, all_cells if name == "fsdp" else [(0, 1), (2, 3)], "exact"),
          "tolerance": verify(w, [(1, 2)], "tolerance")}
    w = root / "fsdp_sparse"
    trainer.train(config((1, 4), **{"audit.checkpoint_interval": 2,
                                    "audit.activation_interval": 2}), w)
    result["fsdp_sparse"] = verify(w, [(1, 1), (0, 2), (2, 3)], "exact")
    # openings of the FSDP run, for a verifier with fewer devices
    train_provider.Provider(root / "fsdp").open_challenge([(0, 0), (2, 3)], root / "bundles")
  else:  # a verifier with fewer devices than the committed mesh
    w = root / "fsdp"
    try:
      verify(w, [(0, 0)], "exact", root / "bundles")
      result["error"] = None
    except errors.InputError as e:
      result["error"] = str(e)
    result["tolerance"] = verify(w, [(0, 0), (2, 3)], "tolerance", root / "bundles")
  print("RESULT " + json.dumps(result))


if __name__ == "__main__":
  main()

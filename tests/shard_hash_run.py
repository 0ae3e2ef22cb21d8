"""Run in subprocesses by tests/test_shard_hash.py (XLA must see the host devices before
JAX starts).

  python tests/shard_hash_run.py layouts                 one process, 8 CPU devices
  python tests/shard_hash_run.py process ID PORT OUT     one of 2 processes, 4 devices each

Prints (layouts) or writes to OUT (process) one JSON line per case.
"""

import json
import os
import sys
from pathlib import Path

MODE = sys.argv[1]
os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count="
                           f"{8 if MODE == 'layouts' else 4}")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from aftune.crypto import hashing  # noqa: E402
from aftune.crypto import shards  # noqa: E402
from aftune.train import multihost  # noqa: E402


def arrays():
  """Logical arrays (the same on every process): several tree forms (chunks of 64, 128, 256
  and 1 rows), the flat form, 0-d, bfloat16, a row larger than CHUNK_BYTES."""
  rng = np.random.default_rng(7)
  return {
      "f32_2048x256": rng.standard_normal((2048, 256), np.float32),     # 32 chunks of 64 rows
      "f32_4096x80": rng.standard_normal((4096, 80), np.float32),       # 32 chunks of 128 rows
      "bf16_8192x96": rng.standard_normal((8192, 96)).astype(jax.numpy.bfloat16),
      "i32_16x3x8192x2": rng.integers(0, 99, (16, 3, 8192, 2)).astype(np.int32),  # a row is 192 KiB: c=1
      "f32_8x300000": rng.standard_normal((8, 300000), np.float32),     # a row is 1.2 MB: c=1
      "f32_64x64": rng.standard_normal((64, 64), np.float32),           # flat form
      "f32_scalar": np.asarray(np.float32(2.5)),
  }


def specs(shape, mesh):
  axes = mesh.axis_names
  out = {"replicated": P()}
  n = mesh.devices.size
  if shape and shape[0] % n == 0:
    out["rows"] = P(axes)
  if len(shape) > 1 and shape[1] % n == 0:
    out["cols"] = P(None, axes)
  if len(axes) == 2 and shape and shape[0] % mesh.devices.shape[0] == 0 and len(shape) > 1 \
      and shape[1] % mesh.devices.shape[1] == 0:
    out["rows_x_cols"] = P(axes[0], axes[1])
  return out


def layouts():
  for name, a in arrays().items():
    want = hashing.hash_array(a).hex()
    for n, mshape in [(1, (1,)), (2, (2,)), (4, (4,)), (4, (2, 2)), (8, (8,)), (8, (2, 4))]:
      names = ("x",) if len(mshape) == 1 else ("x", "y")
      mesh = jax.make_mesh(mshape, names, devices=jax.devices()[:n])
      for sname, spec in specs(a.shape, mesh).items():
        x = jax.device_put(a, NamedSharding(mesh, spec))
        got = hashing.hash_array(x).hex()
        regroup = shards.needs_regroup(x)
        via_parts = shards.merge([shards.local_part(shards.row_layout(x) if regroup else x)]).hex()
        print(json.dumps({"array": name, "devices": n, "mesh": list(mshape), "layout": sname,
                          "want": want, "got": got, "parts": via_parts, "regroup": regroup}))


def process(pid, port, out):
  multihost.initialize(f"localhost:{port}", 2, pid)
  assert jax.process_count() == 2 and jax.device_count() == 8
  rows = []
  for name, a in arrays().items():
    want = hashing.hash_array(a).hex()
    for mshape in [(8,), (2, 4)]:
      names = ("x",) if len(mshape) == 1 else ("x", "y")
      mesh = jax.make_mesh(mshape, names, devices=jax.devices())
      for sname, spec in specs(a.shape, mesh).items():
        x = jax.device_put(a, NamedSharding(mesh, spec))
        shards.BYTES_FETCHED[0] = 0
        regroup = shards.needs_regroup(x)
        digest = multihost.global_digests([("tensor", x)])[0].hex()
        fetched = shards.BYTES_FETCHED[0]
        tree = multihost.global_digests([("pytree", {"w": x, "b": [a[..., :1] if a.ndim else a]})])[0]
        rows.append({"array": name, "mesh": list(mshape), "layout": sname, "want": want,
                     "got": digest, "regroup": regroup, "fetched": fetched,
                     "nbytes": int(a.nbytes), "pytree_ok": tree == hashing.hash_pytree(
                         {"w": a, "b": [a[..., :1] if a.ndim else a]})})
  Path(out).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  jax.distributed.shutdown()


if __name__ == "__main__":
  if MODE == "layouts":
    layouts()
  else:
    process(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])

"""The tree form of large tensors and its per-host computation (docs/hashing.md, "Large
tensors"): literal vectors, a reimplementation from the doc, the aligned-subtree algebra,
and equality of the digest across 1, 2, 4 and 8 devices, every layout, and 2 processes
that each hash only their own rows (subprocesses: tests/shard_hash_run.py)."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import blake3
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from aftune.crypto import device_hash
from aftune.crypto import hashing as H
from aftune.crypto import shards

ROOT = Path(__file__).resolve().parents[1]

VEC_LEAVES = [
  "f47c9f32fc102faf21351bb4a399b8d495c0f035d0415cb0e206d1fc406c434a",
  "3cdeefb4fd1459a59525f0fb62ee51fda0c03ffe04792a9ed434001eb474732c",
  "5f6683491adf10d608ba22237007f3e47af9c0e984aa08e975a55530db021eb6",
]
VEC_NODE01 = "6662b34a978a55ca4ad273735ef14b29dab9600fc0e177851a4bdf48dd013fa9"
VEC_ROOT = "f5262fcd1d35804e2bf1cbcfb8cd716f118ff9a128038b504f56f7c2eddde8e8"
VEC_DIGEST = "6079f03fe6522d810eb076b545036134c8af07287e34aaa58bb2d06b95e8a1c9"


def vector_array():
  return (np.arange(40000, dtype=np.uint32) % 251).astype(np.float32).reshape(160, 250)


def ref(tag: bytes, body: bytes) -> bytes:  # written from docs/hashing.md
  return blake3.blake3(len(tag).to_bytes(8, "little") + tag + body).digest()


def test_vectors_in_doc(hashing_doc):
  for v in [*VEC_LEAVES, VEC_NODE01, VEC_ROOT, VEC_DIGEST]:
    assert v in hashing_doc


def test_tree_vectors_and_reference():
  a = vector_array()
  assert H.chunk_rows(a.dtype, a.shape) == 64
  leaves = [ref(b"aftune/v1/tensor-chunk", a[j * 64:(j + 1) * 64].tobytes()) for j in range(3)]
  assert [x.hex() for x in leaves] == VEC_LEAVES
  node01 = ref(b"aftune/v1/tensor-node", leaves[0] + leaves[1])
  root = ref(b"aftune/v1/tensor-node", node01 + leaves[2])
  assert (node01.hex(), root.hex()) == (VEC_NODE01, VEC_ROOT)
  header = (len(b"float32").to_bytes(8, "little") + b"float32" + (2).to_bytes(8, "little")
            + (160).to_bytes(8, "little") + (250).to_bytes(8, "little"))
  digest = ref(b"aftune/v1/tensor-tree", header + (64).to_bytes(8, "little") + root)
  assert digest.hex() == VEC_DIGEST == H.hash_array(a).hex()
  assert H.hash_array(jnp.asarray(a)).hex() == VEC_DIGEST
  assert device_hash.digest_bytes(jnp.asarray(a)).hex() == VEC_DIGEST
  b = a.copy()
  b[159, 249] += 1  # the last element of the last (short) chunk
  assert H.hash_array(b) != H.hash_array(a)
  assert H.hash_array(a.reshape(80, 500)) != H.hash_array(a)  # shape is bound


def test_form_boundaries():
  mib = H.CHUNK_BYTES
  assert mib == 65536
  assert H.chunk_rows(np.uint8, (mib,)) is None  # exactly 64 KiB: flat
  assert H.chunk_rows(np.uint8, (mib + 1,)) == mib  # c * 1 byte <= 64 KiB
  assert H.chunk_rows(np.float32, (4, 30000)) == 1  # a row larger than a chunk
  assert H.chunk_rows(np.float32, ()) is None
  a = np.zeros(mib, np.uint8)
  flat = ref(b"aftune/v1/tensor", (5).to_bytes(8, "little") + b"uint8" + (1).to_bytes(8, "little")
             + mib.to_bytes(8, "little") + a.tobytes())
  assert H.hash_array(a) == flat


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 300), data=st.data())
def test_any_aligned_cover_gives_the_root(n, data):
  leaves = [bytes([i % 256]) * 32 for i in range(n)]
  full = H.chunk_tree_root({(j, 1): d for j, d in enumerate(leaves)}, n)
  assert full == H.subtree(leaves)
  cuts = sorted(set(data.draw(st.lists(st.integers(1, max(1, n - 1)), max_size=6))) - {n})
  nodes = {}
  for lo, hi in zip([0, *cuts], [*cuts, n]):
    for s, k in H.aligned_pieces(lo, hi):
      assert k & (k - 1) == 0 and s % k == 0 and lo <= s and s + k <= hi
      nodes[(s, k)] = H.subtree(leaves[s:s + k])
  assert H.chunk_tree_root(nodes, n) == full
  if n > 1:
    del nodes[min(nodes)]
    with pytest.raises(ValueError, match="no digest covers chunk"):
      H.chunk_tree_root(nodes, n)


def test_merge_refuses_inconsistent_parts():
  a = vector_array()
  part = shards.local_part(a)
  assert shards.merge([part, part]) == H.hash_array(a)  # the same part twice: agreed
  bad = shards.TensorPart(part.dtype, part.shape, {k: bytes(32) for k in part.nodes})
  with pytest.raises(ValueError, match="disagree"):
    shards.merge([part, bad])
  assert shards.TensorPart.from_json(json.loads(json.dumps(part.to_json()))) == part


def test_equal_across_1_2_4_8_devices_and_layouts():
  r = subprocess.run([sys.executable, str(ROOT / "tests" / "shard_hash_run.py"), "layouts"],
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [json.loads(line) for line in r.stdout.splitlines()]
  assert {row["devices"] for row in rows} == {1, 2, 4, 8}
  assert {row["layout"] for row in rows} == {"replicated", "rows", "cols", "rows_x_cols"}
  for row in rows:
    assert row["got"] == row["want"] == row["parts"], row


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_hash_only_their_own_rows(tmp_path):
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "shard_hash_run.py"), "process",
                             str(p), str(port), str(tmp_path / f"p{p}.jsonl")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for p in (0, 1)]
  for p in procs:
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]
  per_proc = [[json.loads(x) for x in (tmp_path / f"p{p}.jsonl").read_text().splitlines()]
              for p in (0, 1)]
  assert len(per_proc[0]) == len(per_proc[1]) > 30
  for r0, r1 in zip(*per_proc):
    assert r0["got"] == r1["got"] == r0["want"], r0  # every process merges the same digest
    assert r0["pytree_ok"] and r1["pytree_ok"]
    if r0["nbytes"] > H.CHUNK_BYTES:  # the tree form
      # Each process copies half of the bytes off its devices, in every layout (after the
      # re-layout by rows where a trailing axis was split).
      assert r0["fetched"] == r1["fetched"] == r0["nbytes"] // 2, r0
  assert any(r["regroup"] for r in per_proc[0]) and not all(r["regroup"] for r in per_proc[0])

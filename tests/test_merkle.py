"""Tests for aftune.merkle: vectors, RFC 9162 proofs, streaming and resume."""

import json

import numpy as np
import pytest

from aftune.crypto import hashing as H
from aftune.crypto import merkle as M

# Literal vectors, also printed in docs/hashing.md.
VEC_LEAF_BYTES = (
  "04000000000000006c6f73730300000000000000ffffffffffffffff"
  "b4dcd3f3cdd5b7bdb7e99c9f9d8110a3474f615bf25fbffba88c44a7d1af5079"
)
VEC_LEAF = "cee6930440d98d60706aedf5eb61d80888285a54b08f48e8003b086a04e86cfc"
VEC_D = [
  "72afdb0abc3314e39b19c512392adb539cb2819fb64d27467f6b85ad2e8cbf58",
  "e330aae40dd6f6e68ffc2553656803d9f179e186509d82c670adc46a7ae45d6f",
  "1784a2ed8a4ec124d78733f123c0992534f5fd8852a8d445299bde0b64705bcc",
  "e5317ef36141c78d3b21c8364be96dcaaf717fb97a1bc2eaa454a27036c48d29",
  "642f0b9b167709cc9707c6c192b67f7351cea534c401536ec0bae4e858803964",
]
VEC_NODE_23 = "d3140305ce892f0af7d7433c98f58ff4acc1dc7f745bc23c5b0c3f16b6cc572a"
VEC_EMPTY = "36be8cdbff1808cc0ed12e9b16c9ab9bc6ec410f6b416b4b8b92b5ce11118d15"
VEC_ROOT3 = "9938312c0ba929b2a525263e780fad2ce71d15b3fdec2c1fe1b7e84a02e0656d"
VEC_ROOT5 = "54c34a84439cbea90c8f1077254a168a9f9f6be4ce056f68bfe97526e5a93df3"
VEC_PROOF_2_OF_5 = [
  "e5317ef36141c78d3b21c8364be96dcaaf717fb97a1bc2eaa454a27036c48d29",
  "28f3e8bde7e1acf6430e6a28f1900e79c71ae719dda994bacffe62fd8b6ea366",
  "642f0b9b167709cc9707c6c192b67f7351cea534c401536ec0bae4e858803964",
]
VEC_CONSISTENCY_3_TO_5 = [
  "1784a2ed8a4ec124d78733f123c0992534f5fd8852a8d445299bde0b64705bcc",
  "e5317ef36141c78d3b21c8364be96dcaaf717fb97a1bc2eaa454a27036c48d29",
  "28f3e8bde7e1acf6430e6a28f1900e79c71ae719dda994bacffe62fd8b6ea366",
  "642f0b9b167709cc9707c6c192b67f7351cea534c401536ec0bae4e858803964",
]


def vector_leaves(n=5):
  """The documented vector leaves: kind "test", step i, block -1, payload 32*[i]."""
  return [M.leaf_hash("test", i, -1, bytes([i]) * 32) for i in range(n)]


def leaves(n, seed=0):
  return [M.leaf_hash("x", i, i % 3 - 1, bytes([seed, i % 256]) * 16) for i in range(n)]


# --- reference MTH written from docs/hashing.md ---------------------------


@pytest.fixture(scope="module")
def ref_mth(ref_h):
  """ref_mth(d) -> the Merkle tree hash of the leaf hashes d."""

  def mth(d):
    if not d:
      return ref_h(b"aftune/v1/empty-tree", b"")
    if len(d) == 1:
      return d[0]
    k = 1
    while k * 2 < len(d):
      k *= 2
    return ref_h(b"aftune/v1/node", mth(d[:k]) + mth(d[k:]))

  return mth


def test_vectors_in_doc(hashing_doc):
  for v in [
    *VEC_D,
    VEC_NODE_23,
    VEC_LEAF_BYTES,
    VEC_LEAF,
    VEC_EMPTY,
    VEC_ROOT3,
    VEC_ROOT5,
    *VEC_PROOF_2_OF_5,
    *VEC_CONSISTENCY_3_TO_5,
  ]:
    assert v in hashing_doc, f"vector {v[:16]}... missing from docs/hashing.md"


def test_leaf_vector(ref_h):
  payload = H.hash_scalar(2.5, np.float32)
  data = M.leaf_bytes("loss", 3, -1, payload)
  assert data.hex() == VEC_LEAF_BYTES
  assert M.leaf_hash("loss", 3, -1, payload).hex() == VEC_LEAF
  assert M.hash_leaf_data(data).hex() == VEC_LEAF
  assert ref_h(b"aftune/v1/leaf", data).hex() == VEC_LEAF


def test_leaf_binds_meaning():
  p = bytes(32)
  base = M.leaf_hash("fwd", 1, 2, p)
  assert base != M.leaf_hash("bwd", 1, 2, p)
  assert base != M.leaf_hash("fwd", 2, 2, p)
  assert base != M.leaf_hash("fwd", 1, 1, p)
  assert base != M.leaf_hash("fwd", 1, 2, b"\x01" + p[1:])
  for bad in [("", 0, 0), ("k", -2, 0), ("k", 0, -2), ("k", True, 0), ("k", 1.0, 0)]:
    with pytest.raises(ValueError):
      M.leaf_bytes(*bad, p)


def test_root_vectors(ref_mth):
  d = vector_leaves()
  assert [h.hex() for h in d] == VEC_D
  assert M.node_hash(d[2], d[3]).hex() == VEC_NODE_23
  assert M.empty_root().hex() == VEC_EMPTY
  assert M.merkle_root([]).hex() == VEC_EMPTY
  assert M.merkle_root(d[:3]).hex() == VEC_ROOT3
  assert M.merkle_root(d).hex() == VEC_ROOT5
  assert ref_mth(d[:3]).hex() == VEC_ROOT3 and ref_mth(d).hex() == VEC_ROOT5
  assert M.merkle_root(d[:1]) == d[0]
  assert [p.hex() for p in M.inclusion_proof(d, 2, 5)] == VEC_PROOF_2_OF_5
  assert [p.hex() for p in M.consistency_proof(d, 3, 5)] == VEC_CONSISTENCY_3_TO_5
  assert M.verify_inclusion(
    d[2], 2, 5, [bytes.fromhex(h) for h in VEC_PROOF_2_OF_5], bytes.fromhex(VEC_ROOT5)
  )
  assert M.verify_consistency(
    3,
    5,
    bytes.fromhex(VEC_ROOT3),
    bytes.fromhex(VEC_ROOT5),
    [bytes.fromhex(h) for h in VEC_CONSISTENCY_3_TO_5],
  )


def test_streaming_root_every_prefix_and_tree_levels(ref_mth):
  d = leaves(70)
  s = M.StreamingMerkle()
  assert s.root() == M.empty_root()
  tree = M.MerkleTree(d)
  for i, h in enumerate(d):
    assert s.append(h) == i
    assert s.size == i + 1
    want = ref_mth(d[: i + 1])
    assert s.root() == want
    assert tree.root(i + 1) == want
    assert M.merkle_root(lambda j: d[j], i + 1) == want


def test_state_round_trip(ref_mth):
  d = leaves(45)
  s = M.StreamingMerkle()
  for i, h in enumerate(d):
    s.append(h)
    if i % 7 == 3:
      # Serialise through real JSON text, as a resumed run would.
      s = M.StreamingMerkle.from_state(json.loads(json.dumps(s.state())))
      assert s.size == i + 1
  assert s.root() == ref_mth(d)
  st = s.state()
  assert st["version"] == 1 and st["size"] == 45 and len(st["frontier"]) == 4
  with pytest.raises(ValueError):
    M.StreamingMerkle.from_state({**st, "size": 44})
  with pytest.raises(ValueError):
    M.StreamingMerkle.from_state({**st, "version": 2})
  with pytest.raises(ValueError):
    M.StreamingMerkle.from_state({**st, "frontier": ["00"] * 4})
  with pytest.raises(ValueError):
    s.append(b"short")


def test_inclusion_all_indices_and_tampering(ref_mth):
  d = leaves(33)
  other = leaves(1, seed=9)[0]
  for n in range(1, 34):
    tree = M.MerkleTree(d[:n])
    root = tree.root()
    for i in range(n):
      proof = tree.inclusion_proof(i)
      if n <= 12 or i in (0, n // 2, n - 1):
        assert proof == M.inclusion_proof(d, i, n)
      assert M.verify_inclusion(d[i], i, n, proof, root)
      assert not M.verify_inclusion(other, i, n, proof, root)
      assert not M.verify_inclusion(d[i], i, n, proof, other)
      for j in (i - 1, i + 1, i + n):
        if 0 <= j and d[j % 33] != d[i]:
          assert not M.verify_inclusion(d[i], j, n, proof, root)
      # A proof does not bind the size by itself (index 0 of sizes 3
      # and 4 has the same path shape): the signed (root, size) pair
      # does. Against the true root of another size it must fail.
      for m in (n - 1, n + 1):
        if i < m <= len(d):
          assert not M.verify_inclusion(d[i], i, m, proof, ref_mth(d[:m]))
      assert not M.verify_inclusion(d[i], i, 1 << 40, proof, root)
      for k in range(len(proof)):
        bad = list(proof)
        bad[k] = bytes([bad[k][0] ^ 1]) + bad[k][1:]
        assert not M.verify_inclusion(d[i], i, n, bad, root)
      assert not M.verify_inclusion(d[i], i, n, proof + [other], root)
      if proof:
        assert not M.verify_inclusion(d[i], i, n, proof[:-1], root)
  assert not M.verify_inclusion(d[0], -1, 1, [], d[0])
  assert M.verify_inclusion(d[0], np.int64(0), np.int32(1), [], d[0])
  assert not M.verify_inclusion(d[0], False, True, [], d[0])
  assert not M.verify_inclusion(d[0], 0, 0, [], M.empty_root())
  assert not M.verify_inclusion(d[0], 0, 2, [b"short"], d[0])


def test_consistency_all_sizes(ref_mth):
  d = leaves(20)
  tree = M.MerkleTree(d)
  roots = [tree.root(n) for n in range(21)]
  for n in range(0, 21):
    for m in range(0, n + 1):
      proof = tree.consistency_proof(m, n)
      assert proof == M.consistency_proof(d, m, n)
      assert M.verify_consistency(m, n, roots[m], roots[n], proof), (m, n)
      if m == n:
        continue
      if 0 < m:
        bad_new = bytes([roots[n][0] ^ 1]) + roots[n][1:]
        assert not M.verify_consistency(m, n, roots[m], bad_new, proof)
        bad_old = bytes([roots[m][0] ^ 1]) + roots[m][1:]
        assert not M.verify_consistency(m, n, bad_old, roots[n], proof)
        for k in range(len(proof)):
          bad = list(proof)
          bad[k] = bytes([bad[k][0] ^ 1]) + bad[k][1:]
          assert not M.verify_consistency(m, n, roots[m], roots[n], bad), (m, n, k)
        if m + 1 < n:
          assert not M.verify_consistency(m + 1, n, roots[m], roots[n], proof)
        assert not M.verify_consistency(m, n, roots[m], roots[n], [])
      # A rewritten history (different leaf inside the prefix) must fail.
      if m > 0:
        forged = list(d[:n])
        forged[m - 1] = leaves(1, seed=7)[0]
        assert not M.verify_consistency(m, n, roots[m], ref_mth(forged), proof)
  assert not M.verify_consistency(3, 2, roots[3], roots[2], [])
  assert not M.verify_consistency(0, 5, roots[1], roots[5], [])


def test_proof_json_round_trip():
  d = leaves(11)
  tree = M.MerkleTree(d)
  p = M.MerkleProof.inclusion(tree, 6, 11)
  q = M.MerkleProof.from_json(json.dumps(p.to_json()))
  assert q == p and q.verify_inclusion(d[6], tree.root())
  assert not q.verify_inclusion(d[5], tree.root())
  assert M.MerkleProof.inclusion(d, 6, 11) == p
  c = M.MerkleProof.consistency(tree, 4, 11)
  c2 = M.MerkleProof.from_json(c.to_json())
  assert c2 == c and c2.verify_consistency(tree.root(4), tree.root())
  assert not c2.verify_inclusion(d[4], tree.root())
  obj = p.to_json()
  assert obj["type"] == "inclusion" and obj["index"] == 6 and obj["size"] == 11
  for bad in [
    {**obj, "type": "x"},
    {**obj, "index": -1},
    {**obj, "path": ["00"]},
    {**obj, "extra": 1},
    {k: v for k, v in obj.items() if k != "size"},
    [1],
  ]:
    with pytest.raises(ValueError):
      M.MerkleProof.from_json(bad)


def test_bad_arguments():
  d = leaves(4)
  with pytest.raises(ValueError):
    M.inclusion_proof(d, 4, 4)
  with pytest.raises(ValueError):
    M.consistency_proof(d, 3, 2)
  with pytest.raises(ValueError):
    M.MerkleTree(d).root(5)
  with pytest.raises(ValueError):
    M.MerkleTree([b"short"])

"""Record forgery after the fact: a rewritten commitment, edited or incomplete openings.

  forge_leaf      rewrites one committed hash in trace/leaves.bin and re-signs the
                  commitment with the provider key (a forged hash, validly signed)
  resign          rewrites fields of commitment.json (e.g. final_model_hash: another
                  model passed off as the trained one) and re-signs it
  swap_proofs     an opened bundle whose two leaves carry each other's inclusion proof
  edit_tensor     an opened bundle with one element of one tensor shifted
  drop_leaf       an opened bundle that omits one revealed leaf
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np

from aftune import jsonio
from aftune.audit import bundle as bundle_lib
from aftune.crypto import hashing
from aftune.crypto import merkle
from aftune.crypto import signing
from aftune.record import layout as trace_lib


def forge_leaf(workdir: str | Path, kind: str, step: int, block: int,
               payload: bytes | None = None) -> dict[str, Any]:
  """Overwrites the committed hash of one leaf in trace/leaves.bin, recomputes the Merkle
  root and re-signs commitment.json with the provider key (a forged hash in a validly
  signed commitment). payload defaults to the old one with its first byte flipped.

  Returns:
    The new signed commitment (also written to commitment.json).
  """
  workdir = Path(workdir)
  path = workdir / "commitment.json"
  old = jsonio.load_json(path)
  grid = trace_lib.Grid.from_dict(old["grid"])
  leaves_path = workdir / "trace" / "leaves.bin"
  leaves = trace_lib.read_leaves(leaves_path, grid)
  index = grid.index(kind, step, block)
  leaf = leaves[index]
  if payload is None:
    payload = bytes([leaf.payload[0] ^ 0xFF]) + leaf.payload[1:]
  leaves[index] = trace_lib.Leaf(kind, step, block, payload)
  leaves_path.write_bytes(b"".join(l.pack() for l in leaves))
  doc = {k: v for k, v in old.items() if k != "signature"}
  doc["merkle_root"] = hashing.hexdigest(merkle.merkle_root([l.hash() for l in leaves]))
  key = signing.load_private_key(workdir / "provider_key.pem")
  new = signing.sign_document(doc, key)
  jsonio.write_json(path, new)
  return new


def resign(workdir: str | Path, **fields: Any) -> dict[str, Any]:
  """Rewrites `fields` of workdir/commitment.json and re-signs it with the provider key.

  Returns:
    The new signed commitment (also written to commitment.json).
  """
  path = Path(workdir) / "commitment.json"
  doc = {k: v for k, v in jsonio.load_json(path).items() if k != "signature"}
  doc.update(fields)
  new = signing.sign_document(doc, signing.load_private_key(Path(workdir) / "provider_key.pem"))
  jsonio.write_json(path, new)
  return new


def copy_bundle(bundle: bundle_lib.Bundle) -> bundle_lib.Bundle:
  return bundle_lib.Bundle(copy.deepcopy(bundle.manifest),
                           {k: np.array(v, copy=True) for k, v in bundle.tensors.items()})


def _leaf_pos(bundle: bundle_lib.Bundle, key: tuple[str, int, int]) -> int:
  for i, e in enumerate(bundle.manifest["leaves"]):
    if (e["kind"], e["step"], e["block"]) == tuple(key):
      return i
  raise KeyError(f"the bundle reveals no leaf {key}")


def swap_proofs(bundle: bundle_lib.Bundle, a: tuple[str, int, int],
                b: tuple[str, int, int]) -> bundle_lib.Bundle:
  """A copy of the bundle where leaves a and b carry each other's inclusion proof."""
  out = copy_bundle(bundle)
  leaves = out.manifest["leaves"]
  i, j = _leaf_pos(out, a), _leaf_pos(out, b)
  leaves[i]["proof"], leaves[j]["proof"] = leaves[j]["proof"], leaves[i]["proof"]
  return out


def edit_tensor(bundle: bundle_lib.Bundle, name: str, delta: float = 1e-3,
                index: int = 0) -> bundle_lib.Bundle:
  """A copy of the bundle with one element (flat `index`) of tensor `name` shifted by delta."""
  out = copy_bundle(bundle)
  arr = out.tensors[name]
  flat = arr.reshape(-1)
  flat[index] = flat[index] + np.asarray(delta).astype(arr.dtype)
  out.tensors[name] = flat.reshape(arr.shape)
  return out


def drop_leaf(bundle: bundle_lib.Bundle, key: tuple[str, int, int]) -> bundle_lib.Bundle:
  """A copy of the bundle that omits one revealed leaf (a missing hash)."""
  out = copy_bundle(bundle)
  del out.manifest["leaves"][_leaf_pos(out, key)]
  return out

"""The bundle tensor-name schema: the one place that builds (and reads) tensor names.

Training cell (layer block k, step block s):
  state/<start|end>/<params|opt_state>/<path>   block k's state at the step-block start / end
  frozen/<path>                                 block k's frozen parameters
  step/<t>/batch/<field>                        the examples of step t
  step/<t>/<kind>[/<block>]                     a single-tensor leaf of step t
Inference cell (layer block k, generation step t):
  params/<path>, frozen/<path>                  block k's served weights
  out/<t>/<block>                               the tensor leaving a block at step t
  tokens/<t>                                    the tokens emitted at step t

<path> is a parameter's canonical path (`hashing.path_str`), e.g. layer_0/mlp/up_proj/kernel.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from aftune.crypto import hashing

PyTree = Any
FROZEN = "frozen"
PARAMS = "params"


def state(label: str, kind: str) -> str:
  """Prefix of block k's `kind` ("params" | "opt_state") at `label` ("start" | "end")."""
  return f"state/{label}/{kind}"


def step_tensor(t: int, kind: str, block: int = -1) -> str:
  """A single-tensor leaf of step t (block -1: a per-step leaf such as the loss)."""
  return f"step/{t}/{kind}" + (f"/{block}" if block >= 0 else "")


def batch_field(t: int, field: str) -> str:
  return f"step/{t}/batch/{field}"


def infer_out(t: int, block: int) -> str:
  return f"out/{t}/{block}"


def infer_tokens(t: int) -> str:
  return f"tokens/{t}"


def tree_name(prefix: str, path: Any) -> str:
  """The name of one leaf of a pytree under `prefix` (path: a jax key path)."""
  return f"{prefix}/{hashing.path_str(hashing.path_components(path))}"


def flatten_tree(tree: PyTree, prefix: str) -> dict[str, np.ndarray]:
  """prefix/<canonical path> -> host array, the naming `hashing.hash_pytree` uses."""
  return {tree_name(prefix, path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def under(prefix: str, tensors: dict[str, np.ndarray]) -> list[tuple[tuple[str, ...], np.ndarray]]:
  """(path components, array) of every tensor named prefix/<path>."""
  p = prefix + "/"
  return [(tuple(name[len(p):].split("/")), arr) for name, arr in tensors.items()
          if name.startswith(p)]

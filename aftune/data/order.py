"""The committed batch order: which examples form each training step's batch.

  example_indices_for_step(seed, N, batch_size, step) -> int64 [B]
  make_batch(encoded, indices) -> {"tokens", "targets", "loss_mask",
                                   "attn_mask"}, each of shape [B, T]

The batch at a given step is a pure function of (seed, N, batch_size, step),
so a run can be audited or resumed without saving data-loader state. The
order is committed by hash: never change it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import numpy as np

BATCH_KEYS: tuple[str, ...] = ("tokens", "targets", "loss_mask", "attn_mask")
# The dtypes encoding.encode_example gives each field (a verifier checks bundles against them).
BATCH_DTYPES = {"tokens": np.int32, "targets": np.int32, "loss_mask": np.float32,
                "attn_mask": np.bool_}


def batch_shapes(batch_size: int, max_len: int) -> dict[str, tuple[np.dtype, tuple[int, int]]]:
  """field -> (dtype, [B, T] shape) of a batch, as `make_batch` builds it."""
  return {k: (np.dtype(BATCH_DTYPES[k]), (batch_size, max_len)) for k in BATCH_KEYS}


@functools.lru_cache(maxsize=8)
def _permutation(seed: int, num_examples: int, epoch: int) -> np.ndarray:
  for name, value in (("seed", seed), ("epoch", epoch)):
    if not 0 <= value < 2**64:
      raise ValueError(f"{name} must be in [0, 2**64), got {value}")
  if num_examples < 0:
    raise ValueError(f"num_examples must be >= 0, got {num_examples}")
  # Philox is keyed directly (no SeedSequence hashing) by the 128-bit key
  # (seed, epoch), so every (seed, epoch) gets an independent stream.
  # Only raw bits are used: numpy guarantees the bit generator's stream is
  # stable across versions, but not Generator methods like permutation().
  bitgen = np.random.Philox(key=np.array([seed, epoch], dtype=np.uint64))
  keys_N = bitgen.random_raw(num_examples)
  # Sorting i.i.d. uniform 64-bit keys gives a uniform random permutation;
  # the stable sort settles (astronomically unlikely) ties by index.
  perm_N = np.argsort(keys_N, kind="stable").astype(np.int64)
  perm_N.flags.writeable = False
  return perm_N


def batch_order(seed: int, num_examples: int, epoch: int) -> np.ndarray:
  """The order in which examples are visited in one epoch.

  Defined as argsort(Philox(key=[seed, epoch]).random_raw(num_examples)),
  which depends only on numpy's bit-stable Philox stream, so it is the same
  across processes, machines and numpy versions.

  Args:
    seed: Data seed, in [0, 2**64).
    num_examples: N.
    epoch: Epoch number, in [0, 2**64).

  Returns:
    int64 [N], a permutation of range(N).
  """
  return _permutation(seed, num_examples, epoch).copy()


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Number of full batches per epoch (the last partial batch is dropped).

  Args:
    num_examples: N.
    batch_size: B.

  Returns:
    N // B.

  Raises:
    ValueError: B < 1 or B > N (no full batch at all).
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if batch_size > num_examples:
    raise ValueError(f"batch_size={batch_size} exceeds the number of examples ({num_examples})")
  return num_examples // batch_size


def example_indices_for_step(
  seed: int, num_examples: int, batch_size: int, step: int
) -> np.ndarray:
  """Which examples form the batch of a training step (a pure function).

  epoch = step // steps_per_epoch; the batch is the (step % steps_per_epoch)
  -th slice of batch_order(seed, num_examples, epoch).

  Args:
    seed: Data seed.
    num_examples: N.
    batch_size: B.
    step: Global step, >= 0.

  Returns:
    int64 [B] example indices.
  """
  if step < 0:
    raise ValueError(f"step must be >= 0, got {step}")
  spe = steps_per_epoch(num_examples, batch_size)
  epoch, k = divmod(step, spe)
  return _permutation(seed, num_examples, epoch)[k * batch_size : (k + 1) * batch_size].copy()


def make_batch(encoded: Mapping[str, np.ndarray], indices: np.ndarray) -> dict[str, np.ndarray]:
  """Gathers a batch from a dataset's arrays (every field, rows `indices`).

  Args:
    encoded: encode_dataset output ([N, T] arrays), or an image dataset's
      {"image": uint8 [N, S, S, 3], "label": int32 [N]}.
    indices: int [B] example indices.

  Returns:
    Text: {"tokens", "targets", "loss_mask", "attn_mask"}, each [B, T]; images:
    {"image": [B, S, S, 3], "label": [B]}.
  """
  idx_B = np.asarray(indices, dtype=np.int64)
  return {k: v[idx_B] for k, v in encoded.items()}


def num_epochs_for_steps(num_examples: int, batch_size: int, num_steps: int) -> float:
  """How many epochs num_steps steps cover (for logging).

  Args:
    num_examples: N.
    batch_size: B.
    num_steps: Training steps.

  Returns:
    num_steps / steps_per_epoch.
  """
  return num_steps / steps_per_epoch(num_examples, batch_size)

"""Phase 2 of the protocol: the client draws which audit cells to open.

The audit grid has ``L = num_layer_blocks`` rows and ``S = num_step_blocks``
columns; a cell ``(layer_block, step_block)`` is the unit of audit and the grid
holds ``N = L * S`` cells. The client draws cells *after* it holds the
provider's signed Merkle root, so the provider cannot know in advance which
cells will be opened.

Every draw here is a pure function of ``(root, nonce, strategy, parameters,
grid)``:

    seed   = H("aftune/v1/challenge-seed", root || nonce)        (32 bytes)
    stream = BLAKE3 XOF of lp("aftune/v1/challenge-stream") || seed,
             read as consecutive u64le words

With a fresh 32-byte nonce (``secrets.token_bytes``, the default) this is
fresh client randomness; once the nonce is published, anyone can re-derive the
cells from the root (``verify_challenge_derivation``), so a client cannot
cherry-pick cells afterwards without being caught. Integers are drawn by
rejection sampling (no modulo bias) and subsets by a partial Fisher-Yates
shuffle; the exact algorithm, for another implementation, is in
``docs/challenge.md`` with a test vector.

Strategies:

- ``uniform``: ``m`` distinct cells uniformly over the whole grid.
- ``input_only``: ``m`` distinct step blocks of layer block 0 (the block that
  sees the data: strong against data poisoning). ``m`` may instead be derived
  from a target ``(k, p)`` over that block's ``S`` cells.
- ``output_only``: the same over the last layer block (the one with the loss).
- ``stratified``: every layer block and every step block at least once
  (``max(L, S)`` cells), then ``m - max(L, S)`` more cells uniformly.
- ``guarantee``: the smallest ``m`` such that, if at least ``k`` cells were
  tampered, a uniform draw catches one with probability ``>= p``
  (hypergeometric), then ``m`` uniform cells.

Every ``Challenge`` carries the guarantee that its draw gives ("if at least k
of the N cells were tampered, P(detect) >= p") for a few ``k``.

This module holds the derivation and the drawing; the probabilities are in
``detection``, the strategies' parameters in ``challenge_params``, the
document and its files in ``challenge_doc``; the command line is
``experiments/challenge.py``.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from collections.abc import Sequence

import blake3

from aftune.audit import challenge_checks
from aftune.audit import challenge_doc
from aftune.audit import challenge_params
from aftune.crypto import hashing

TAG_CHALLENGE_SEED = b"aftune/v1/challenge-seed"
TAG_CHALLENGE_STREAM = b"aftune/v1/challenge-stream"
TAG_CHALLENGE_NONCE = b"aftune/v1/challenge-nonce"

NONCE_BYTES = 32
_WORDS_PER_READ = 64
_TWO64 = 1 << 64


# --------------------------------------------------------------------------
# Derivation: seed, stream, unbiased integers, subsets
# --------------------------------------------------------------------------


def challenge_seed(root: bytes, nonce: bytes) -> bytes:
  """``H("aftune/v1/challenge-seed", root || nonce)``: 32 bytes."""
  root = challenge_checks.check_bytes("root", root, hashing.DIGEST_SIZE)
  nonce = challenge_checks.check_nonce(nonce)
  return hashing.hash_bytes(TAG_CHALLENGE_SEED, root + nonce)


def nonce_commitment(nonce: bytes) -> bytes:
  """``H("aftune/v1/challenge-nonce", nonce)``.

  A client that publishes this before the provider signs its root (for
  example in the job spec) can later prove it did not try several nonces
  against the root; see ``docs/challenge.md``.
  """
  return hashing.hash_bytes(TAG_CHALLENGE_NONCE, challenge_checks.check_nonce(nonce))


class _Stream:
  """Unbiased integers from the BLAKE3 XOF of the seed (prefix-consistent)."""

  def __init__(self, seed: bytes) -> None:
    tag = TAG_CHALLENGE_STREAM
    self._h = blake3.blake3(hashing.u64le(len(tag)) + tag + bytes(seed))
    self._buf = b""
    self._pos = 0  # byte offset of the next word in the whole stream
    self._buf_start = 0
    self.words_read = 0

  def word(self) -> int:
    off = self._pos - self._buf_start
    if off + 8 > len(self._buf):
      self._buf = self._h.digest(length=8 * _WORDS_PER_READ, seek=self._pos)
      self._buf_start, off = self._pos, 0
    self._pos += 8
    self.words_read += 1
    return int.from_bytes(self._buf[off : off + 8], "little")

  def below(self, n: int) -> int:
    """Uniform in [0, n): reject words >= 2^64 - (2^64 mod n)."""
    if n < 1:
      raise ValueError(f"cannot draw below {n}")
    limit = _TWO64 - (_TWO64 % n)
    while True:
      w = self.word()
      if w < limit:
        return w % n

  def sample(self, n: int, m: int) -> list[int]:
    """m distinct values of [0, n) in draw order (partial Fisher-Yates).

    Same output as: ``a = list(range(n)); for i < m: j = i + below(n - i);
    swap a[i], a[j]``; returns ``a[:m]``. A dict holds only moved slots.
    """
    if not 0 <= m <= n:
      raise ValueError(f"cannot sample {m} of {n}")
    moved: dict[int, int] = {}
    out = []
    for i in range(m):
      j = i + self.below(n - i)
      vi, vj = moved.get(i, i), moved.get(j, j)
      moved[j] = vi
      moved[i] = vj
      out.append(vj)
    return out


def _draw_cells(seed: bytes, strategy: str, L: int, S: int, m: int) -> list[challenge_doc.Cell]:
  """The cells of one draw, sorted; ``m`` already resolved and checked."""
  stream = _Stream(seed)
  N = L * S
  if strategy in ("uniform", "guarantee"):
    cells = [divmod(i, S) for i in stream.sample(N, m)]
  elif strategy == "input_only":
    cells = [(0, s) for s in stream.sample(S, m)]
  elif strategy == "output_only":
    cells = [(L - 1, s) for s in stream.sample(S, m)]
  elif strategy == "stratified":
    rows = stream.sample(L, L)
    cols = stream.sample(S, S)
    M = max(L, S)
    cover = {(rows[i % L], cols[i % S]) for i in range(M)}
    rest = [divmod(i, S) for i in range(N) if divmod(i, S) not in cover]
    cells = sorted(cover) + [rest[i] for i in stream.sample(len(rest), m - M)]
  else:
    raise challenge_checks.ChallengeError(f"unknown strategy {strategy!r}")
  return sorted((int(a), int(b)) for a, b in cells)


# --------------------------------------------------------------------------
# Drawing and re-deriving
# --------------------------------------------------------------------------


def draw_challenge(
  *,
  job_id: bytes,
  root: bytes,
  num_layer_blocks: int,
  num_step_blocks: int,
  strategy: str,
  m: int | None = None,
  k: int | None = None,
  p: float | None = None,
  nonce: bytes | None = None,
) -> challenge_doc.Challenge:
  """Draws the cells to challenge, derived from (root, nonce).

  Args:
    job_id: the 32-byte job id.
    root: the 32-byte Merkle root the provider signed (draw only after
      holding it).
    num_layer_blocks, num_step_blocks: grid dimensions L, S (>= 1).
    strategy: "uniform", "input_only", "output_only", "stratified" or
      "guarantee" (see the module doc).
    m: number of cells (uniform; input_only/output_only unless k, p;
      stratified: default and minimum max(L, S)).
    k, p: target "if at least k cells were tampered, P(detect) >= p":
      required for "guarantee", optional instead of m for
      input_only/output_only (over that layer block's S cells).
    nonce: client nonce (<= 1024 bytes); None: 32 fresh bytes from
      ``secrets.token_bytes``. Publish it with the challenge so anyone can
      re-derive the cells.

  Returns:
    The Challenge, cells sorted.

  Raises:
    ChallengeError: bad arguments (the message says which and why).
  """
  job_id = challenge_checks.check_bytes("job_id", job_id, hashing.DIGEST_SIZE)
  root = challenge_checks.check_bytes("root", root, hashing.DIGEST_SIZE)
  nonce = secrets.token_bytes(NONCE_BYTES) if nonce is None else challenge_checks.check_nonce(nonce)
  L = challenge_checks.check_count("num_layer_blocks", num_layer_blocks, 1)
  S = challenge_checks.check_count("num_step_blocks", num_step_blocks, 1)
  if not isinstance(strategy, str):
    raise challenge_checks.ChallengeError(f"strategy must be a string, got {strategy!r}")
  params = challenge_params.resolve_params(strategy, L, S, m, k, p)
  cells = _draw_cells(challenge_seed(root, nonce), strategy, L, S, params["m"])
  return challenge_doc.Challenge(
    job_id=job_id.hex(),
    root=root.hex(),
    nonce=nonce.hex(),
    strategy=strategy,
    params=params,
    num_layer_blocks=L,
    num_step_blocks=S,
    cells=tuple(cells),
  )


def explicit_challenge(
  *,
  job_id: bytes,
  root: bytes,
  num_layer_blocks: int,
  num_step_blocks: int,
  cells: Iterable[Sequence[int]],
) -> challenge_doc.Challenge:
  """A challenge of hand-picked cells (e.g. a follow-up): no nonce, no guarantee."""
  job_id = challenge_checks.check_bytes("job_id", job_id, hashing.DIGEST_SIZE)
  root = challenge_checks.check_bytes("root", root, hashing.DIGEST_SIZE)
  pairs = [tuple(c) for c in cells]
  if len(set(pairs)) != len(pairs):
    raise challenge_checks.ChallengeError("explicit challenge lists a cell twice")
  return challenge_doc.Challenge(
    job_id=job_id.hex(),
    root=root.hex(),
    nonce="",
    strategy=challenge_params.EXPLICIT,
    params={},
    num_layer_blocks=num_layer_blocks,
    num_step_blocks=num_step_blocks,
    cells=tuple(sorted(pairs)),
  )


def verify_challenge_derivation(
  challenge: challenge_doc.Challenge, *, expected_nonce_commitment: bytes | None = None
) -> None:
  """Re-derives the cells from (root, nonce, strategy, params) and compares.

  Lets the provider or a third party check that the client did not
  cherry-pick cells. Against a client that tries many nonces, the nonce must
  have been committed before the root existed: pass that commitment
  (``nonce_commitment(nonce)``) as ``expected_nonce_commitment``.

  Raises:
    ChallengeError: an explicit (not derived) challenge, a nonce that does
      not match its commitment, or cells that differ from the derivation.
  """
  if not challenge.derived:
    raise challenge_checks.ChallengeError(
      "explicit challenge: its cells were not derived from (root, nonce)"
    )
  nonce = bytes.fromhex(challenge.nonce)
  if expected_nonce_commitment is not None:
    if nonce_commitment(nonce) != bytes(expected_nonce_commitment):
      raise challenge_checks.ChallengeError(
        "the nonce does not match the client's nonce commitment"
      )
  L, S = challenge.num_layer_blocks, challenge.num_step_blocks
  params = challenge.params
  resolved = challenge_params.resolve_params(
    challenge.strategy,
    L,
    S,
    None if "k" in params else params["m"],
    params.get("k"),
    params.get("p"),
  )
  seed = challenge_seed(bytes.fromhex(challenge.root), nonce)
  want = tuple(_draw_cells(seed, challenge.strategy, L, S, resolved["m"]))
  if want != challenge.cells:
    missing = sorted(set(want) - set(challenge.cells))
    extra = sorted(set(challenge.cells) - set(want))
    raise challenge_checks.ChallengeError(
      f"cells do not follow from (root, nonce, {challenge.strategy}): "
      f"derivation has {[list(c) for c in missing[:5]]} not in the challenge, "
      f"challenge has {[list(c) for c in extra[:5]]} not derived"
    )

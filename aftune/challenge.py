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
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import secrets
import sys
from collections.abc import Iterable, Mapping, Sequence
from fractions import Fraction
from typing import Any

import blake3

from aftune import hashing
from aftune import signing

FORMAT = "aftune/challenge"
VERSION = 1

TAG_CHALLENGE_SEED = b"aftune/v1/challenge-seed"
TAG_CHALLENGE_STREAM = b"aftune/v1/challenge-stream"
TAG_CHALLENGE_NONCE = b"aftune/v1/challenge-nonce"

STRATEGIES = ("uniform", "input_only", "output_only", "stratified", "guarantee")
EXPLICIT = "explicit"  # cells chosen by hand: no derivation, no guarantee

DEFAULT_KS = (1, 2, 5, 10)
NONCE_BYTES = 32
MAX_NONCE_BYTES = 1024
# Stored probabilities may be written by another implementation: they must
# agree with ours to this absolute difference.
_PROB_TOLERANCE = 1e-12
# Exact rational arithmetic up to this many factors, log-space above it.
_EXACT_TERMS = 4096
_WORDS_PER_READ = 64
_TWO64 = 1 << 64

Cell = tuple[int, int]


class ChallengeError(ValueError):
  """A challenge that cannot be drawn, parsed or re-derived."""


# --------------------------------------------------------------------------
# Hypergeometric detection probability
# --------------------------------------------------------------------------


def _check_count(name: str, value: Any, lo: int, hi: int | None = None) -> int:
  if isinstance(value, bool) or not isinstance(value, int):
    raise ChallengeError(f"{name} must be an integer, got {value!r}")
  if value < lo or (hi is not None and value > hi):
    rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
    raise ChallengeError(f"{name} must be {rng}, got {value}")
  return value


def _check_prob(p: Any) -> float:
  if isinstance(p, bool) or not isinstance(p, (int, float)):
    raise ChallengeError(f"p must be a number, got {p!r}")
  p = float(p)
  if not (0.0 < p <= 1.0):
    raise ChallengeError(f"p must be in (0, 1], got {p}")
  return p


def detection_probability(N: int, k: int, m: int) -> float:
  """P(a uniform m-subset of N cells contains at least one of k tampered cells).

  ``P = 1 - C(N-k, m) / C(N, m)`` (hypergeometric, no replacement), computed
  exactly with integers (``C(N-k, m)/C(N, m) = prod_{i<t} (N-x-i)/(N-i)``
  with ``t = min(k, m)`` and ``x`` the other one) and rounded once to a float;
  above 4096 factors it is computed in log space (relative error ~1e-15).

  Args:
    N: number of cells in the population (>= 0).
    k: number of tampered cells, 0 <= k <= N.
    m: number of sampled cells, 0 <= m <= N.

  Returns:
    The probability; 0.0 if k == 0 or m == 0, 1.0 if k > N - m.
  """
  N = _check_count("N", N, 0)
  k = _check_count("k", k, 0, N)
  m = _check_count("m", m, 0, N)
  if k == 0 or m == 0:
    return 0.0
  if k > N - m:
    return 1.0
  t, x = (k, m) if k <= m else (m, k)
  if t <= _EXACT_TERMS:
    num = den = 1
    for i in range(t):
      num *= N - x - i
      den *= N - i
    return (den - num) / den  # exact int division, correctly rounded
  log_miss = math.fsum(math.log1p(-x / (N - i)) for i in range(t))
  return -math.expm1(log_miss)


def detection_probability_exact(N: int, k: int, m: int) -> Fraction:
  """The same probability as an exact fraction (for tests and small N)."""
  N = _check_count("N", N, 0)
  k = _check_count("k", k, 0, N)
  m = _check_count("m", m, 0, N)
  return 1 - Fraction(math.comb(N - k, m), math.comb(N, m))


def cells_needed(N: int, k: int, p: float) -> int:
  """The smallest m with ``detection_probability(N, k, m) >= p``.

  Args:
    N: population size (>= 1).
    k: assumed minimum number of tampered cells, 1 <= k <= N.
    p: target detection probability, 0 < p <= 1.

  Returns:
    m in [1, N - k + 1] (N - k + 1 cells always catch one of k).
  """
  N = _check_count("N", N, 1)
  k = _check_count("k", k, 1, N)
  p = _check_prob(p)
  lo, hi = 1, N - k + 1  # P(hi) == 1.0 >= p; P is non-decreasing in m
  while lo < hi:
    mid = (lo + hi) // 2
    if detection_probability(N, k, mid) >= p:
      hi = mid
    else:
      lo = mid + 1
  return lo


def _fmt_prob(p: float) -> str:
  if p >= 1.0:
    return "1"
  if p >= 0.9999:
    return f"{p:.6f}"
  return f"{p:.4f}"


def guarantee_lines(N: int, m: int, ks: Iterable[int] = DEFAULT_KS) -> list[tuple[int, float]]:
  """(k, P(detect)) for each k in ``ks`` that fits the population (1 <= k <= N)."""
  N = _check_count("N", N, 1)
  m = _check_count("m", m, 0, N)
  out = []
  for k in sorted(set(ks)):
    _check_count("k", k, 1)
    if k <= N:
      out.append((k, detection_probability(N, k, m)))
  return out


def guarantee_text(N: int, m: int, ks: Iterable[int] = DEFAULT_KS) -> str:
  """Human-readable guarantee of m uniform cells out of N.

  Example::

      sampled 27 of 136 cells uniformly:
        if at least 1 of the 136 cells were tampered, P(detect) >= 0.1985
        if at least 2 of the 136 cells were tampered, P(detect) >= 0.3588
  """
  lines = [f"sampled {m} of {N} cells uniformly:"]
  for k, prob in guarantee_lines(N, m, ks):
    lines.append(
      f"  if at least {k} of the {N} cells were tampered, P(detect) >= {_fmt_prob(prob)}"
    )
  return "\n".join(lines)


def stratified_lower_bound(L: int, S: int, m: int, k: int) -> float:
  """A lower bound on P(detect) for a stratified draw (exact for k = 1).

  The covering part holds ``M = max(L, S)`` cells and contains every cell
  with the same probability ``M / N``; the rest is ``m - M`` cells uniform
  over the other ``N - M``. If the covering part misses all k tampered
  cells, they all lie in the rest, so

      P >= q + (1 - q) * detection_probability(N - M, k, m - M),  q = M / N.
  """
  N = L * S
  M = max(L, S)
  k = _check_count("k", k, 1, N)
  m = _check_count("m", m, M, N)
  if k > N - M:
    return 1.0  # the covering part cannot avoid all of them
  q = M / N
  rest = detection_probability(N - M, k, m - M)
  return min(1.0, q + (1.0 - q) * rest)


# --------------------------------------------------------------------------
# Derivation: seed, stream, unbiased integers, subsets
# --------------------------------------------------------------------------


def challenge_seed(root: bytes, nonce: bytes) -> bytes:
  """``H("aftune/v1/challenge-seed", root || nonce)``: 32 bytes."""
  root = _check_bytes("root", root, hashing.DIGEST_SIZE)
  nonce = _check_nonce(nonce)
  return hashing.hash_bytes(TAG_CHALLENGE_SEED, root + nonce)


def nonce_commitment(nonce: bytes) -> bytes:
  """``H("aftune/v1/challenge-nonce", nonce)``.

  A client that publishes this before the provider signs its root (for
  example in the job spec) can later prove it did not try several nonces
  against the root; see ``docs/challenge.md``.
  """
  return hashing.hash_bytes(TAG_CHALLENGE_NONCE, _check_nonce(nonce))


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


def _draw_cells(seed: bytes, strategy: str, L: int, S: int, m: int) -> list[Cell]:
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
    raise ChallengeError(f"unknown strategy {strategy!r}")
  return sorted((int(a), int(b)) for a, b in cells)


# --------------------------------------------------------------------------
# Strategy parameters
# --------------------------------------------------------------------------


def _population(strategy: str, L: int, S: int) -> tuple[str, int]:
  """(description, size) of the cells a strategy draws from."""
  if strategy == "input_only":
    return "layer block 0 (input block)", S
  if strategy == "output_only":
    return f"layer block {L - 1} (output block)", S
  return "grid", L * S


def _resolve_params(strategy: str, L: int, S: int, m: Any, k: Any, p: Any) -> dict[str, Any]:
  """Checks a strategy's parameters; returns them with ``m`` resolved."""
  if strategy not in STRATEGIES:
    raise ChallengeError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
  _, pop = _population(strategy, L, S)
  has_target = k is not None or p is not None
  if has_target and (k is None or p is None):
    raise ChallengeError(f"{strategy}: give both k and p, or neither")
  if strategy == "guarantee":
    if not has_target:
      raise ChallengeError("guarantee: needs k (tampered cells) and p (target)")
    if m is not None:
      raise ChallengeError("guarantee: m is derived from (k, p); do not give it")
  elif strategy in ("input_only", "output_only"):
    if has_target == (m is not None):
      raise ChallengeError(f"{strategy}: give m, or (k, p), not both")
  elif has_target:
    raise ChallengeError(f"{strategy}: takes m only (use strategy 'guarantee' for k, p)")
  if has_target:
    k = _check_count("k", k, 1, pop)
    p = _check_prob(p)
    return {"k": k, "m": cells_needed(pop, k, p), "p": p}
  if strategy == "stratified":
    M = max(L, S)
    if m is None:
      m = M
    m = _check_count("m", m, 1)
    if m < M:
      raise ChallengeError(
        f"stratified: m={m} cannot cover {L} layer blocks and {S} step "
        f"blocks; need m >= max(L, S) = {M}"
      )
    if m > pop:
      raise ChallengeError(f"stratified: m={m} exceeds the {pop} cells of the grid")
    return {"m": m}
  if m is None:
    raise ChallengeError(f"{strategy}: needs m (number of cells)")
  m = _check_count("m", m, 1)
  if m > pop:
    where = "the grid" if pop == L * S else "the layer block"
    raise ChallengeError(f"{strategy}: m={m} exceeds the {pop} cells of {where}")
  return {"m": m}


# --------------------------------------------------------------------------
# The challenge document
# --------------------------------------------------------------------------


def _check_bytes(name: str, value: Any, length: int) -> bytes:
  if not isinstance(value, (bytes, bytearray)):
    raise ChallengeError(f"{name} must be bytes, got {type(value).__name__}")
  if len(value) != length:
    raise ChallengeError(f"{name} must be {length} bytes, got {len(value)}")
  return bytes(value)


def _check_nonce(nonce: Any) -> bytes:
  if not isinstance(nonce, (bytes, bytearray)):
    raise ChallengeError(f"nonce must be bytes, got {type(nonce).__name__}")
  if len(nonce) > MAX_NONCE_BYTES:
    raise ChallengeError(f"nonce is {len(nonce)} bytes; at most {MAX_NONCE_BYTES}")
  return bytes(nonce)


def _hex_field(name: str, value: Any, length: int | None) -> str:
  """Lower-case hex of ``length`` bytes (None: any length up to the nonce limit)."""
  if not isinstance(value, str):
    raise ChallengeError(f"{name} must be a hex string, got {type(value).__name__}")
  if value != value.lower() or value.strip() != value:
    raise ChallengeError(f"{name} must be lower-case hex without spaces: {value[:80]!r}")
  try:
    raw = bytes.fromhex(value)
  except ValueError:
    raise ChallengeError(f"{name} is not hex: {value[:80]!r}") from None
  if length is not None and len(raw) != length:
    raise ChallengeError(f"{name} must be {length}-byte hex, got {len(raw)} bytes")
  if length is None and len(raw) > MAX_NONCE_BYTES:
    raise ChallengeError(f"{name} is {len(raw)} bytes; at most {MAX_NONCE_BYTES}")
  return value


@dataclasses.dataclass(frozen=True)
class Challenge:
  """One drawn challenge: which cells the provider must open.

  Attributes:
    job_id: hex of the 32-byte job id.
    root: hex of the 32-byte Merkle root the draw was made against.
    nonce: hex of the client nonce ("" for an explicit challenge).
    strategy: one of ``STRATEGIES`` or ``"explicit"``.
    params: the strategy's parameters: ``{"m"}`` or ``{"k", "m", "p"}``
      (``m`` derived from the target), ``{}`` for explicit.
    num_layer_blocks, num_step_blocks: grid dimensions L and S.
    cells: sorted, distinct ``(layer_block, step_block)`` pairs.
    version: format version.
  """

  job_id: str
  root: str
  nonce: str
  strategy: str
  params: Mapping[str, Any]
  num_layer_blocks: int
  num_step_blocks: int
  cells: tuple[Cell, ...]
  version: int = VERSION

  def __post_init__(self) -> None:
    if isinstance(self.params, Mapping):  # a private copy: the object is frozen
      object.__setattr__(self, "params", dict(self.params))
    _validate(self)

  @property
  def num_cells(self) -> int:
    return self.num_layer_blocks * self.num_step_blocks

  @property
  def derived(self) -> bool:
    """True if the cells follow from (root, nonce, strategy, params)."""
    return self.strategy != EXPLICIT

  def guarantee(self, ks: Iterable[int] = ()) -> dict[str, Any]:
    """What this draw guarantees, for k = 1, 2, 5, 10, the target k and ``ks``.

    Returns:
      ``{"population", "population_size", "sampled", "bound", "detect":
      [{"k", "p"}], "text"}``; ``bound`` is "exact" (hypergeometric),
      "lower" (stratified) or "none" (explicit: no random draw).
    """
    L, S = self.num_layer_blocks, self.num_step_blocks
    if not self.derived:
      return {
        "population": "grid",
        "population_size": self.num_cells,
        "sampled": len(self.cells),
        "bound": "none",
        "detect": [],
        "text": (
          f"{len(self.cells)} of {self.num_cells} cells chosen explicitly, "
          "not drawn at random: no detection probability follows"
        ),
      }
    name, pop = _population(self.strategy, L, S)
    m = self.params["m"]
    all_ks = set(DEFAULT_KS) | set(ks)
    if "k" in self.params:
      all_ks.add(self.params["k"])
    all_ks = sorted(k for k in all_ks if 1 <= k <= pop)
    if self.strategy == "stratified":
      detect = [(k, stratified_lower_bound(L, S, m, k)) for k in all_ks]
      bound = "lower"
      head = (
        f"sampled {m} of {pop} cells, stratified (every layer block and "
        f"every step block; probabilities are lower bounds, exact for k=1):"
      )
    else:
      detect = guarantee_lines(pop, m, all_ks)
      bound = "exact"
      where = "the grid" if name == "grid" else name
      head = f"sampled {m} of the {pop} cells of {where} uniformly:"
    lines = [head]
    of = f"the {pop} cells" if name == "grid" else f"the {pop} cells of {name}"
    for k, prob in detect:
      lines.append(f"  if at least {k} of {of} were tampered, P(detect) >= {_fmt_prob(prob)}")
    if "k" in self.params:
      lines.append(
        f"  (target: k={self.params['k']}, p={self.params['p']}; "
        f"the smallest m that reaches it is {m})"
      )
    if name != "grid":
      lines.append(
        f"  cells outside {name} are not sampled: tampering confined to "
        "other layer blocks is not detected by this challenge"
      )
    return {
      "population": name,
      "population_size": pop,
      "sampled": m,
      "bound": bound,
      "detect": [{"k": k, "p": prob} for k, prob in detect],
      "text": "\n".join(lines),
    }

  @property
  def guarantee_text(self) -> str:
    return self.guarantee()["text"]

  def to_json(self) -> dict[str, Any]:
    """The challenge as a JSON object (see ``docs/challenge.md``)."""
    return {
      "format": FORMAT,
      "version": self.version,
      "job_id": self.job_id,
      "root": self.root,
      "nonce": self.nonce,
      "strategy": self.strategy,
      "params": dict(self.params),
      "grid": {
        "num_layer_blocks": self.num_layer_blocks,
        "num_step_blocks": self.num_step_blocks,
      },
      "cells": [list(c) for c in self.cells],
      "guarantee": self.guarantee(),
    }

  def digest(self) -> bytes:
    """``hash_json`` of the document without its informative guarantee."""
    doc = self.to_json()
    del doc["guarantee"]
    return hashing.hash_json(doc)

  @classmethod
  def from_json(cls, obj: Mapping[str, Any] | str | bytes) -> Challenge:
    """Parses and checks a challenge document (strict).

    Raises:
      ChallengeError: unknown format/version, unknown or missing fields,
        bad hex, cells outside the grid, duplicate or unsorted cells,
        parameters that do not match the strategy, or a stored guarantee
        that does not match the draw.
    """
    if isinstance(obj, (str, bytes)):
      obj = _strict_loads(obj)
    return _from_doc(obj)


def _validate(c: Challenge) -> None:
  if isinstance(c.version, bool) or c.version != VERSION:
    raise ChallengeError(f"unsupported challenge version {c.version!r} (this is {VERSION})")
  _hex_field("job_id", c.job_id, hashing.DIGEST_SIZE)
  _hex_field("root", c.root, hashing.DIGEST_SIZE)
  _hex_field("nonce", c.nonce, None)
  L = _check_count("num_layer_blocks", c.num_layer_blocks, 1)
  S = _check_count("num_step_blocks", c.num_step_blocks, 1)
  if not isinstance(c.params, Mapping):
    raise ChallengeError(f"params must be an object, got {type(c.params).__name__}")
  params = dict(c.params)
  if c.strategy == EXPLICIT:
    if params:
      raise ChallengeError(f"explicit challenge takes no params, got {sorted(params)}")
    if c.nonce:
      raise ChallengeError("explicit challenge has no nonce")
  else:
    allowed = {"m"} | ({"k", "p"} if "k" in params or "p" in params else set())
    if set(params) != allowed:
      raise ChallengeError(
        f"params for {c.strategy!r} must be {sorted(allowed)}, got {sorted(params)}"
      )
    _check_count("params.m", params["m"], 1)
    resolved = _resolve_params(
      c.strategy,
      L,
      S,
      None if "k" in params else params["m"],
      params.get("k"),
      params.get("p"),
    )
    if resolved["m"] != params["m"]:
      raise ChallengeError(
        f"params: m={params['m']!r} but (k={params.get('k')}, p={params.get('p')}) "
        f"needs m={resolved['m']}"
      )
  if not isinstance(c.cells, tuple):
    raise ChallengeError("cells must be a tuple of (layer_block, step_block)")
  if not c.cells:
    raise ChallengeError("a challenge needs at least one cell")
  prev = None
  for i, cell in enumerate(c.cells):
    if not (isinstance(cell, tuple) and len(cell) == 2):
      raise ChallengeError(f"cells[{i}] must be a (layer_block, step_block) pair: {cell!r}")
    lb, sb = cell
    for name, v, n in (("layer block", lb, L), ("step block", sb, S)):
      if isinstance(v, bool) or not isinstance(v, int):
        raise ChallengeError(f"cells[{i}]: {name} must be an integer, got {v!r}")
      if not 0 <= v < n:
        raise ChallengeError(
          f"cells[{i}] = {list(cell)} is outside the {L}x{S} grid ({name} must be in [0, {n - 1}])"
        )
    if prev is not None and cell == prev:
      raise ChallengeError(f"cells[{i}] = {list(cell)} is a duplicate")
    if prev is not None and cell < prev:
      raise ChallengeError(f"cells must be sorted; cells[{i}] = {list(cell)} < {list(prev)}")
    prev = cell
  if c.derived:
    m = params["m"]
    if len(c.cells) != m:
      raise ChallengeError(f"{c.strategy}: m={m} but the challenge lists {len(c.cells)} cells")
    if c.strategy in ("input_only", "output_only"):
      want = 0 if c.strategy == "input_only" else L - 1
      bad = [list(x) for x in c.cells if x[0] != want]
      if bad:
        raise ChallengeError(f"{c.strategy}: cells {bad[:5]} are not in layer block {want}")
    if c.strategy == "stratified":
      if {x[0] for x in c.cells} != set(range(L)) or {x[1] for x in c.cells} != set(range(S)):
        raise ChallengeError("stratified: the cells do not cover every layer and step block")


_FIELDS = {
  "format",
  "version",
  "job_id",
  "root",
  "nonce",
  "strategy",
  "params",
  "grid",
  "cells",
  "guarantee",
}


def _from_doc(doc: Any) -> Challenge:
  if not isinstance(doc, Mapping):
    raise ChallengeError(f"a challenge must be a JSON object, got {type(doc).__name__}")
  if doc.get("format") != FORMAT:
    raise ChallengeError(f"not a challenge: format is {doc.get('format')!r}, expected {FORMAT!r}")
  version = doc.get("version")
  if isinstance(version, bool) or version != VERSION:
    raise ChallengeError(f"unsupported challenge version {version!r} (this is {VERSION})")
  missing = _FIELDS - set(doc)
  extra = set(doc) - _FIELDS
  if missing:
    raise ChallengeError(f"missing fields: {', '.join(sorted(missing))}")
  if extra:
    raise ChallengeError(f"unknown fields: {', '.join(sorted(extra))}")
  strategy = doc["strategy"]
  if not isinstance(strategy, str) or strategy not in STRATEGIES + (EXPLICIT,):
    raise ChallengeError(f"unknown strategy {strategy!r}")
  grid = doc["grid"]
  if not isinstance(grid, Mapping) or set(grid) != {"num_layer_blocks", "num_step_blocks"}:
    raise ChallengeError("grid must be {num_layer_blocks, num_step_blocks}")
  cells = doc["cells"]
  if not isinstance(cells, list):
    raise ChallengeError("cells must be a list of [layer_block, step_block]")
  parsed = []
  for i, cell in enumerate(cells):
    if not (isinstance(cell, list) and len(cell) == 2):
      raise ChallengeError(f"cells[{i}] must be [layer_block, step_block], got {cell!r}")
    parsed.append(tuple(cell))
  params = doc["params"]
  if not isinstance(params, Mapping):
    raise ChallengeError("params must be an object")
  c = Challenge(
    job_id=doc["job_id"],
    root=doc["root"],
    nonce=doc["nonce"],
    strategy=strategy,
    params=dict(params),
    num_layer_blocks=grid["num_layer_blocks"],
    num_step_blocks=grid["num_step_blocks"],
    cells=tuple(parsed),
    version=version,
  )
  _check_stored_guarantee(doc["guarantee"], c.guarantee())
  return c


def _check_stored_guarantee(stored: Any, ours: Mapping[str, Any]) -> None:
  """The stored guarantee is informative, but must not claim more than the draw gives."""
  if not isinstance(stored, Mapping) or set(stored) != set(ours):
    raise ChallengeError(f"guarantee must be an object with fields {sorted(ours)}")
  for key in ("population", "population_size", "sampled", "bound"):
    if stored[key] != ours[key]:
      raise ChallengeError(f"guarantee.{key} is {stored[key]!r} but the draw gives {ours[key]!r}")
  if not isinstance(stored["text"], str):
    raise ChallengeError("guarantee.text must be a string")
  det = stored["detect"]
  if not isinstance(det, list) or len(det) != len(ours["detect"]):
    raise ChallengeError("guarantee.detect does not match the draw")
  for got, want in zip(det, ours["detect"]):
    if not isinstance(got, Mapping) or set(got) != {"k", "p"} or got["k"] != want["k"]:
      raise ChallengeError(f"guarantee.detect entry {got!r} does not match k={want['k']}")
    p = got["p"]
    if (
      isinstance(p, bool) or not isinstance(p, (int, float)) or abs(p - want["p"]) > _PROB_TOLERANCE
    ):
      raise ChallengeError(
        f"guarantee.detect: k={want['k']} claims P={p!r} but the draw gives {want['p']!r}"
      )


def _strict_loads(text: str | bytes) -> Any:
  try:
    return signing.strict_loads(text)
  except UnicodeDecodeError as e:
    raise ChallengeError(f"not UTF-8: {e}") from None
  except ValueError as e:
    raise ChallengeError(f"invalid JSON: {e}") from None


def load_challenge(path: str | os.PathLike[str]) -> Challenge:
  """Reads a challenge file; every error names the file.

  Raises:
    ChallengeError: unreadable file, invalid JSON, or an invalid challenge.
  """
  name = os.fspath(path)
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise ChallengeError(f"{name}: cannot read challenge: {e.strerror or e}") from None
  try:
    return Challenge.from_json(raw)
  except ChallengeError as e:
    raise ChallengeError(f"{name}: {e}") from None


def save_challenge(challenge: Challenge, path: str | os.PathLike[str]) -> None:
  """Writes the challenge as indented JSON with sorted keys."""
  text = json.dumps(challenge.to_json(), indent=1, sort_keys=True, allow_nan=False)
  with open(path, "w", encoding="utf-8") as f:
    f.write(text + "\n")


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
) -> Challenge:
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
  job_id = _check_bytes("job_id", job_id, hashing.DIGEST_SIZE)
  root = _check_bytes("root", root, hashing.DIGEST_SIZE)
  nonce = secrets.token_bytes(NONCE_BYTES) if nonce is None else _check_nonce(nonce)
  L = _check_count("num_layer_blocks", num_layer_blocks, 1)
  S = _check_count("num_step_blocks", num_step_blocks, 1)
  if not isinstance(strategy, str):
    raise ChallengeError(f"strategy must be a string, got {strategy!r}")
  params = _resolve_params(strategy, L, S, m, k, p)
  cells = _draw_cells(challenge_seed(root, nonce), strategy, L, S, params["m"])
  return Challenge(
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
) -> Challenge:
  """A challenge of hand-picked cells (e.g. a follow-up): no nonce, no guarantee."""
  job_id = _check_bytes("job_id", job_id, hashing.DIGEST_SIZE)
  root = _check_bytes("root", root, hashing.DIGEST_SIZE)
  pairs = [tuple(c) for c in cells]
  if len(set(pairs)) != len(pairs):
    raise ChallengeError("explicit challenge lists a cell twice")
  return Challenge(
    job_id=job_id.hex(),
    root=root.hex(),
    nonce="",
    strategy=EXPLICIT,
    params={},
    num_layer_blocks=num_layer_blocks,
    num_step_blocks=num_step_blocks,
    cells=tuple(sorted(pairs)),
  )


def verify_challenge_derivation(
  challenge: Challenge, *, expected_nonce_commitment: bytes | None = None
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
    raise ChallengeError("explicit challenge: its cells were not derived from (root, nonce)")
  nonce = bytes.fromhex(challenge.nonce)
  if expected_nonce_commitment is not None:
    if nonce_commitment(nonce) != bytes(expected_nonce_commitment):
      raise ChallengeError("the nonce does not match the client's nonce commitment")
  L, S = challenge.num_layer_blocks, challenge.num_step_blocks
  params = challenge.params
  resolved = _resolve_params(
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
    raise ChallengeError(
      f"cells do not follow from (root, nonce, {challenge.strategy}): "
      f"derivation has {[list(c) for c in missing[:5]]} not in the challenge, "
      f"challenge has {[list(c) for c in extra[:5]]} not derived"
    )


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
  """CLI: ``draw``, ``show FILE``, ``verify FILE`` (re-derivation)."""
  ap = argparse.ArgumentParser(
    prog="python -m aftune.challenge", description=__doc__.split("\n")[0]
  )
  sub = ap.add_subparsers(dest="cmd", required=True)
  d = sub.add_parser("draw", help="draw a challenge and write it as JSON")
  d.add_argument("--job-id", required=True, help="32-byte hex")
  d.add_argument("--root", required=True, help="32-byte hex Merkle root")
  d.add_argument("--layer-blocks", type=int, required=True)
  d.add_argument("--step-blocks", type=int, required=True)
  d.add_argument("--strategy", choices=STRATEGIES, required=True)
  d.add_argument("--m", type=int)
  d.add_argument("--k", type=int)
  d.add_argument("--p", type=float)
  d.add_argument("--nonce", help="hex; default: 32 fresh random bytes")
  d.add_argument("--out", required=True)
  s = sub.add_parser("show", help="check and print a challenge")
  s.add_argument("file")
  v = sub.add_parser("verify", help="re-derive a challenge's cells from (root, nonce)")
  v.add_argument("file")
  v.add_argument("--nonce-commitment", help="hex commitment published before the root")
  args = ap.parse_args(argv)
  try:
    if args.cmd == "draw":
      c = draw_challenge(
        job_id=hashing.from_hex(args.job_id),
        root=hashing.from_hex(args.root),
        num_layer_blocks=args.layer_blocks,
        num_step_blocks=args.step_blocks,
        strategy=args.strategy,
        m=args.m,
        k=args.k,
        p=args.p,
        nonce=None if args.nonce is None else hashing.from_hex(args.nonce, None),
      )
      save_challenge(c, args.out)
      print(f"{args.out}: {len(c.cells)} cells")
      print(c.guarantee_text)
    elif args.cmd == "show":
      c = load_challenge(args.file)
      print(
        f"{args.file}: {c.strategy}, {len(c.cells)} cells of a "
        f"{c.num_layer_blocks}x{c.num_step_blocks} grid"
      )
      print("cells:", " ".join(f"({a},{b})" for a, b in c.cells))
      print(c.guarantee_text)
    else:
      c = load_challenge(args.file)
      commit = None if args.nonce_commitment is None else hashing.from_hex(args.nonce_commitment)
      try:
        verify_challenge_derivation(c, expected_nonce_commitment=commit)
      except ChallengeError as e:
        raise ChallengeError(f"{args.file}: {e}") from None
      print(f"{args.file}: OK, {len(c.cells)} cells follow from (root, nonce)")
  except ValueError as e:  # ChallengeError and from_hex errors
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())

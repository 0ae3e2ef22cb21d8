"""The challenge document: the ``Challenge`` type, its strict validation and JSON files.

A ``Challenge`` names the job, the root it was drawn against, the nonce, the
strategy and its parameters, the grid and the sorted cells; its JSON form
(``format`` "aftune/challenge", version 1, specified in
``docs/challenge.md``) also carries the guarantee the draw gives. Every
``Challenge`` is validated when it is built, and ``from_json`` /
``load_challenge`` reject anything that is not exactly a valid document.
Drawing and re-deriving the cells is in ``challenge``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from collections.abc import Mapping
from typing import Any

from aftune import jsonio
from aftune.audit import challenge_checks
from aftune.audit import challenge_params
from aftune.audit import detection
from aftune.crypto import hashing

FORMAT = "aftune/challenge"
VERSION = 1

# Stored probabilities may be written by another implementation: they must
# agree with ours to this absolute difference.
_PROB_TOLERANCE = 1e-12

Cell = tuple[int, int]


@dataclasses.dataclass(frozen=True)
class Challenge:
  """One drawn challenge: which cells the provider must open.

  Attributes:
    job_id: hex of the 32-byte job id.
    root: hex of the 32-byte Merkle root the draw was made against.
    nonce: hex of the client nonce ("" for an explicit challenge).
    strategy: one of ``challenge_params.STRATEGIES`` or ``"explicit"``.
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
    return self.strategy != challenge_params.EXPLICIT

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
    name, pop = challenge_params.population(self.strategy, L, S)
    m = self.params["m"]
    all_ks = set(detection.DEFAULT_KS) | set(ks)
    if "k" in self.params:
      all_ks.add(self.params["k"])
    all_ks = sorted(k for k in all_ks if 1 <= k <= pop)
    if self.strategy == "stratified":
      detect = [(k, detection.stratified_lower_bound(L, S, m, k)) for k in all_ks]
      bound = "lower"
      head = (
        f"sampled {m} of {pop} cells, stratified (every layer block and "
        f"every step block; probabilities are lower bounds, exact for k=1):"
      )
    else:
      detect = detection.guarantee_lines(pop, m, all_ks)
      bound = "exact"
      where = "the grid" if name == "grid" else name
      head = f"sampled {m} of the {pop} cells of {where} uniformly:"
    lines = [head]
    of = f"the {pop} cells" if name == "grid" else f"the {pop} cells of {name}"
    for k, prob in detect:
      lines.append(
        f"  if at least {k} of {of} were tampered, P(detect) >= {detection.fmt_prob(prob)}"
      )
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
    raise challenge_checks.ChallengeError(
      f"unsupported challenge version {c.version!r} (this is {VERSION})"
    )
  challenge_checks.check_hex("job_id", c.job_id, hashing.DIGEST_SIZE)
  challenge_checks.check_hex("root", c.root, hashing.DIGEST_SIZE)
  challenge_checks.check_hex("nonce", c.nonce, None)
  L = challenge_checks.check_count("num_layer_blocks", c.num_layer_blocks, 1)
  S = challenge_checks.check_count("num_step_blocks", c.num_step_blocks, 1)
  if not isinstance(c.params, Mapping):
    raise challenge_checks.ChallengeError(
      f"params must be an object, got {type(c.params).__name__}"
    )
  params = dict(c.params)
  if c.strategy == challenge_params.EXPLICIT:
    if params:
      raise challenge_checks.ChallengeError(
        f"explicit challenge takes no params, got {sorted(params)}"
      )
    if c.nonce:
      raise challenge_checks.ChallengeError("explicit challenge has no nonce")
  else:
    allowed = {"m"} | ({"k", "p"} if "k" in params or "p" in params else set())
    if set(params) != allowed:
      raise challenge_checks.ChallengeError(
        f"params for {c.strategy!r} must be {sorted(allowed)}, got {sorted(params)}"
      )
    challenge_checks.check_count("params.m", params["m"], 1)
    resolved = challenge_params.resolve_params(
      c.strategy,
      L,
      S,
      None if "k" in params else params["m"],
      params.get("k"),
      params.get("p"),
    )
    if resolved["m"] != params["m"]:
      raise challenge_checks.ChallengeError(
        f"params: m={params['m']!r} but (k={params.get('k')}, p={params.get('p')}) "
        f"needs m={resolved['m']}"
      )
  if not isinstance(c.cells, tuple):
    raise challenge_checks.ChallengeError("cells must be a tuple of (layer_block, step_block)")
  if not c.cells:
    raise challenge_checks.ChallengeError("a challenge needs at least one cell")
  prev = None
  for i, cell in enumerate(c.cells):
    if not (isinstance(cell, tuple) and len(cell) == 2):
      raise challenge_checks.ChallengeError(
        f"cells[{i}] must be a (layer_block, step_block) pair: {cell!r}"
      )
    lb, sb = cell
    for name, v, n in (("layer block", lb, L), ("step block", sb, S)):
      if isinstance(v, bool) or not isinstance(v, int):
        raise challenge_checks.ChallengeError(f"cells[{i}]: {name} must be an integer, got {v!r}")
      if not 0 <= v < n:
        raise challenge_checks.ChallengeError(
          f"cells[{i}] = {list(cell)} is outside the {L}x{S} grid ({name} must be in [0, {n - 1}])"
        )
    if prev is not None and cell == prev:
      raise challenge_checks.ChallengeError(f"cells[{i}] = {list(cell)} is a duplicate")
    if prev is not None and cell < prev:
      raise challenge_checks.ChallengeError(
        f"cells must be sorted; cells[{i}] = {list(cell)} < {list(prev)}"
      )
    prev = cell
  if c.derived:
    m = params["m"]
    if len(c.cells) != m:
      raise challenge_checks.ChallengeError(
        f"{c.strategy}: m={m} but the challenge lists {len(c.cells)} cells"
      )
    if c.strategy in ("input_only", "output_only"):
      want = 0 if c.strategy == "input_only" else L - 1
      bad = [list(x) for x in c.cells if x[0] != want]
      if bad:
        raise challenge_checks.ChallengeError(
          f"{c.strategy}: cells {bad[:5]} are not in layer block {want}"
        )
    if c.strategy == "stratified":
      if {x[0] for x in c.cells} != set(range(L)) or {x[1] for x in c.cells} != set(range(S)):
        raise challenge_checks.ChallengeError(
          "stratified: the cells do not cover every layer and step block"
        )


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
    raise challenge_checks.ChallengeError(
      f"a challenge must be a JSON object, got {type(doc).__name__}"
    )
  if doc.get("format") != FORMAT:
    raise challenge_checks.ChallengeError(
      f"not a challenge: format is {doc.get('format')!r}, expected {FORMAT!r}"
    )
  version = doc.get("version")
  if isinstance(version, bool) or version != VERSION:
    raise challenge_checks.ChallengeError(
      f"unsupported challenge version {version!r} (this is {VERSION})"
    )
  missing = _FIELDS - set(doc)
  extra = set(doc) - _FIELDS
  if missing:
    raise challenge_checks.ChallengeError(f"missing fields: {', '.join(sorted(missing))}")
  if extra:
    raise challenge_checks.ChallengeError(f"unknown fields: {', '.join(sorted(extra))}")
  strategy = doc["strategy"]
  if not isinstance(strategy, str) or strategy not in challenge_params.STRATEGIES + (
    challenge_params.EXPLICIT,
  ):
    raise challenge_checks.ChallengeError(f"unknown strategy {strategy!r}")
  grid = doc["grid"]
  if not isinstance(grid, Mapping) or set(grid) != {"num_layer_blocks", "num_step_blocks"}:
    raise challenge_checks.ChallengeError("grid must be {num_layer_blocks, num_step_blocks}")
  cells = doc["cells"]
  if not isinstance(cells, list):
    raise challenge_checks.ChallengeError("cells must be a list of [layer_block, step_block]")
  parsed = []
  for i, cell in enumerate(cells):
    if not (isinstance(cell, list) and len(cell) == 2):
      raise challenge_checks.ChallengeError(
        f"cells[{i}] must be [layer_block, step_block], got {cell!r}"
      )
    parsed.append(tuple(cell))
  params = doc["params"]
  if not isinstance(params, Mapping):
    raise challenge_checks.ChallengeError("params must be an object")
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
    raise challenge_checks.ChallengeError(f"guarantee must be an object with fields {sorted(ours)}")
  for key in ("population", "population_size", "sampled", "bound"):
    if stored[key] != ours[key]:
      raise challenge_checks.ChallengeError(
        f"guarantee.{key} is {stored[key]!r} but the draw gives {ours[key]!r}"
      )
  if not isinstance(stored["text"], str):
    raise challenge_checks.ChallengeError("guarantee.text must be a string")
  det = stored["detect"]
  if not isinstance(det, list) or len(det) != len(ours["detect"]):
    raise challenge_checks.ChallengeError("guarantee.detect does not match the draw")
  for got, want in zip(det, ours["detect"]):
    if not isinstance(got, Mapping) or set(got) != {"k", "p"} or got["k"] != want["k"]:
      raise challenge_checks.ChallengeError(
        f"guarantee.detect entry {got!r} does not match k={want['k']}"
      )
    p = got["p"]
    if (
      isinstance(p, bool) or not isinstance(p, (int, float)) or abs(p - want["p"]) > _PROB_TOLERANCE
    ):
      raise challenge_checks.ChallengeError(
        f"guarantee.detect: k={want['k']} claims P={p!r} but the draw gives {want['p']!r}"
      )


def _strict_loads(text: str | bytes) -> Any:
  try:
    return jsonio.strict_loads(text)
  except UnicodeDecodeError as e:
    raise challenge_checks.ChallengeError(f"not UTF-8: {e}") from None
  except ValueError as e:
    raise challenge_checks.ChallengeError(f"invalid JSON: {e}") from None


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
    raise challenge_checks.ChallengeError(
      f"{name}: cannot read challenge: {e.strerror or e}"
    ) from None
  try:
    return Challenge.from_json(raw)
  except challenge_checks.ChallengeError as e:
    raise challenge_checks.ChallengeError(f"{name}: {e}") from None


def save_challenge(challenge: Challenge, path: str | os.PathLike[str]) -> None:
  """Writes the challenge as indented JSON with sorted keys."""
  text = json.dumps(challenge.to_json(), indent=1, sort_keys=True, allow_nan=False)
  with open(path, "w", encoding="utf-8") as f:
    f.write(text + "\n")

"""The challenge strategies and the rules for their parameters.

``resolve_params`` checks a strategy's ``m`` or ``(k, p)`` against the grid
and resolves ``m`` (from the target with ``detection.cells_needed`` where one
is given); ``population`` names the cells a strategy draws from. Drawing and
validating a stored challenge both go through these rules (see
``challenge`` and ``challenge_doc``).
"""

from __future__ import annotations

from typing import Any

from aftune.audit import challenge_checks
from aftune.audit import detection

STRATEGIES = ("uniform", "input_only", "output_only", "stratified", "guarantee")
EXPLICIT = "explicit"  # cells chosen by hand: no derivation, no guarantee


def population(strategy: str, L: int, S: int) -> tuple[str, int]:
  """(description, size) of the cells a strategy draws from."""
  if strategy == "input_only":
    return "layer block 0 (input block)", S
  if strategy == "output_only":
    return f"layer block {L - 1} (output block)", S
  return "grid", L * S


def resolve_params(strategy: str, L: int, S: int, m: Any, k: Any, p: Any) -> dict[str, Any]:
  """Checks a strategy's parameters; returns them with ``m`` resolved."""
  if strategy not in STRATEGIES:
    raise challenge_checks.ChallengeError(
      f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}"
    )
  _, pop = population(strategy, L, S)
  has_target = k is not None or p is not None
  if has_target and (k is None or p is None):
    raise challenge_checks.ChallengeError(f"{strategy}: give both k and p, or neither")
  if strategy == "guarantee":
    if not has_target:
      raise challenge_checks.ChallengeError("guarantee: needs k (tampered cells) and p (target)")
    if m is not None:
      raise challenge_checks.ChallengeError("guarantee: m is derived from (k, p); do not give it")
  elif strategy in ("input_only", "output_only"):
    if has_target == (m is not None):
      raise challenge_checks.ChallengeError(f"{strategy}: give m, or (k, p), not both")
  elif has_target:
    raise challenge_checks.ChallengeError(
      f"{strategy}: takes m only (use strategy 'guarantee' for k, p)"
    )
  if has_target:
    k = challenge_checks.check_count("k", k, 1, pop)
    p = challenge_checks.check_prob(p)
    return {"k": k, "m": detection.cells_needed(pop, k, p), "p": p}
  if strategy == "stratified":
    M = max(L, S)
    if m is None:
      m = M
    m = challenge_checks.check_count("m", m, 1)
    if m < M:
      raise challenge_checks.ChallengeError(
        f"stratified: m={m} cannot cover {L} layer blocks and {S} step "
        f"blocks; need m >= max(L, S) = {M}"
      )
    if m > pop:
      raise challenge_checks.ChallengeError(
        f"stratified: m={m} exceeds the {pop} cells of the grid"
      )
    return {"m": m}
  if m is None:
    raise challenge_checks.ChallengeError(f"{strategy}: needs m (number of cells)")
  m = challenge_checks.check_count("m", m, 1)
  if m > pop:
    where = "the grid" if pop == L * S else "the layer block"
    raise challenge_checks.ChallengeError(f"{strategy}: m={m} exceeds the {pop} cells of {where}")
  return {"m": m}

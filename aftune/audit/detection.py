"""Hypergeometric detection probabilities: what a challenge of m cells guarantees.

If at least ``k`` of ``N`` cells were tampered and ``m`` distinct cells are
drawn uniformly, the draw catches one with probability
``1 - C(N-k, m) / C(N, m)``. This module computes that probability exactly,
the smallest ``m`` that reaches a target, the guarantee lines a challenge
prints, and a lower bound for stratified draws. Bad arguments raise
``challenge_checks.ChallengeError``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from fractions import Fraction

from aftune.audit import challenge_checks

DEFAULT_KS = (1, 2, 5, 10)
# Exact rational arithmetic up to this many factors, log-space above it.
_EXACT_TERMS = 4096


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
  N = challenge_checks.check_count("N", N, 0)
  k = challenge_checks.check_count("k", k, 0, N)
  m = challenge_checks.check_count("m", m, 0, N)
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
  N = challenge_checks.check_count("N", N, 0)
  k = challenge_checks.check_count("k", k, 0, N)
  m = challenge_checks.check_count("m", m, 0, N)
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
  N = challenge_checks.check_count("N", N, 1)
  k = challenge_checks.check_count("k", k, 1, N)
  p = challenge_checks.check_prob(p)
  lo, hi = 1, N - k + 1  # P(hi) == 1.0 >= p; P is non-decreasing in m
  while lo < hi:
    mid = (lo + hi) // 2
    if detection_probability(N, k, mid) >= p:
      hi = mid
    else:
      lo = mid + 1
  return lo


def fmt_prob(p: float) -> str:
  """A probability as the guarantee text prints it."""
  if p >= 1.0:
    return "1"
  if p >= 0.9999:
    return f"{p:.6f}"
  return f"{p:.4f}"


def guarantee_lines(N: int, m: int, ks: Iterable[int] = DEFAULT_KS) -> list[tuple[int, float]]:
  """(k, P(detect)) for each k in ``ks`` that fits the population (1 <= k <= N)."""
  N = challenge_checks.check_count("N", N, 1)
  m = challenge_checks.check_count("m", m, 0, N)
  out = []
  for k in sorted(set(ks)):
    challenge_checks.check_count("k", k, 1)
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
    lines.append(f"  if at least {k} of the {N} cells were tampered, P(detect) >= {fmt_prob(prob)}")
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
  k = challenge_checks.check_count("k", k, 1, N)
  m = challenge_checks.check_count("m", m, M, N)
  if k > N - M:
    return 1.0  # the covering part cannot avoid all of them
  q = M / N
  rest = detection_probability(N - M, k, m - M)
  return min(1.0, q + (1.0 - q) * rest)

"""Tests for the challenge: hypergeometric math, strategies, derivation, JSON, the CLI.

Covers aftune/audit/{detection,challenge_checks,challenge_params,challenge,challenge_doc}.py
and experiments/challenge.py.
"""

import itertools
import json
import math
from fractions import Fraction

import blake3
import numpy as np
import pytest
from scipy import stats

from aftune.audit import challenge as C
from aftune.audit import challenge_checks
from aftune.audit import challenge_doc
from aftune.audit import detection
from aftune.crypto import hashing
from experiments import challenge as challenge_cli

ROOT0 = bytes(32)
JOB = bytes(range(32))
ROOT = bytes(range(100, 132))

# Literal vectors, also printed in docs/challenge.md.
VEC_SEED = "7861ec72e9307ad95be58dcf18070a4c89fd0f8f84f01824e7c70c8f2767de60"
VEC_WORDS = [6011670602664914131, 17705549117458965230, 2144476578482185058, 16310985494894445210]
VEC_UNIFORM = ((2, 0), (2, 1), (2, 2))
VEC_INPUT_ONLY = ((0, 1), (0, 3), (0, 4))
VEC_STRATIFIED = ((0, 3), (1, 2), (2, 4), (3, 0), (3, 1))
VEC_STRATIFIED_7 = ((0, 3), (1, 1), (1, 2), (2, 3), (2, 4), (3, 0), (3, 1))
VEC_NONCE_COMMITMENT = "4e247513682ddef3ff7ddb8f969f68a85cc489f8d18c7f28e1ce01ab6270afc7"


def draw(strategy="uniform", L=4, S=5, nonce=b"test", root=ROOT0, **kw):
  return C.draw_challenge(
    job_id=JOB,
    root=root,
    num_layer_blocks=L,
    num_step_blocks=S,
    strategy=strategy,
    nonce=nonce,
    **kw,
  )


# --------------------------------------------------------------------------
# A reimplementation written from docs/challenge.md only
# --------------------------------------------------------------------------


class DocStream:
  def __init__(self, root, nonce):
    lp = lambda b: len(b).to_bytes(8, "little") + b  # noqa: E731
    self.seed = blake3.blake3(lp(b"aftune/v1/challenge-seed") + root + nonce).digest()
    self.xof = blake3.blake3(lp(b"aftune/v1/challenge-stream") + self.seed)
    self.i = 0

  def word(self):
    w = self.xof.digest(length=8 * (self.i + 1))[8 * self.i :]
    self.i += 1
    return int.from_bytes(w, "little")

  def below(self, n):
    limit = 2**64 - (2**64 % n)
    while True:
      w = self.word()
      if w < limit:
        return w % n

  def sample(self, n, m):
    a = list(range(n))
    for i in range(m):
      j = i + self.below(n - i)
      a[i], a[j] = a[j], a[i]
    return a[:m]


def doc_draw(root, nonce, strategy, L, S, m):
  st = DocStream(root, nonce)
  N = L * S
  if strategy == "uniform":
    return tuple(sorted(divmod(i, S) for i in st.sample(N, m)))
  if strategy == "input_only":
    return tuple(sorted((0, s) for s in st.sample(S, m)))
  if strategy == "output_only":
    return tuple(sorted((L - 1, s) for s in st.sample(S, m)))
  assert strategy == "stratified"
  R, Cc = st.sample(L, L), st.sample(S, S)
  M = max(L, S)
  cover = {(R[i % L], Cc[i % S]) for i in range(M)}
  rest = [divmod(i, S) for i in range(N) if divmod(i, S) not in cover]
  extra = [rest[i] for i in st.sample(len(rest), m - M)]
  return tuple(sorted(cover | set(extra)))


# --------------------------------------------------------------------------
# Hypergeometric
# --------------------------------------------------------------------------


def brute_force(N, k, m):
  tampered = set(range(k))
  subsets = list(itertools.combinations(range(N), m))
  hit = sum(1 for s in subsets if tampered.intersection(s))
  return Fraction(hit, len(subsets))


def test_detection_probability_brute_force_small():
  for N in range(0, 9):
    for k in range(0, N + 1):
      for m in range(0, N + 1):
        want = brute_force(N, k, m)
        assert detection.detection_probability_exact(N, k, m) == want
        assert detection.detection_probability(N, k, m) == float(want), (N, k, m)


@pytest.mark.parametrize(
  "N,k,m",
  [
    (136, 68, 7),
    (136, 2, 27),
    (17, 2, 14),
    (136, 9, 27),
    (136, 1, 68),
    (1000, 3, 50),
    (5000, 10, 4999),
    (10**6, 7, 1000),
    (10**6, 5000, 5000),
    (10**6, 20000, 30),
    (200, 150, 60),
  ],
)
def test_detection_probability_matches_scipy(N, k, m):
  got = detection.detection_probability(N, k, m)
  # P(X >= 1) for X ~ hypergeometric(M=N, n=k, N=m).
  want = stats.hypergeom.sf(0, N, k, m)
  assert got == pytest.approx(want, rel=1e-10, abs=1e-15)
  if max(N, m) <= 5000:
    assert got == float(detection.detection_probability_exact(N, k, m))


def test_detection_probability_log_space_branch_accurate():
  # min(k, m) > 4096 takes the log-space branch; compare with exact ints.
  N, k, m = 20000, 5000, 4200
  exact = float(detection.detection_probability_exact(N, k, 4200))
  assert detection.detection_probability(N, k, m) == pytest.approx(exact, rel=1e-13)
  # Tiny probabilities keep relative accuracy (no 1 - (1 - eps) cancellation).
  p = detection.detection_probability(10**9, 1, 3)
  assert p == pytest.approx(3e-9, rel=1e-12)


def test_detection_probability_edges():
  assert detection.detection_probability(10, 0, 5) == 0.0
  assert detection.detection_probability(10, 3, 0) == 0.0
  assert detection.detection_probability(10, 6, 5) == 1.0  # k > N - m: pigeonhole
  assert detection.detection_probability(10, 5, 5) < 1.0
  assert detection.detection_probability(10, 10, 10) == 1.0
  for bad in [(10, 11, 1), (10, 1, 11), (-1, 0, 0), (10, -1, 2), (10, 1.0, 2), (10, True, 2)]:
    with pytest.raises(challenge_checks.ChallengeError):
      detection.detection_probability(*bad)


@pytest.mark.parametrize(
  "N,k,p",
  [
    (136, 1, 0.5),
    (136, 2, 0.95),
    (136, 9, 0.99),
    (20, 2, 0.9),
    (17, 2, 0.978),
    (1000, 10, 0.999),
    (50, 50, 1.0),
    (50, 1, 1.0),
    (7, 3, 1e-9),
    (10**5, 100, 0.99),
  ],
)
def test_cells_needed_is_minimal(N, k, p):
  m = detection.cells_needed(N, k, p)
  assert 1 <= m <= N - k + 1
  assert detection.detection_probability(N, k, m) >= p
  if m > 1:
    assert detection.detection_probability(N, k, m - 1) < p


def test_cells_needed_rejects_bad_input():
  for args in [
    (0, 1, 0.5),
    (10, 0, 0.5),
    (10, 11, 0.5),
    (10, 1, 0.0),
    (10, 1, 1.5),
    (10, 1, float("nan")),
    (10, 1, "0.9"),
  ]:
    with pytest.raises(challenge_checks.ChallengeError):
      detection.cells_needed(*args)


def test_guarantee_text():
  text = detection.guarantee_text(136, 27, ks=(1, 2, 500))
  assert "sampled 27 of 136 cells uniformly" in text
  assert "if at least 2 of the 136 cells were tampered, P(detect) >= 0.3588" in text
  assert "500" not in text  # k > N is dropped
  assert detection.guarantee_lines(20, 20, (1,)) == [(1, 1.0)]


def test_stratified_lower_bound():
  for L, S in [(4, 5), (5, 4), (3, 3), (1, 6), (6, 1)]:
    N, M = L * S, max(L, S)
    for m in range(M, N + 1):
      assert detection.stratified_lower_bound(L, S, m, 1) == pytest.approx(m / N)
      for k in range(1, N + 1):
        b = detection.stratified_lower_bound(L, S, m, k)
        assert 0 < b <= 1
  with pytest.raises(challenge_checks.ChallengeError):
    detection.stratified_lower_bound(4, 5, 4, 1)  # m < max(L, S)


# --------------------------------------------------------------------------
# Derivation and test vectors
# --------------------------------------------------------------------------


def test_test_vectors():
  assert C.challenge_seed(ROOT0, b"test").hex() == VEC_SEED
  st = C._Stream(bytes.fromhex(VEC_SEED))
  assert [st.word() for _ in range(4)] == VEC_WORDS
  assert draw("uniform", m=3).cells == VEC_UNIFORM
  assert draw("input_only", m=3).cells == VEC_INPUT_ONLY
  assert draw("stratified").cells == VEC_STRATIFIED
  assert draw("stratified", m=7).cells == VEC_STRATIFIED_7
  assert C.nonce_commitment(b"test").hex() == VEC_NONCE_COMMITMENT


def test_docs_print_the_vectors():
  import pathlib

  doc = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "challenge.md").read_text()
  for v in (VEC_SEED, VEC_NONCE_COMMITMENT, str(VEC_WORDS[0])):
    assert v in doc
  for cells in (VEC_UNIFORM, VEC_INPUT_ONLY, VEC_STRATIFIED, VEC_STRATIFIED_7):
    assert json.dumps([list(c) for c in cells]) in doc


def test_doc_reimplementation_agrees():
  ds = DocStream(ROOT0, b"test")
  assert ds.seed.hex() == VEC_SEED
  assert [ds.word() for _ in range(4)] == VEC_WORDS
  for i in range(40):
    nonce = i.to_bytes(2, "little")
    root = hashing.hash_bytes(b"test/root", nonce)
    for strategy, L, S, m in [
      ("uniform", 4, 5, 3),
      ("uniform", 7, 3, 21),
      ("input_only", 3, 9, 4),
      ("output_only", 3, 9, 9),
      ("stratified", 4, 6, 6),
      ("stratified", 7, 2, 11),
      ("stratified", 1, 5, 5),
    ]:
      c = draw(strategy, L=L, S=S, m=m, nonce=nonce, root=root)
      assert c.cells == doc_draw(root, nonce, strategy, L, S, m), (strategy, i)


def test_stream_reads_across_buffer_boundaries():
  seed = bytes(32)
  st = C._Stream(seed)
  words = [st.word() for _ in range(200)]  # > 3 buffer refills
  raw = blake3.blake3(
    len(C.TAG_CHALLENGE_STREAM).to_bytes(8, "little") + C.TAG_CHALLENGE_STREAM + seed
  ).digest(length=1600)
  assert words == [int.from_bytes(raw[8 * i : 8 * i + 8], "little") for i in range(200)]


def test_below_rejects_biased_words():
  class Fixed(C._Stream):
    def __init__(self, words):
      self.words = list(words)

    def word(self):
      return self.words.pop(0)

  n = 3
  limit = 2**64 - (2**64 % n)  # 2**64 - 1: the word 2**64 - 1 is rejected
  st = Fixed([limit, limit - 1])
  assert st.below(n) == (limit - 1) % n
  assert st.words == []
  st = Fixed([2**64 - 1, 5])
  assert st.below(2**63 + 1) == 5  # more than half the words rejected


def test_derivation_deterministic_and_sensitive():
  a = draw("uniform", L=8, S=17, m=27, root=ROOT, nonce=b"n1")
  assert draw("uniform", L=8, S=17, m=27, root=ROOT, nonce=b"n1") == a
  assert draw("uniform", L=8, S=17, m=27, root=ROOT, nonce=b"n2").cells != a.cells
  other_root = bytes([1]) + ROOT[1:]
  assert draw("uniform", L=8, S=17, m=27, root=other_root, nonce=b"n1").cells != a.cells
  assert C.challenge_seed(ROOT, b"n1") != C.challenge_seed(ROOT, b"n1\x00")


def test_fresh_nonce_by_default():
  a = C.draw_challenge(
    job_id=JOB, root=ROOT, num_layer_blocks=8, num_step_blocks=17, strategy="uniform", m=20
  )
  b = C.draw_challenge(
    job_id=JOB, root=ROOT, num_layer_blocks=8, num_step_blocks=17, strategy="uniform", m=20
  )
  assert len(bytes.fromhex(a.nonce)) == 32 and a.nonce != b.nonce
  C.verify_challenge_derivation(a)


# --------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------


def check_valid(c):
  L, S = c.num_layer_blocks, c.num_step_blocks
  assert list(c.cells) == sorted(set(c.cells))
  for lb, sb in c.cells:
    assert type(lb) is int and type(sb) is int
    assert 0 <= lb < L and 0 <= sb < S


@pytest.mark.parametrize("L,S", [(1, 1), (1, 7), (7, 1), (4, 5), (8, 17), (35, 3)])
def test_every_strategy_valid(L, S):
  N = L * S
  for i in range(5):
    nonce = bytes([i])
    for m in sorted({1, min(2, N), N // 2 or 1, N}):
      c = draw("uniform", L=L, S=S, m=m, nonce=nonce)
      check_valid(c)
      assert len(c.cells) == m
    for m in sorted({1, S // 2 or 1, S}):
      c = draw("input_only", L=L, S=S, m=m, nonce=nonce)
      check_valid(c)
      assert len(c.cells) == m and all(lb == 0 for lb, _ in c.cells)
      c = draw("output_only", L=L, S=S, m=m, nonce=nonce)
      check_valid(c)
      assert len(c.cells) == m and all(lb == L - 1 for lb, _ in c.cells)
    for m in sorted({max(L, S), (max(L, S) + N) // 2, N}):
      c = draw("stratified", L=L, S=S, m=m, nonce=nonce)
      check_valid(c)
      assert len(c.cells) == m
      assert {lb for lb, _ in c.cells} == set(range(L))
      assert {sb for _, sb in c.cells} == set(range(S))
    c = draw("guarantee", L=L, S=S, k=1, p=0.5, nonce=nonce)
    check_valid(c)
    assert len(c.cells) == detection.cells_needed(N, 1, 0.5)


def test_stratified_minimal_is_one_per_row_or_column():
  for L, S in [(4, 5), (5, 4), (6, 6)]:
    c = draw("stratified", L=L, S=S)
    assert len(c.cells) == max(L, S)
    rows = [lb for lb, _ in c.cells]
    cols = [sb for _, sb in c.cells]
    if L >= S:
      assert sorted(rows) == list(range(L))
    if S >= L:
      assert sorted(cols) == list(range(S))


def test_guarantee_strategy_reaches_target():
  c = draw("guarantee", L=8, S=17, k=2, p=0.95)
  m = detection.cells_needed(136, 2, 0.95)
  assert c.params == {"k": 2, "m": m, "p": 0.95}
  assert len(c.cells) == m
  g = c.guarantee()
  assert g["bound"] == "exact" and g["population_size"] == 136
  by_k = {d["k"]: d["p"] for d in g["detect"]}
  assert by_k[2] >= 0.95 and by_k[1] == pytest.approx(m / 136)
  assert "target: k=2, p=0.95" in g["text"]


def test_input_only_target_over_its_block():
  c = draw("input_only", L=8, S=17, k=2, p=0.97)
  assert c.params["m"] == detection.cells_needed(17, 2, 0.97) == 14
  g = c.guarantee()
  assert g["population_size"] == 17 and g["population"].startswith("layer block 0")
  assert "not detected by this challenge" in g["text"]


def test_guarantee_statement_uniform():
  c = draw("uniform", L=8, S=17, m=27)
  g = c.guarantee(ks=(9,))
  assert [d["k"] for d in g["detect"]] == [1, 2, 5, 9, 10]
  assert {d["k"]: d["p"] for d in g["detect"]}[2] == detection.detection_probability(136, 2, 27)
  assert "if at least 1 of the 136 cells were tampered, P(detect) >= 0.1985" in g["text"]


def test_stratified_guarantee_is_a_lower_bound():
  # Exhaustive over tampered pairs on a small grid, Monte Carlo over draws:
  # the worst pair must not be caught less often than the stated bound.
  L, S, m = 3, 4, 6
  N = L * S
  draws = [
    set(draw("stratified", L=L, S=S, m=m, nonce=i.to_bytes(2, "little")).cells) for i in range(1500)
  ]
  bound = detection.stratified_lower_bound(L, S, m, 2)
  cells = [(a, b) for a in range(L) for b in range(S)]
  worst = min(
    sum(1 for d in draws if x in d or y in d) / len(draws)
    for x, y in itertools.combinations(cells, 2)
  )
  assert worst >= bound - 4 * math.sqrt(bound * (1 - bound) / len(draws))
  assert detection.stratified_lower_bound(L, S, m, 1) == pytest.approx(m / N)


def test_uniform_draws_hit_every_cell_equally():
  L, S, m, n = 4, 5, 3, 2000
  counts = np.zeros((L, S))
  for i in range(n):
    for lb, sb in draw("uniform", L=L, S=S, m=m, nonce=i.to_bytes(4, "little")).cells:
      counts[lb, sb] += 1
  expected = n * m / (L * S)
  chi2 = ((counts - expected) ** 2 / expected).sum()
  assert stats.chi2.sf(chi2, L * S - 1) > 1e-4
  # Stratified: every cell equally likely too (marginal max(L,S)/N for m = max(L,S)).
  counts = np.zeros((L, S))
  for i in range(n):
    for lb, sb in draw("stratified", L=L, S=S, nonce=i.to_bytes(4, "little")).cells:
      counts[lb, sb] += 1
  expected = n * max(L, S) / (L * S)
  chi2 = ((counts - expected) ** 2 / expected).sum()
  assert stats.chi2.sf(chi2, L * S - 1) > 1e-4


# --------------------------------------------------------------------------
# Bad arguments
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
  "kw,msg",
  [
    (dict(strategy="random", m=3), "unknown strategy"),
    (dict(strategy="uniform"), "needs m"),
    (dict(strategy="uniform", m=0), "m must be"),
    (dict(strategy="uniform", m=21), "exceeds the 20 cells of the grid"),
    (dict(strategy="uniform", m=3, k=1, p=0.5), "takes m only"),
    (dict(strategy="uniform", m=2.0), "must be an integer"),
    (dict(strategy="input_only", m=6), "exceeds the 5 cells of the layer block"),
    (dict(strategy="input_only"), "give m, or (k, p)"),
    (dict(strategy="output_only", m=2, k=1, p=0.5), "give m, or (k, p)"),
    (dict(strategy="output_only", k=1), "give both k and p"),
    (dict(strategy="stratified", m=4), "need m >= max(L, S) = 5"),
    (dict(strategy="stratified", m=21), "exceeds"),
    (dict(strategy="guarantee", k=2), "give both k and p"),
    (dict(strategy="guarantee", m=3), "needs k"),
    (dict(strategy="guarantee", k=2, p=0.9, m=3), "do not give it"),
    (dict(strategy="guarantee", k=21, p=0.9), "k must be in [1, 20]"),
    (dict(strategy="guarantee", k=2, p=1.1), "p must be in (0, 1]"),
    (dict(strategy="guarantee", k=2, p=0), "p must be in (0, 1]"),
    (dict(strategy="uniform", m=3, L=0), "num_layer_blocks"),
    (dict(strategy="uniform", m=3, S=-2), "num_step_blocks"),
    (dict(strategy="uniform", m=3, root=bytes(31)), "root must be 32 bytes"),
    (dict(strategy="uniform", m=3, root="00" * 32), "root must be bytes"),
    (dict(strategy="uniform", m=3, nonce="abc"), "nonce must be bytes"),
    (dict(strategy="uniform", m=3, nonce=bytes(1025)), "at most 1024"),
  ],
)
def test_draw_rejects(kw, msg):
  with pytest.raises(challenge_checks.ChallengeError) as e:
    draw(**kw)
  assert msg in str(e.value)


def test_draw_rejects_bad_job_id():
  with pytest.raises(challenge_checks.ChallengeError, match="job_id must be 32 bytes"):
    C.draw_challenge(
      job_id=b"x", root=ROOT, num_layer_blocks=2, num_step_blocks=2, strategy="uniform", m=1
    )


# --------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
  "kw",
  [
    dict(strategy="uniform", m=27),
    dict(strategy="input_only", m=14),
    dict(strategy="output_only", k=2, p=0.9),
    dict(strategy="stratified", m=30),
    dict(strategy="guarantee", k=3, p=0.99),
  ],
)
def test_json_round_trip(tmp_path, kw):
  c = draw(L=8, S=17, root=ROOT, **kw)
  doc = c.to_json()
  assert doc["format"] == "aftune/challenge" and doc["version"] == 1
  assert challenge_doc.Challenge.from_json(doc) == c
  assert challenge_doc.Challenge.from_json(json.dumps(doc)) == c
  assert challenge_doc.Challenge.from_json(hashing.canonical_json_bytes(doc)) == c
  path = tmp_path / "challenge.json"
  challenge_doc.save_challenge(c, path)
  loaded = challenge_doc.load_challenge(path)
  assert loaded == c and loaded.digest() == c.digest()
  C.verify_challenge_derivation(loaded)


def test_explicit_challenge():
  c = C.explicit_challenge(
    job_id=JOB, root=ROOT, num_layer_blocks=4, num_step_blocks=5, cells=[(3, 1), (0, 2)]
  )
  assert c.cells == ((0, 2), (3, 1)) and not c.derived
  assert challenge_doc.Challenge.from_json(c.to_json()) == c
  assert c.guarantee()["bound"] == "none"
  with pytest.raises(challenge_checks.ChallengeError, match="not derived"):
    C.verify_challenge_derivation(c)
  with pytest.raises(challenge_checks.ChallengeError, match="twice"):
    C.explicit_challenge(
      job_id=JOB, root=ROOT, num_layer_blocks=4, num_step_blocks=5, cells=[(0, 1), (0, 1)]
    )
  with pytest.raises(challenge_checks.ChallengeError, match="outside the 4x5 grid"):
    C.explicit_challenge(
      job_id=JOB, root=ROOT, num_layer_blocks=4, num_step_blocks=5, cells=[(4, 1)]
    )


def mutate(doc, path, value):
  doc = json.loads(json.dumps(doc))
  target = doc
  for key in path[:-1]:
    target = target[key]
  if value is KeyError:
    del target[path[-1]]
  else:
    target[path[-1]] = value
  return doc


BAD_DOCS = [
  (("version",), 2, "unsupported challenge version 2"),
  (("version",), True, "unsupported challenge version"),
  (("format",), "aftune/bundle", "not a challenge"),
  (("extra",), 1, "unknown fields: extra"),
  (("nonce",), KeyError, "missing fields: nonce"),
  (("root",), "00" * 31, "root must be 32-byte hex"),
  (("root",), "zz" * 32, "root is not hex"),
  (("root",), "AB" * 32, "lower-case"),
  (("job_id",), "00" * 33, "job_id must be 32-byte hex"),
  (("job_id",), 5, "job_id must be a hex string"),
  (("nonce",), "0", "nonce is not hex"),
  (("cells", 0), [8, 0], "outside the 8x17 grid (layer block must be in [0, 7])"),
  (("cells", 0), [0, 17], "outside the 8x17 grid (step block must be in [0, 16])"),
  (("cells", 0), [-1, 0], "outside the 8x17 grid"),
  (("cells", 0), [0, 1, 2], "must be [layer_block, step_block]"),
  (("cells", 0), [0.0, 1], "must be an integer"),
  (("cells", 0), [True, 1], "must be an integer"),
  (("cells",), [], "at least one cell"),
  (("cells",), "0,1", "cells must be a list"),
  (("grid", "num_layer_blocks"), 0, "num_layer_blocks must be >= 1"),
  (("grid", "extra"), 1, "grid must be"),
  (("strategy",), "psychic", "unknown strategy"),
  (("params", "m"), 6, "m=6 but the challenge lists 5 cells"),
  (("params", "m"), True, "params.m must be an integer"),
  (("params", "k"), 2, "params for 'uniform' must be"),
  (("guarantee", "detect", 0, "p"), 0.9, "claims P=0.9"),
  (("guarantee", "sampled"), 99, "guarantee.sampled"),
  (("guarantee",), KeyError, "missing fields: guarantee"),
]


@pytest.mark.parametrize("path,value,msg", BAD_DOCS)
def test_from_json_rejects(tmp_path, path, value, msg):
  doc = draw("uniform", L=8, S=17, m=5, root=ROOT).to_json()
  bad = mutate(doc, path, value)
  with pytest.raises(challenge_checks.ChallengeError) as e:
    challenge_doc.Challenge.from_json(bad)
  assert msg in str(e.value)
  f = tmp_path / "bad.json"
  f.write_text(json.dumps(bad))
  with pytest.raises(challenge_checks.ChallengeError) as e:
    challenge_doc.load_challenge(f)
  assert str(e.value).startswith(f"{f}: ") and msg in str(e.value)


def test_from_json_rejects_duplicate_and_unsorted_cells():
  doc = draw("uniform", L=8, S=17, m=5, root=ROOT).to_json()
  dup = mutate(doc, ("cells", 1), doc["cells"][0])
  with pytest.raises(challenge_checks.ChallengeError, match="duplicate"):
    challenge_doc.Challenge.from_json(dup)
  unsorted = mutate(doc, ("cells",), doc["cells"][::-1])
  with pytest.raises(challenge_checks.ChallengeError, match="sorted"):
    challenge_doc.Challenge.from_json(unsorted)


def test_from_json_rejects_strategy_violations():
  doc = draw("input_only", L=8, S=17, m=3, root=ROOT).to_json()
  bad = mutate(doc, ("cells", 2), [1, 16])
  with pytest.raises(challenge_checks.ChallengeError, match="not in layer block 0"):
    challenge_doc.Challenge.from_json(bad)
  doc = draw("stratified", L=4, S=5, root=ROOT).to_json()
  bad = mutate(doc, ("cells",), [[0, 0], [0, 1], [1, 2], [2, 3], [3, 3]])
  with pytest.raises(challenge_checks.ChallengeError, match="do not cover"):
    challenge_doc.Challenge.from_json(bad)
  doc = draw("guarantee", L=4, S=5, k=2, p=0.9, root=ROOT).to_json()
  bad = mutate(doc, ("params", "p"), 0.5)
  with pytest.raises(challenge_checks.ChallengeError, match="needs m="):
    challenge_doc.Challenge.from_json(bad)


def test_load_challenge_file_errors(tmp_path):
  with pytest.raises(challenge_checks.ChallengeError, match="missing.json: cannot read"):
    challenge_doc.load_challenge(tmp_path / "missing.json")
  cases = {
    "notjson.json": (b"{", "invalid JSON"),
    "nan.json": (b'{"a": NaN}', "NaN is not valid JSON"),
    "dup.json": (b'{"a": 1, "a": 2}', "duplicate JSON key 'a'"),
    "latin1.json": (b'{"a": "\xe9"}', "not UTF-8"),
    "list.json": (b"[]", "must be a JSON object"),
  }
  for name, (raw, msg) in cases.items():
    f = tmp_path / name
    f.write_bytes(raw)
    with pytest.raises(challenge_checks.ChallengeError) as e:
      challenge_doc.load_challenge(f)
    assert str(e.value).startswith(f"{f}: ") and msg in str(e.value), str(e.value)


def test_verify_derivation_catches_cherry_picking():
  c = draw("uniform", L=8, S=17, m=5, root=ROOT, nonce=b"client")
  C.verify_challenge_derivation(c)
  doc = c.to_json()
  free = next((a, b) for a in range(8) for b in range(17) if (a, b) not in c.cells)
  cells = sorted([list(x) for x in c.cells[1:]] + [list(free)])
  picked = challenge_doc.Challenge.from_json(mutate(doc, ("cells",), cells))  # structurally valid
  with pytest.raises(challenge_checks.ChallengeError, match="do not follow from"):
    C.verify_challenge_derivation(picked)
  other_nonce = challenge_doc.Challenge.from_json(mutate(doc, ("nonce",), b"other".hex()))
  with pytest.raises(challenge_checks.ChallengeError, match="do not follow from"):
    C.verify_challenge_derivation(other_nonce)
  other_root = challenge_doc.Challenge.from_json(mutate(doc, ("root",), "11" * 32))
  with pytest.raises(challenge_checks.ChallengeError, match="do not follow from"):
    C.verify_challenge_derivation(other_root)


def test_verify_derivation_nonce_commitment():
  c = draw("uniform", L=8, S=17, m=5, root=ROOT, nonce=b"client")
  C.verify_challenge_derivation(c, expected_nonce_commitment=C.nonce_commitment(b"client"))
  with pytest.raises(challenge_checks.ChallengeError, match="nonce commitment"):
    C.verify_challenge_derivation(c, expected_nonce_commitment=C.nonce_commitment(b"x"))


def test_cli(tmp_path, capsys):
  out = tmp_path / "c.json"
  rc = challenge_cli.main(
    [
      "draw",
      "--job-id",
      JOB.hex(),
      "--root",
      ROOT.hex(),
      "--layer-blocks",
      "8",
      "--step-blocks",
      "17",
      "--strategy",
      "guarantee",
      "--k",
      "2",
      "--p",
      "0.9",
      "--nonce",
      "74657374",
      "--out",
      str(out),
    ]
  )
  assert rc == 0
  assert challenge_cli.main(["show", str(out)]) == 0
  commitment = C.nonce_commitment(b"test").hex()
  assert challenge_cli.main(["verify", str(out), "--nonce-commitment", commitment]) == 0
  assert "follow from (root, nonce)" in capsys.readouterr().out
  doc = json.loads(out.read_text())
  doc["cells"][0] = [7, 16] if doc["cells"][-1] != [7, 16] else [7, 15]
  doc["cells"].sort()
  out.write_text(json.dumps(doc))
  assert challenge_cli.main(["verify", str(out)]) == 1
  assert "error:" in capsys.readouterr().err


def test_paper_table_reproduced():
  from paper_figures import detection_table as T

  rows = T.rows()
  paper_rows = [r for r in rows if r.paper is not None]
  assert len(paper_rows) == 5
  for r in paper_rows:
    assert r.reproduced, r
  assert "replace all layers" in T.markdown(rows)

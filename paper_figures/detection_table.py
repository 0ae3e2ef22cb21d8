"""Reproduces the detection-probability table of AFTUNE (arXiv 2603.07466).

The paper reports, for N = 136 audit cells and m = round(pi * N) cells sampled
without replacement, P(detect) = 1 - C(N-k, m) / C(N, m):

  skipping 50% of steps         pi=5%   99.3%
  10% data poisoning, uniform   pi=20%  35.9%
  10% data poisoning, input-only pi=10% 97.8%
  replacing all layers (B_L=4)  pi=20%  87.3%
  modifying 10% of parameters   pi=50%  50.0%

This script finds the (population, k, m) behind each number, recomputes it
with ``aftune.audit.detection.detection_probability``, prints the table, writes
``paper_figures/out/detection_table.md`` and plots P(detect) against the
sampling rate (``paper_figures/out/detection_curves.png``).

Interpretation (the only one found that reproduces every number):

- The grid is L = 8 layer blocks x S = 17 step blocks = 136 cells: Llama-3.1-8B's
  32 decoder layers at B_L = 4 give 8 layer blocks, and 2048 samples / batch 16
  = 128 steps at B_S = 8 give 16 step blocks, plus one for the final state
  (17 step-block boundaries). Only this split makes the input-only row work:
  the first layer block must hold 17 cells.
- The sampling budget is always m = round(pi * 136), also for input-only
  sampling, which spends those m cells inside the first layer block.
- Skipping 50% of steps taints every layer block of half the step blocks:
  k = N / 2 = 68 (half of 17 step blocks is not whole: 8 or 9 step blocks x 8
  layer blocks = 64 or 72 cells give 99.0% / 99.6%).
- Poisoning 10% of the data taints 10% of the steps, visible only in the input
  layer block: k = round(0.1 * 17) = 2 cells, all in layer block 0.
- Replacing all layers after training leaves one inconsistent cell per layer
  block (its final state): k = 9 = ceil(35 / 4), Llama-3.1-8B's 35 units
  (embedding, 32 layers, norm, head) at B_L = 4. This is the only k that gives
  87.3%, and it does not agree with the 8-layer-block grid above, for which
  k = 8 gives 83.9%: the paper seems to count 9 layer blocks here and 8 in N.
- Modifying 10% of the parameters touches one layer block (4 of 32 decoder
  layers is ~11% of the weights), i.e. one final-state cell: k = 1.

Run: ``PYTHONPATH=. .venv/bin/python paper_figures/detection_table.py``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `aftune` importable
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aftune.audit import detection  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
N_PAPER = 136
LAYER_BLOCKS = 8
STEP_BLOCKS = 17


@dataclasses.dataclass(frozen=True)
class Row:
  scenario: str
  sampling: str
  pi: float
  population: int  # cells the sample is drawn from
  k: int  # tampered cells inside that population
  paper: float | None  # the paper's number (None: our extra row)
  note: str
  budget_of: int = N_PAPER  # m = round(pi * budget_of)

  @property
  def m(self) -> int:
    # m = round(pi * N) over the whole grid, as in the paper; Python's
    # round-half-even never matters here (no pi * n ends in .5).
    return min(round(self.pi * self.budget_of), self.population)

  @property
  def pi_text(self) -> str:
    of = "" if self.budget_of == N_PAPER else f" of {self.budget_of}"
    return f"{100 * self.pi:.3g}%{of}"

  @property
  def ours(self) -> float:
    return detection.detection_probability(self.population, self.k, self.m)

  @property
  def reproduced(self) -> bool | None:
    if self.paper is None:
      return None
    return round(100 * self.ours, 1) == round(100 * self.paper, 1)


def rows() -> list[Row]:
  """The paper's rows (with our interpretation) and grid-consistent variants."""
  N, L, S = N_PAPER, LAYER_BLOCKS, STEP_BLOCKS
  return [
    Row(
      "skip 50% of steps",
      "uniform",
      0.05,
      N,
      N // 2,
      0.993,
      "k = N/2 = 68 cells (all layer blocks of half the step blocks)",
    ),
    Row(
      "  variant: 8 of 17 step blocks skipped",
      "uniform",
      0.05,
      N,
      8 * L,
      None,
      "k = 8 x 8 = 64, a whole number of step blocks",
    ),
    Row(
      "  variant: 9 of 17 step blocks skipped", "uniform", 0.05, N, 9 * L, None, "k = 9 x 8 = 72"
    ),
    Row(
      "10% data poisoning",
      "uniform",
      0.20,
      N,
      round(0.1 * S),
      0.359,
      "k = round(0.1 x 17) = 2 step blocks, only layer block 0 is tampered",
    ),
    Row(
      "10% data poisoning",
      "input-only",
      0.10,
      S,
      round(0.1 * S),
      0.978,
      "m = round(0.1 x 136) = 14 of layer block 0's 17 cells, k = 2",
    ),
    Row(
      "  variant: input-only, pi of the block",
      "input-only",
      0.10,
      S,
      round(0.1 * S),
      None,
      "m = round(0.1 x 17) = 2 of 17 cells (pi over the block)",
      budget_of=S,
    ),
    Row(
      "replace all layers (B_L=4)",
      "uniform",
      0.20,
      N,
      9,
      0.873,
      "k = 9 = ceil(35 units / 4): one final-state cell per layer block",
    ),
    Row(
      "  variant: 8 layer blocks (as in N)",
      "uniform",
      0.20,
      N,
      L,
      None,
      "k = 8, consistent with the 8 x 17 grid",
    ),
    Row(
      "modify 10% of parameters",
      "uniform",
      0.50,
      N,
      1,
      0.500,
      "k = 1: one layer block (~11% of the weights), its final-state cell",
    ),
  ]


def markdown(table: list[Row]) -> str:
  lines = [
    "# AFTUNE detection table, reproduced",
    "",
    f"P(detect) = 1 - C(n-k, m) / C(n, m) (`aftune.audit.detection.detection_probability`), "
    f"m = round(pi x {N_PAPER}); grid {LAYER_BLOCKS} layer blocks x {STEP_BLOCKS} step "
    f"blocks = {N_PAPER} cells; n = the cells the sample is drawn from "
    f"({N_PAPER}, or {STEP_BLOCKS} for input-only). Rows marked 'variant' are not in the "
    "paper: they show the grid-consistent alternatives.",
    "",
    "| scenario | sampling | pi | n | k | m | paper | ours | reproduced | interpretation |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in table:
    paper = "" if r.paper is None else f"{100 * r.paper:.1f}%"
    rep = {None: "", True: "yes", False: "**no**"}[r.reproduced]
    lines.append(
      f"| {r.scenario.strip()} | {r.sampling} | {r.pi_text} | {r.population} | "
      f"{r.k} | {r.m} | {paper} | {100 * r.ours:.2f}% | {rep} | {r.note} |"
    )
  lines += [
    "",
    "Every paper number is reproduced to the printed digit under this interpretation. The",
    "one inconsistency is 'replace all layers': 87.3% needs k = 9 (Llama-3.1-8B's 35 units",
    "at B_L = 4 make 9 layer blocks), while N = 136 and the input-only row need 8 layer",
    "blocks x 17 step blocks; with k = 8 the same budget catches it 83.9% of the time.",
    "",
  ]
  return "\n".join(lines)


def plot(path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  N = N_PAPER
  ms = list(range(0, N + 1))
  fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=130)
  for k in (1, 2, 5, 9, 17, 68):
    ps = [detection.detection_probability(N, k, m) for m in ms]
    ax.plot([m / N for m in ms], ps, label=f"k = {k}")
  S = STEP_BLOCKS
  ax.plot(
    [m / N for m in ms],
    [detection.detection_probability(S, 2, min(m, S)) for m in ms],
    "k--",
    lw=1,
    label="k = 2, input-only",
  )
  for r in rows():
    if r.paper is not None:
      ax.plot(round(r.pi * N) / N, r.paper, "kx", ms=7)
  ax.set_xlabel(
    f"sampling rate pi = m / N  (N = {N} cells; input-only: m of layer block 0's {S})", fontsize=9
  )
  ax.set_ylabel("P(detect)  (at least k cells tampered)")
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1.01)
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right", title="tampered cells")
  ax.set_title("Hypergeometric detection probability (x: the paper's rows)", fontsize=10)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def main() -> int:
  table = rows()
  head = f"{'scenario':40s} {'sampling':10s} {'pi':>9s} {'n':>4s} {'k':>3s} {'m':>3s} {'paper':>7s} {'ours':>8s}"
  print(head)
  print("-" * len(head))
  for r in table:
    paper = "" if r.paper is None else f"{100 * r.paper:.1f}%"
    mark = {None: "", True: "", False: "  MISMATCH"}[r.reproduced]
    print(
      f"{r.scenario:40s} {r.sampling:10s} {r.pi_text:>9s} {r.population:4d} {r.k:3d} {r.m:3d} "
      f"{paper:>7s} {100 * r.ours:7.2f}%{mark}"
    )
  os.makedirs(OUT, exist_ok=True)
  (OUT / "detection_table.md").write_text(markdown(table), encoding="utf-8")
  plot(OUT / "detection_curves.png")
  print(f"wrote {OUT / 'detection_table.md'} and {OUT / 'detection_curves.png'}")
  return 0 if all(r.reproduced is not False for r in table) else 1


if __name__ == "__main__":
  sys.exit(main())

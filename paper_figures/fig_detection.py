"""Figure 4: detection probability vs sampling rate, computed and measured.

Left: P(detect) = 1 - C(N-k, m) / C(N, m) (`aftune.audit.detection.detection_probability`)
on the paper's grid (N = 136 cells, paper_figures/detection_table.py) for k tampered cells,
k from the sheet's `detection_ks` (2..64). Right: the attack suite
(`experiments.attack_eval`, the sheet's `attacks`): each dishonest provider trained for
real, every cell verified, many uniform challenges drawn; a point is the fraction of draws
that caught it, with its 95% Wilson interval, at the fraction m/N of cells drawn; the
lines are the same formula on the suite's grid for each attack's footprint k.

  python -m paper_figures.make_all --scale small --out paper_figures/out --only detection

Writes fig4_detection.png and fig4_detection.csv (column `kind`: computed, measured).
"""

from __future__ import annotations

from pathlib import Path

from aftune.audit import detection
from paper_figures import detection_table
from paper_figures import results as res

NAME = "fig4_detection"
EXPERIMENTS = ("attacks",)
COLUMNS = ("kind", "grid", "attack", "strength", "strategy", "rate", "N", "k", "m", "sampled_fraction",
           "p_detect", "measured", "ci_low", "ci_high", "draws", "predicted", "misses")


def table(results: Path) -> list[res.Row]:
  measured = res.read_point(results / "attacks" / "detection.jsonl")
  if measured is None:
    raise res.ResultsError(f"{results / 'attacks' / 'detection.jsonl'}: missing (run make_all)")
  ks = [int(k) for k in res.run_sheet(results)["sheet"]["detection_ks"]]
  out = []
  n_paper = detection_table.N_PAPER
  for k in ks:
    for m in range(0, n_paper + 1):
      out.append({"kind": "computed", "grid": "paper", "N": n_paper, "k": k, "m": m,
                  "sampled_fraction": m / n_paper,
                  "p_detect": detection.detection_probability(n_paper, k, m)})
  uniform = [r for r in measured if r["strategy"] == "uniform"]
  for r in uniform:
    out.append({**r, "kind": "measured", "grid": "suite", "sampled_fraction": r["m"] / r["N"]})
  for n, k in sorted({(int(r["N"]), int(r["k"])) for r in uniform}):
    for m in range(0, n + 1):
      out.append({"kind": "computed", "grid": "suite", "N": n, "k": k, "m": m,
                  "sampled_fraction": m / n, "p_detect": detection.detection_probability(n, k, m)})
  return out


def make(out: Path) -> list[Path]:
  results = out / "results"
  rows = table(results)
  csv_path, png = out / f"{NAME}.csv", out / f"{NAME}.png"
  res.write_csv(csv_path, rows, COLUMNS)
  plt = res.pyplot()
  fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.6))
  paper = [r for r in rows if r["kind"] == "computed" and r["grid"] == "paper"]
  for k in sorted({r["k"] for r in paper}):
    rs = [r for r in paper if r["k"] == k]
    a.plot([100 * r["sampled_fraction"] for r in rs], [r["p_detect"] for r in rs], label=f"k = {k}")
  a.set_title(f"computed, the paper's grid (N = {detection_table.N_PAPER} cells)")
  a.legend(title="tampered cells", loc="lower right")
  suite = [r for r in rows if r["kind"] == "computed" and r["grid"] == "suite"]
  meas = [r for r in rows if r["kind"] == "measured"]
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  markers = ("o", "s", "^", "v", "D", "P", "X", "*")
  ks = sorted({r["k"] for r in meas})
  for ci, k in enumerate(ks):  # one colour per footprint size: its curve and its attacks
    color = colors[ci % len(colors)]
    rs_k = [r for r in meas if r["k"] == k]
    curve = [r for r in suite if r["k"] == k and r["N"] == rs_k[0]["N"]]
    b.plot([100 * r["sampled_fraction"] for r in curve], [r["p_detect"] for r in curve],
           color=color, lw=1, alpha=0.7)
    attacks = sorted({(r["attack"], r["strength"]) for r in rs_k})
    for mi, (name, strength) in enumerate(attacks):
      rs = sorted([r for r in rs_k if (r["attack"], r["strength"]) == (name, strength)],
                  key=lambda r: r["m"])
      x = [100 * r["sampled_fraction"] for r in rs]
      y = [r["measured"] for r in rs]
      b.errorbar(x, y, yerr=[[yy - r["ci_low"] for yy, r in zip(y, rs)],
                             [r["ci_high"] - yy for yy, r in zip(y, rs)]],
                 fmt=markers[mi % len(markers)], color=color, capsize=3, ms=4,
                 label=f"k={k}: {name} {strength}")
  if meas:
    b.set_xlim(0, min(100, 2 * max(100 * r["sampled_fraction"] for r in meas)))
  n_suite = meas[0]["N"] if meas else 0
  b.set_title(f"measured, the attack suite's grid (N = {n_suite} cells, uniform draws)")
  b.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7,
           title="attack (colour: its footprint k;\nline: computed for that k)", title_fontsize=7)
  a.set_xlim(0, 100)
  for ax in (a, b):
    ax.set_xlabel("sampling rate m / N (% of cells drawn)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
  a.set_ylabel("P(detect)")
  fig.suptitle("Detection probability vs sampling rate (bars: 95% Wilson intervals; "
               + res.provenance_note(results) + ")", fontsize=9)
  fig.tight_layout()
  res.save(fig, png)
  plt.close(fig)
  return [png, csv_path]


if __name__ == "__main__":
  res.figure_main(make)

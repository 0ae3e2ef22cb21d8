"""Figure 3: what an audit costs. Verification time per cell vs B_S and B_L; the audit's
cost (verifier and provider) vs the sampling rate; the provider's regeneration cost when
I_C > 1 or I_A > 1.

Every number comes from `aftune.bench.verify.bench_verify` runs of the language model: a few
step blocks recorded, every cell opened by the provider and verified by the real verifier
(median over the warm cells, step block > 0). The audit cost at sampling rate r is
r x N cells x the measured mean time per cell, over the training time of the whole run
(N x its measured step time); the provider's side is the same with its opening time,
which includes regenerating by replay what was not stored (I_C > 1: the start state;
I_A > 1: the boundaries of the blocks in between).

  python -m paper_figures.make_all --scale small --out paper_figures/out --only verify

Writes fig3_verify.png and fig3_verify.csv (column `panel`: cell_time, audit_cost,
regeneration).
"""

from __future__ import annotations

import math
from pathlib import Path

from paper_figures import results as res

NAME = "fig3_verify"
EXPERIMENTS = ("verify",)
COLUMNS = ("panel", "axis", "value", "B_S", "B_L", "I_C", "I_A", "median_verify_s",
           "median_open_s", "median_verify_over_train", "rate", "cells_checked",
           "verifier_over_training", "provider_over_training", "n_cells", "point")


def audit_cost(r: res.Row, rate: float) -> dict[str, float]:
  """Cost of auditing a fraction `rate` of a run's cells, from the measured per-cell times."""
  m = max(1, math.ceil(rate * r["n_cells"]))
  return {"rate": rate, "cells_checked": m,
          "verifier_over_training": m * r["mean_verify_s"] / r["run_train_s"],
          "provider_over_training": m * r["mean_open_s"] / r["run_train_s"]}


def table(results: Path) -> list[res.Row]:
  rows = res.read_experiment(results, "verify")
  centre = res.centre_of(results)
  rates = [float(x) for x in res.run_sheet(results)["sheet"]["verify"]["rates"]]
  out = []
  for axis in ("B_S", "B_L"):
    for r in res.sweep_rows(rows, centre, axis):
      out.append({**r, "panel": "cell_time", "axis": axis, "value": int(r[axis])})
  c = res.sweep_rows(rows, centre, "B_S")
  c = [r for r in c if int(r["B_S"]) == centre["B_S"]]
  if not c:
    raise res.ResultsError(f"{results / 'verify'}: no result at the sheet's centre {centre}")
  for rate in rates:
    out.append({**c[0], "panel": "audit_cost", "axis": "rate", "value": rate,
                **audit_cost(c[0], rate)})
  regen = [c[0]] + [r for axis in ("I_C", "I_A") for r in res.sweep_rows(rows, centre, axis)
                    if int(r[axis]) != centre[axis]]
  for r in regen:
    axis = next((a for a in ("I_C", "I_A") if int(r[a]) != centre[a]), "centre")
    out.append({**r, "panel": "regeneration", "axis": axis,
                "value": int(r[axis]) if axis != "centre" else 0})
  return out


def make(out: Path) -> list[Path]:
  results = out / "results"
  rows = table(results)
  csv_path, png = out / f"{NAME}.csv", out / f"{NAME}.png"
  res.write_csv(csv_path, rows, COLUMNS)
  plt = res.pyplot()
  fig, axes = plt.subplots(1, 4, figsize=(13, 3.5))
  for ax, axis in zip(axes[:2], ("B_S", "B_L")):
    rs = [r for r in rows if r["panel"] == "cell_time" and r["axis"] == axis]
    x = [r["value"] for r in rs]
    ax.plot(x, [r["median_verify_s"] for r in rs], "o-", label="verify (auth + replay)")
    ax.plot(x, [r["median_open_s"] for r in rs], "s--", label="provider opens")
    ax.set_xticks(x)
    ax.set_xlabel({"B_S": "B_S (steps per step block)", "B_L": "B_L (units per layer block)"}[axis])
    ax.set_title(f"one cell vs {axis}")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("time per cell (s, median)")
  axes[0].legend(loc="best")
  rs = [r for r in rows if r["panel"] == "audit_cost"]
  ax = axes[2]
  x = [100 * r["rate"] for r in rs]
  ax.plot(x, [100 * r["verifier_over_training"] for r in rs], "o-", label="verifier")
  ax.plot(x, [100 * r["provider_over_training"] for r in rs], "s--", label="provider (opening)")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("sampling rate (% of cells)")
  ax.set_ylabel("audit time / training time (%)")
  ax.set_title("audit cost vs sampling rate")
  ax.legend(loc="best")
  ax.grid(alpha=0.3, which="both")
  ax = axes[3]
  rs = [r for r in rows if r["panel"] == "regeneration"]
  labels = [f"I_C={r['I_C']}\nI_A={r['I_A']}" + ("\n(centre)" if r["axis"] == "centre" else "")
            for r in rs]
  xs = range(len(rs))
  ax.bar([i - 0.2 for i in xs], [r["median_open_s"] for r in rs], 0.4, label="provider opens")
  ax.bar([i + 0.2 for i in xs], [r["median_verify_s"] for r in rs], 0.4, label="verifier")
  ax.set_xticks(list(xs))
  ax.set_ylabel("time per cell (s, median)")
  ax.set_title("regeneration: I_C, I_A > 1")
  ax.set_xticklabels(labels, fontsize=7)
  ax.set_ylim(0, 1.3 * max(max(r["median_open_s"], r["median_verify_s"]) for r in rs))
  ax.legend(loc="upper center", ncol=2, fontsize=7)
  ax.grid(axis="y", alpha=0.3)
  fig.suptitle("Audit cost, language model (" + res.provenance_note(results) + ")", fontsize=9)
  fig.tight_layout()
  res.save(fig, png)
  plt.close(fig)
  return [png, csv_path]


if __name__ == "__main__":
  res.figure_main(make)

"""Figure 6: auditable inference. Recorded / plain tokens per second, the verification time
of one (token, layer block) cell and the bytes committed per generated token, vs B_L and I_A.

Every point is one `aftune.bench.infer.bench_infer` run on the language model's random-init
weights: one batch of prompts generated again and again by plain and recorded serving,
interleaved (the ratio is the median of per-round ratios); the committed bytes are every
file of one served batch's record over its generated tokens; the verification times are
single cells opened by the provider and verified warm (bars: the fastest and slowest cell).

  python -m paper_figures.make_all --scale small --out paper_figures/out --only inference

Writes fig6_inference.png and fig6_inference.csv.
"""

from __future__ import annotations

from pathlib import Path

from paper_figures import results as res

NAME = "fig6_inference"
EXPERIMENTS = ("infer",)
COLUMNS = ("axis", "value", "B_L", "I_A", "recorded_over_plain_paired", "recorded_over_plain",
           "tokens_per_s_plain", "tokens_per_s_recorded", "verify_cell_median_s",
           "verify_cell_min_s", "verify_cell_max_s", "bytes_per_token", "num_blocks",
           "generated_tokens", "point")


def table(results: Path) -> list[res.Row]:
  rows = res.read_experiment(results, "infer")
  centre = res.centre_of(results)
  out = []
  for axis in ("B_L", "I_A"):
    for r in res.sweep_rows(rows, centre, axis, settings=("B_L", "I_A")):
      out.append({**r, "axis": axis, "value": int(r[axis])})
  return out


def make(out: Path) -> list[Path]:
  results = out / "results"
  rows = table(results)
  csv_path, png = out / f"{NAME}.csv", out / f"{NAME}.png"
  res.write_csv(csv_path, rows, COLUMNS)
  plt = res.pyplot()
  fig, axes = plt.subplots(2, 3, figsize=(11, 5.6))
  names = {"B_L": "B_L (units per layer block)", "I_A": "I_A (outputs stored every I_A blocks)"}
  for i, axis in enumerate(("B_L", "I_A")):
    rs = [r for r in rows if r["axis"] == axis]
    x = [r["value"] for r in rs]
    a, b, c = axes[i]
    a.plot(x, [r["recorded_over_plain_paired"] for r in rs], "o-")
    a.axhline(1.0, color="grey", lw=0.8, ls="--")
    a.set_ylabel("recorded / plain tokens/s (x)")
    med = [1e3 * r["verify_cell_median_s"] for r in rs]
    b.errorbar(x, med, yerr=[[m - 1e3 * r["verify_cell_min_s"] for m, r in zip(med, rs)],
                             [1e3 * r["verify_cell_max_s"] - m for m, r in zip(med, rs)]],
               fmt="o-", capsize=3)
    b.set_ylabel("verify one (token, block) cell (ms)")
    c.plot(x, [r["bytes_per_token"] / 1024 for r in rs], "o-")
    c.set_ylabel("committed per generated token (KiB)")
    for ax in (a, b, c):
      ax.set_xlabel(names[axis])
      ax.set_xticks(x)
      ax.grid(alpha=0.3)
  fig.suptitle("Auditable inference, language model (" + res.provenance_note(results) + ")",
               fontsize=9)
  fig.tight_layout()
  res.save(fig, png)
  plt.close(fig)
  return [png, csv_path]


if __name__ == "__main__":
  res.figure_main(make)

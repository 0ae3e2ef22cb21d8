"""Figure 1: recording overhead (recorded / plain step time) vs B_S, B_L, I_C and I_A.

For a language model (the run sheet's `lm`) and a vision model (`vision`), each setting is
varied alone around the sheet's centre; a point is the median over timed rounds of the
recorded step's time over the plain step's in the same round
(`aftune.bench.record.bench_record`, variants interleaved in one process), the bar its
interquartile range over rounds. 1.0 = recording is free; the recorded step includes hashing,
writing the trace and the checkpoints every I_C step blocks.

  python -m paper_figures.make_all --scale small --out paper_figures/out --only overhead

Writes fig1_overhead.png and fig1_overhead.csv.
"""

from __future__ import annotations

from pathlib import Path

from paper_figures import results as res

NAME = "fig1_overhead"
EXPERIMENTS = ("record",)
AXES = {"B_S": "B_S (steps per step block)", "B_L": "B_L (units per layer block)",
        "I_C": "I_C (checkpoint every I_C step blocks)", "I_A": "I_A (boundaries every I_A blocks)"}
COLUMNS = ("model", "axis", "value", "B_S", "B_L", "I_C", "I_A", "recorded_over_plain_paired",
           "paired_q25", "paired_q75", "recorded_over_plain", "plain_ms", "recorded_ms",
           "rounds", "num_params", "point")


def table(results: Path) -> list[res.Row]:
  rows = res.read_experiment(results, "record")
  centre = res.centre_of(results)
  out = []
  for model in ("lm", "vision"):
    mine = [r for r in rows if r["model"] == model]
    for axis in AXES:
      for r in res.sweep_rows(mine, centre, axis):
        out.append({**r, "axis": axis, "value": int(r[axis])})
  return out


def make(out: Path) -> list[Path]:
  results = out / "results"
  rows = table(results)
  csv_path, png = out / f"{NAME}.csv", out / f"{NAME}.png"
  res.write_csv(csv_path, rows, COLUMNS)
  plt = res.pyplot()
  fig, axes = plt.subplots(1, 4, figsize=(12, 3.4), sharey=True)
  styles = {"lm": ("tab:blue", "o", "language model"), "vision": ("tab:orange", "s", "vision model")}
  for ax, axis in zip(axes, AXES):
    for model, (color, marker, label) in styles.items():
      rs = [r for r in rows if r["model"] == model and r["axis"] == axis]
      if not rs:
        continue
      x = [r["value"] for r in rs]
      y = [r["recorded_over_plain_paired"] for r in rs]
      err = [[max(0.0, yy - r["paired_q25"]) for yy, r in zip(y, rs)],
             [max(0.0, r["paired_q75"] - yy) for yy, r in zip(y, rs)]]
      ax.errorbar(x, y, yerr=err, color=color, marker=marker, capsize=3, label=label)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel(AXES[axis])
    ax.set_xticks(sorted({r["value"] for r in rows if r["axis"] == axis}))
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("recorded / plain step time (x)")
  axes[0].legend(loc="best")
  fig.suptitle("Recording overhead, each setting varied alone (bars: IQR over rounds; "
               + res.provenance_note(results) + ")", fontsize=9)
  fig.tight_layout()
  res.save(fig, png)
  plt.close(fig)
  return [png, csv_path]


if __name__ == "__main__":
  res.figure_main(make)

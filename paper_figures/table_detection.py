"""Table 5: the detection table, computed and measured side by side.

Each of the paper's rows (under-training, poisoning, substitution, tampering) carries the
published P(detect) (arXiv 2603.07466, its (N, k, m) worked out in
paper_figures/detection_table.py), the same formula recomputed, and beside it the
measurement of the closest attack of the suite (`experiments.attack_eval`, the sheet's
`attacks`): the attack trained for real, every cell verified, `draws` challenges of the
row's strategy at the suite's sampling rate closest to the paper's; its footprint k, m and
N are the suite grid's, its prediction the formula on that grid (or the stratified
sampler simulated), the measured fraction with its 95% Wilson interval. A row whose attack
the sheet does not run says so (the smoke sheet runs two).

  python -m paper_figures.make_all --scale small --out paper_figures/out --only detection_table

Writes table5_detection.md, table5_detection.csv and table5_detection.png.
"""

from __future__ import annotations

from pathlib import Path

from paper_figures import detection_table
from paper_figures import results as res

NAME = "table5_detection"
EXPERIMENTS = ("attacks",)
# (category, the paper row's scenario, its sampling, the suite's attacks in preference order)
CATEGORIES = (
    ("under-training", "skip 50% of steps", "uniform", ("skip_steps:50%", "skip_steps", "stop_early")),
    ("poisoning", "10% data poisoning", "uniform", ("poison_data", "substitute_data")),
    ("poisoning", "10% data poisoning", "input-only", ("poison_data", "substitute_data")),
    ("substitution", "replace all layers (B_L=4)", "uniform",
     ("layer_substitution:100%", "layer_substitution", "base_model")),
    ("tampering", "modify 10% of parameters", "uniform", ("final_edit",)),
)
COLUMNS = ("category", "scenario", "sampling", "paper_pi", "paper_N", "paper_k", "paper_m",
           "paper_published", "computed_paper_grid", "suite_attack", "suite_strength",
           "suite_strategy", "suite_rate", "suite_N", "suite_k", "suite_m", "computed_suite_grid",
           "prediction", "measured", "ci_low", "ci_high", "draws", "misses", "note")


def _pick(measured: list[res.Row], prefs, strategy: str, pi: float) -> res.Row | None:
  for pref in prefs:
    name, _, strength = pref.partition(":")
    rs = [r for r in measured if r["attack"] == name and r["strategy"] == strategy
          and (not strength or r["strength"] == strength)]
    if rs:
      return min(rs, key=lambda r: (abs(float(r["rate"]) - pi), float(r["rate"])))
  return None


def table(results: Path) -> list[res.Row]:
  path = results / "attacks" / "detection.jsonl"
  measured = res.read_point(path)
  if measured is None:
    raise res.ResultsError(f"{path}: missing (run paper_figures.make_all)")
  paper_rows = [r for r in detection_table.rows() if r.paper is not None]
  out = []
  for category, scenario, sampling, prefs in CATEGORIES:
    p = next(r for r in paper_rows if r.scenario == scenario and r.sampling == sampling)
    row = {"category": category, "scenario": scenario, "sampling": sampling, "paper_pi": p.pi,
           "paper_N": p.population, "paper_k": p.k, "paper_m": p.m,
           "paper_published": p.paper, "computed_paper_grid": p.ours}
    m = _pick(measured, prefs, sampling.replace("-", "_"), p.pi)
    if m is None:
      row["note"] = (f"none of {', '.join(prefs)} is in this sheet's attacks: not measured at "
                     "this scale")
    else:
      row.update({"suite_attack": m["attack"], "suite_strength": m["strength"],
                  "suite_strategy": m["strategy"], "suite_rate": m["rate"], "suite_N": m["N"],
                  "suite_k": m["k"], "suite_m": m["m"], "computed_suite_grid": m["predicted"],
                  "prediction": m["prediction"], "measured": m["measured"],
                  "ci_low": m["ci_low"], "ci_high": m["ci_high"], "draws": m["draws"],
                  "misses": m["misses"],
                  "note": f"suite grid N={m['N']} (B_S={m['B_S']}, B_L={m['B_L']}), {m['mode']} mode"})
    out.append(row)
  return out


def markdown(rows: list[res.Row], note: str) -> str:
  def pct(v):
    return "" if v is None else f"{100 * float(v):.1f}%"

  lines = ["# Detection table: the paper's rows computed, the attack suite measured", "",
           f"Results: {note}. Paper columns: published P(detect) (arXiv 2603.07466) and the same "
           "formula recomputed on its grid (paper_figures/detection_table.py). Suite columns: "
           "the closest attack of experiments.attack_eval, trained and verified for real, its "
           "prediction on the suite grid and the measured fraction of challenges that caught it "
           "(95% Wilson interval).", "",
           "| category | paper scenario | sampling | pi | paper | computed | suite attack | "
           "rate | N | k | m | predicted | measured [95% CI] | misses |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if r.get("measured") is None:
      suite = f"_{r['note']}_ | | | | | | |"
    else:
      suite = (f"{r['suite_attack']} {r['suite_strength']} | {r['suite_rate']:g} | {r['suite_N']} | "
               f"{r['suite_k']} | {r['suite_m']} | {pct(r['computed_suite_grid'])} | "
               f"{pct(r['measured'])} [{pct(r['ci_low'])}, {pct(r['ci_high'])}] | {r['misses']} |")
    lines.append(f"| {r['category']} | {r['scenario']} | {r['sampling']} | {100 * r['paper_pi']:g}% | "
                 f"{pct(r['paper_published'])} | {pct(r['computed_paper_grid'])} | {suite}")
  return "\n".join(lines) + "\n"


def make(out: Path) -> list[Path]:
  results = out / "results"
  rows = table(results)
  csv_path, md, png = out / f"{NAME}.csv", out / f"{NAME}.md", out / f"{NAME}.png"
  res.write_csv(csv_path, rows, COLUMNS)
  note = res.provenance_note(results)
  md.write_text(markdown(rows, note), encoding="utf-8")
  plt = res.pyplot()
  fig, ax = plt.subplots(figsize=(10, 4.2))
  xs = range(len(rows))
  w = 0.2
  ax.bar([x - 1.5 * w for x in xs], [r["paper_published"] for r in rows], w,
         label="paper, published")
  ax.bar([x - 0.5 * w for x in xs], [r["computed_paper_grid"] for r in rows], w,
         label="paper grid, computed")
  pred = [r.get("computed_suite_grid") for r in rows]
  ax.bar([x + 0.5 * w for x in xs], [p or 0.0 for p in pred], w, label="suite grid, predicted")
  meas = [(x, r) for x, r in zip(xs, rows) if r.get("measured") is not None]
  ax.bar([x + 1.5 * w for x, _ in meas], [r["measured"] for _, r in meas], w,
         yerr=[[r["measured"] - r["ci_low"] for _, r in meas],
               [r["ci_high"] - r["measured"] for _, r in meas]],
         capsize=3, label="suite, measured (95% CI)")
  for x, r in zip(xs, rows):
    if r.get("measured") is None:
      ax.text(x + w, 0.03, "not run\nat this scale", ha="center", fontsize=6, rotation=90,
              va="bottom")
  labels = [f"{r['category']}\n{r['sampling']}, pi={100 * r['paper_pi']:g}%"
            + (f"\nsuite: {r['suite_attack']}" if r.get("suite_attack") else "") for r in rows]
  ax.set_xticks(list(xs))
  ax.set_xticklabels(labels, fontsize=7)
  ax.set_ylabel("P(detect)")
  ax.set_ylim(0, 1.05)
  ax.grid(axis="y", alpha=0.3)
  ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)
  ax.set_title("Detection table: computed vs measured (" + note + ")", fontsize=9)
  fig.tight_layout()
  res.save(fig, png)
  plt.close(fig)
  return [png, csv_path, md]


if __name__ == "__main__":
  res.figure_main(make)

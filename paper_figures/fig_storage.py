"""Figure 2: storage per training step by category vs I_C and I_A, beside the reference's.

Bytes on disk per step of the recorded variant of `aftune.bench.record.bench_record`
(`recorder.storage_report`): boundary activations and cotangents (every I_A-th layer block),
parameters and optimizer state (a checkpoint every I_C step blocks, amortised per step),
hashes (the Merkle leaves, job spec and signed roots). Each aftune category is set beside
what the published implementation (github.com/hengvt/AFTUNE, docs/reference.md) records
for it; the bar of I_C > 1 together with I_A > 1 is a setting that implementation refuses.

  python -m paper_figures.make_all --scale small --out paper_figures/out --only storage

Writes fig2_storage.png and fig2_storage.csv (one row per point and category).
"""

from __future__ import annotations

from pathlib import Path

from paper_figures import results as res

NAME = "fig2_storage"
EXPERIMENTS = ("record",)
CATEGORIES = ("activations", "cotangents", "parameters", "optimizer_state", "hashes")
# What the reference implementation records for the same category (docs/reference.md).
REFERENCE = {
    "activations": "output of each layer block's last unit, stored every I_A layer blocks",
    "cotangents": "input gradient of each layer block's first unit, every I_A layer blocks",
    "parameters": "full checkpoint every I_C step blocks (hash at every step-block start)",
    "optimizer_state": "with the checkpoint every I_C step blocks (hash at every start)",
    "hashes": "per-tensor BLAKE3 of 4 KiB chunks in JSON beside the tensors (no Merkle tree)",
}
COLUMNS = ("model", "sweep", "I_C", "I_A", "B_S", "B_L", "category", "bytes_per_step",
           "reference_category", "reference_accepts_setting", "point")


def table(results: Path) -> list[res.Row]:
  rows = res.read_experiment(results, "record")
  centre = res.centre_of(results)
  out = []
  for model in ("lm", "vision"):
    mine = [r for r in rows if r["model"] == model]
    swept = {r["point"] for axis in ("I_C", "I_A") for r in res.sweep_rows(mine, centre, axis)}
    pairs = [r for r in mine if r["point"] not in swept and int(r["I_C"]) != centre["I_C"]
             and int(r["I_A"]) != centre["I_A"]
             and all(int(r[k]) == centre[k] for k in ("B_S", "B_L"))]
    for sweep in ("I_C", "I_A"):
      points = res.sweep_rows(mine, centre, sweep) + (pairs if sweep == "I_A" else [])
      for r in points:
        for cat in CATEGORIES:
          out.append({**r, "sweep": sweep, "category": cat,
                      "bytes_per_step": r[f"bytes_{cat}"], "reference_category": REFERENCE[cat],
                      "reference_accepts_setting": not (int(r["I_C"]) > 1 and int(r["I_A"]) > 1)})
  return out


def make(out: Path) -> list[Path]:
  results = out / "results"
  rows = table(results)
  csv_path, png = out / f"{NAME}.csv", out / f"{NAME}.png"
  res.write_csv(csv_path, rows, COLUMNS)
  plt = res.pyplot()
  panels = [(m, s) for m in ("lm", "vision") for s in ("I_C", "I_A")]
  fig, axes = plt.subplots(1, 4, figsize=(13, 4.6))
  colors = dict(zip(CATEGORIES, ("tab:blue", "tab:cyan", "tab:green", "tab:olive", "tab:red")))
  for ax, (model, sweep) in zip(axes, panels):
    rs = [r for r in rows if r["model"] == model and r["sweep"] == sweep]
    labels = []
    for r in rs:
      lab = f"I_C={r['I_C']}\nI_A={r['I_A']}"
      if not r["reference_accepts_setting"]:
        lab += " *"
      if lab not in labels:
        labels.append(lab)
    bottom = [0.0] * len(labels)
    for cat in CATEGORIES:
      vals = [r["bytes_per_step"] / 1024 for r in rs if r["category"] == cat]
      ax.bar(range(len(labels)), vals, bottom=bottom, color=colors[cat],
             label=cat.replace("_", " "))
      bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_title(f"{'language' if model == 'lm' else 'vision'} model, vs {sweep}")
    ax.grid(axis="y", alpha=0.3)
  axes[0].set_ylabel("stored per training step (KiB)")
  handles, labels = axes[0].get_legend_handles_labels()
  ref_labels = [f"{lab}  -  reference: {REFERENCE[c]}" for lab, c in zip(labels, CATEGORIES)]
  fig.legend(handles, ref_labels, loc="lower center", ncol=1, fontsize=7, frameon=False,
             bbox_to_anchor=(0.5, -0.02))
  fig.suptitle("Storage per step by category (aftune bars; legend: what the reference "
               "implementation stores; * a setting it refuses, I_C > 1 with I_A > 1)\n("
               + res.provenance_note(results) + ")", fontsize=9)
  fig.tight_layout(rect=(0, 0.2, 1, 1))
  res.save(fig, png)
  plt.close(fig)
  return [png, csv_path]


if __name__ == "__main__":
  res.figure_main(make)

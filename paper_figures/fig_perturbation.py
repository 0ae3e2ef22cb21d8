"""Figure 7: the smallest successful perturbation vs the honest replay noise, per tensor
kind (the case for exact mode).

From the attack-success rows of `experiments.attack_eval` (`aftune.attacks.edits.
success_table` on the honest run's final model): a weight backdoor of one layer block, a
rank-one (ROME/BadEdit) edit and a PGD perturbation of one block's output at inference,
each the smallest found that flips a yes/no answer, measured in the verifier's metric (max
relative error, `audit.core.rel_err`). Beside them, per tensor kind, the tolerance mode's
threshold and the honest noise (the same math run as another XLA program,
`edits.honest_noise`). An attack under the threshold passes tolerance mode; exact mode
rejects any difference (the same program replays bit for bit).

  python -m paper_figures.make_all --scale small --out paper_figures/out --only perturbation

Writes fig7_perturbation.png and fig7_perturbation.csv.
"""

from __future__ import annotations

from pathlib import Path

from paper_figures import results as res

NAME = "fig7_perturbation"
EXPERIMENTS = ("attacks",)
COLUMNS = ("kind", "attack", "target", "success", "verifier_rel_err", "tolerance",
           "fits_under_tolerance", "honest_noise", "over_noise", "smallest_of_kind", "where")


def table(results: Path) -> list[res.Row]:
  path = results / "attacks" / "success.jsonl"
  rows = res.read_point(path)
  if rows is None:
    raise res.ResultsError(f"{path}: missing (run paper_figures.make_all)")
  if not rows:
    raise res.ResultsError(f"{path}: no attack-success rows (the sheet's attacks.success is off)")
  out = []
  for r in rows:
    noise = r.get("honest_noise")
    err = res.as_float(r["verifier_rel_err"])
    out.append({**r, "over_noise": err / noise if noise else None})
  for kind in {r["kind"] for r in out}:
    ok = [r for r in out if r["kind"] == kind and r["success"]]
    if ok:
      min(ok, key=lambda r: res.as_float(r["verifier_rel_err"]))["smallest_of_kind"] = True
  for r in out:
    r.setdefault("smallest_of_kind", False)
  return sorted(out, key=lambda r: (r["kind"], r["attack"], str(r["target"])))


def make(out: Path) -> list[Path]:
  results = out / "results"
  rows = table(results)
  csv_path, png = out / f"{NAME}.csv", out / f"{NAME}.png"
  res.write_csv(csv_path, rows, COLUMNS)
  plt = res.pyplot()
  kinds = sorted({r["kind"] for r in rows})
  widths = [max(2, len([r for r in rows if r["kind"] == k])) for k in kinds]
  fig, axes = plt.subplots(1, len(kinds), figsize=(max(7.5, 2.2 + 1.1 * sum(widths)), 4.8),
                           gridspec_kw={"width_ratios": widths}, squeeze=False)
  positive = [v for r in rows for v in (res.as_float(r["verifier_rel_err"]), r["tolerance"],
                                        r.get("honest_noise") or 0.0) if v and v > 0]
  floor = min(positive) / 10 if positive else 1e-9
  for ax, kind in zip(axes[0], kinds):
    rs = [r for r in rows if r["kind"] == kind]
    for i, r in enumerate(rs):
      err = res.as_float(r["verifier_rel_err"])
      y = err if err > 0 else floor
      ax.plot([i], [y], "o" if r["success"] else "x", ms=9,
              color="tab:red" if r["success"] else "grey")
      ax.annotate(f"{err:.2g}", (i, y), textcoords="offset points", xytext=(8, -3), fontsize=7)
    tol = rs[0]["tolerance"]
    ax.axhline(tol, color="k", ls="--", lw=1, label=f"tolerance threshold {tol:.0e}")
    noise = max((r.get("honest_noise") or 0.0) for r in rs)
    if noise > 0:
      ax.axhline(noise, color="tab:green", ls=":", lw=1.5, label=f"honest replay noise {noise:.1e}")
    else:
      ax.axhline(floor, color="tab:green", ls=":", lw=1.5,
                 label="honest replay noise 0 (bitwise equal)")
    ax.set_yscale("log")
    ax.set_ylim(floor / 3, max(positive) * 30 if positive else 1.0)
    ax.set_xlim(-0.6, len(rs) - 0.4)
    ax.set_xticks(range(len(rs)))
    ax.set_xticklabels([f"{r['attack']}\n{r['target']}" for r in rs], rotation=30, ha="right",
                       fontsize=7)
    ax.set_title(f"tensor kind: {kind}")
    ax.legend(loc="upper left", fontsize=7)
    ax.grid(axis="y", alpha=0.3)
  axes[0][0].set_ylabel("verifier's max relative error (log)")
  fig.suptitle("Smallest answer-flipping perturbation (red o: flips; grey x: no flip found) vs the\n"
               "tolerance threshold and the honest noise; exact mode rejects any error > 0 ("
               + res.provenance_note(results) + ")", fontsize=9)
  fig.tight_layout()
  res.save(fig, png)
  plt.close(fig)
  return [png, csv_path]


if __name__ == "__main__":
  res.figure_main(make)

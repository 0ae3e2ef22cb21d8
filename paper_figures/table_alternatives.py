"""Table 8: what a client could pick instead. Overhead, client storage, verification cost
and guarantee of aftune, the reference implementation's published mechanism, a GPU TEE and
a zkML system, each number with its source.

aftune's row is measured by this pipeline (the language model at the sheet's centre: the
recording overhead of `bench_record`, the inference overhead of `bench_infer`, the bytes the
client keeps and the per-cell and 10%-audit costs of `bench_verify`); its `source` names the
results files. The other rows quote their publications and say what the publication does
not state; nothing there is measured here.

  python -m paper_figures.make_all --scale small --out paper_figures/out --only alternatives

Writes table8_alternatives.md, table8_alternatives.csv and table8_alternatives.png.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from paper_figures import pipeline
from paper_figures import results as res

NAME = "table8_alternatives"
EXPERIMENTS = ("record", "verify", "infer")
COLUMNS = ("system", "training_overhead", "inference_overhead", "client_storage",
           "verification_cost", "guarantee", "source", "recorded_over_plain_step",
           "recorded_over_plain_tokens_per_s", "client_bytes", "verify_over_train_per_cell",
           "audit_over_training", "audit_fraction")
NOT_STATED = "not stated in the cited source"

# Published alternatives: quoted, with the citation in `source`.
PUBLISHED = (
    {"system": "AFTUNE reference implementation (published mechanism)",
     "training_overhead": f"{NOT_STATED} (abstract: 'practical computation overhead')",
     "inference_overhead": NOT_STATED,
     "client_storage": "no signed root to keep: per-tensor hashes sit in JSON beside the "
                       "provider's tensors",
     "verification_cost": "replay of one cell on CPU (optionally in SGX/TDX via Gramine); "
                          f"time {NOT_STATED}",
     "guarantee": "relative L2 printed without a threshold; boundary tensors, start weights, "
                  "batch order and LM head unchecked (forged boundaries pass)",
     "source": "Jin et al., 'Trusting What You Cannot See', arXiv 2603.07466 (2026), abstract; "
               "github.com/hengvt/AFTUNE as analysed in docs/reference.md"},
    {"system": "GPU TEE (NVIDIA Hopper confidential computing)",
     "training_overhead": NOT_STATED + " (inference only)",
     "inference_overhead": "below 7% for most typical LLM queries; near zero for larger models "
                           "and longer sequences",
     "client_storage": f"an attestation report; size {NOT_STATED}",
     "verification_cost": f"remote attestation once per session; time {NOT_STATED}",
     "guarantee": "every computation, if the hardware vendor's root of trust and the enclave's "
                  "software stack are trusted",
     "source": "Zhu et al., 'Confidential Computing on NVIDIA Hopper GPUs: A Performance "
               "Benchmark Study', arXiv 2409.03992v4, abstract"},
    {"system": "zkML (zkLLM)",
     "training_overhead": NOT_STATED + " (inference only)",
     "inference_overhead": "proof generation under 15 minutes per inference of a "
                           "13B-parameter LLM (CUDA)",
     "client_storage": "proof under 200 kB",
     "verification_cost": NOT_STATED,
     "guarantee": "cryptographic soundness for every operation of the inference; weights stay "
                  "private",
     "source": "Sun, Li, Zhang, 'zkLLM: Zero Knowledge Proofs for Large Language Models', "
               "ACM CCS 2024, arXiv 2404.16109, abstract"},
)


def _centre_point(results: Path, experiment: str, name: str) -> tuple[res.Row, Path]:
  path = results / experiment / f"{name}.jsonl"
  rows = res.read_point(path)
  if not rows:
    raise res.ResultsError(f"{path}: missing; aftune's row needs the sheet's centre point")
  return rows[0], path


def table(results: Path) -> list[res.Row]:
  centre = res.centre_of(results)
  tag = pipeline.tag(centre)
  rec, rec_path = _centre_point(results, "record", f"lm_{tag}")
  ver, ver_path = _centre_point(results, "verify", f"lm_{tag}")
  inf_tag = pipeline.tag({"B_L": centre["B_L"], "I_A": centre["I_A"]})
  inf, inf_path = _centre_point(results, "infer", f"lm_{inf_tag}")
  client = ver["client_bytes_commitment"] + ver["client_bytes_job_spec"]
  setting = ", ".join(f"{k}={v}" for k, v in centre.items())
  aftune = {
      "system": f"aftune (measured here: {rec['num_params'] / 1e6:.2g}M-parameter LM, {setting})",
      "training_overhead": f"recorded / plain step time {rec['recorded_over_plain_paired']:.3g}x",
      "inference_overhead": f"recorded / plain tokens/s {inf['recorded_over_plain_paired']:.3g}x",
      "client_storage": f"{client} bytes (signed commitment + agreed job spec)",
      "verification_cost": f"one cell: {ver['median_verify_over_train']:.3g}x the training time "
                           f"it represents; a {100 * ver['audit_fraction']:g}% audit: "
                           f"{ver['audit_cost_over_training']:.3g}x the training time",
      "guarantee": "a sampled tampered cell is rejected (bitwise replay); P(detect) = "
                   "1 - C(N-k, m)/C(N, m) for k tampered of N cells, m sampled",
      "source": f"measured: {rec_path.relative_to(results.parent)}, "
                f"{ver_path.relative_to(results.parent)}, {inf_path.relative_to(results.parent)}",
      "recorded_over_plain_step": rec["recorded_over_plain_paired"],
      "recorded_over_plain_tokens_per_s": inf["recorded_over_plain_paired"],
      "client_bytes": client,
      "verify_over_train_per_cell": ver["median_verify_over_train"],
      "audit_over_training": ver["audit_cost_over_training"],
      "audit_fraction": ver["audit_fraction"],
  }
  return [aftune, *[dict(r) for r in PUBLISHED]]


def make(out: Path) -> list[Path]:
  results = out / "results"
  rows = table(results)
  csv_path, md, png = out / f"{NAME}.csv", out / f"{NAME}.md", out / f"{NAME}.png"
  res.write_csv(csv_path, rows, COLUMNS)
  text_cols = ("system", "training_overhead", "inference_overhead", "client_storage",
               "verification_cost", "guarantee", "source")
  md.write_text("# What a client could pick: aftune and the alternatives\n\n"
                f"aftune's row: {res.provenance_note(results)}. The others quote their sources "
                "and say what they do not state.\n\n" + res.markdown_table(rows, text_cols) + "\n",
                encoding="utf-8")
  plt = res.pyplot()
  widths = (22, 20, 20, 20, 24, 26, 26)
  cells = [["\n".join(textwrap.wrap(str(r[c]), w)) for c, w in zip(text_cols, widths)]
           for r in rows]
  lines = [max(c.count("\n") + 1 for c in row) for row in cells]
  fig, ax = plt.subplots(figsize=(17, 0.9 + 0.16 * (sum(lines) + 2 * len(rows))))
  ax.axis("off")
  tab = ax.table(cellText=cells, colLabels=[c.replace("_", " ") for c in text_cols],
                 colWidths=[w / sum(widths) for w in widths], loc="upper center", cellLoc="left")
  tab.auto_set_font_size(False)
  tab.set_fontsize(7)
  total = sum(lines) + 2 * len(rows) + 2
  for (i, _), cell in tab.get_celld().items():
    n = 2 if i == 0 else lines[i - 1] + 2
    cell.set_height(n / total)
    if i == 0:
      cell.set_text_props(weight="bold")
  ax.set_title("Alternatives a client could pick (aftune measured; others quoted with their "
               "source)", fontsize=9)
  res.save(fig, png)
  plt.close(fig)
  return [png, csv_path, md]


if __name__ == "__main__":
  res.figure_main(make)

"""The experiments behind the figures: every point of a run sheet, run once, resumable.

Each point calls one measuring library function (nothing is measured here):

  record/<model>_<setting>   aftune.bench.record.bench_record: plain vs blocked vs recorded
                             steps interleaved, bytes stored per step by category
  verify/lm_<setting>        aftune.bench.verify.bench_verify: record a few step blocks, open
                             and verify every cell, the per-cell times
  infer/lm_<setting>         aftune.bench.infer.bench_infer: plain vs recorded generation,
                             bytes committed per token, per-cell verification
  attacks/                   aftune.bench.attack_eval.run (experiments.attack_eval): the attack
                             suite's detection rows and the attack-success rows (its own
                             files and workdirs in attack_eval/<sheet hash>/)

A point whose results file is present and valid is skipped; see `paper_figures.results`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any
from typing import Callable

import ml_collections

from paper_figures import results as res

SETTINGS = ("B_S", "B_L", "I_C", "I_A")
_AUDIT_FIELD = {"B_S": "steps_per_block", "B_L": "units_per_block", "I_C": "checkpoint_interval",
                "I_A": "activation_interval"}


@dataclasses.dataclass
class Point:
  experiment: str
  name: str
  sheet: dict[str, Any]  # the part of the run sheet the point depends on (hashed)
  run: Callable[[], list[res.Row]]

  def path(self, results: Path) -> Path:
    return results / self.experiment / f"{self.name}.jsonl"


def tag(s: dict[str, int]) -> str:
  return "_".join(f"{k.replace('_', '')}{s[k]}" for k in SETTINGS if k in s)


def sweep_settings(centre: dict[str, int], sweep: dict[str, Any],
                   pairs: tuple = ()) -> list[dict[str, int]]:
  """The settings of a one-at-a-time sweep around `centre` (deduplicated, centre first),
  plus (I_C, I_A) pairs varied together."""
  out = [dict(centre)]
  for axis in SETTINGS:
    for v in sweep.get(axis, ()):
      s = {**centre, axis: int(v)}
      if s not in out:
        out.append(s)
  for i_c, i_a in pairs:
    s = {**centre, "I_C": int(i_c), "I_A": int(i_a)}
    if s not in out:
      out.append(s)
  return out


def with_settings(config: ml_collections.ConfigDict, s: dict[str, int]) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(config.to_dict())
  for k, v in s.items():
    c.audit[_AUDIT_FIELD[k]] = int(v)
  return c


def _timing_summary(t: dict[str, Any]) -> dict[str, float]:
  return {"median_s": t["median_s"], "iqr_s": t["iqr_s"], "rel_spread": t["rel_spread"]}


def _record_point(model: str, config, s: dict[str, int], rs) -> list[res.Row]:
  import numpy as np  # pylint: disable=g-import-not-at-top

  from aftune.bench import record as bench_record  # pylint: disable=g-import-not-at-top
  r = bench_record.bench_record(with_settings(config, s), steps=int(rs.steps),
                                warmup=int(rs.warmup), round_steps=int(rs.round_steps),
                                torch=False)
  per_round = np.asarray(r["timings"]["recorded"]["round_s"]) / np.asarray(
      r["timings"]["plain"]["round_s"])
  row = {"model": model, **s, "num_params": r["num_params"],
         "recorded_over_plain": r["recorded_over_plain"],
         "recorded_over_plain_paired": r["recorded_over_plain_paired"],
         "paired_q25": float(np.quantile(per_round, 0.25)),
         "paired_q75": float(np.quantile(per_round, 0.75)),
         "blocked_over_plain": r["blocked_over_plain"],
         "plain_ms": 1e3 * r["timings"]["plain"]["median_s"],
         "blocked_ms": 1e3 * r["timings"]["blocked"]["median_s"],
         "recorded_ms": 1e3 * r["timings"]["recorded"]["median_s"],
         "rounds": len(per_round),
         **{f"bytes_{k}": v for k, v in r["bytes_per_step"].items()},
         "bytes_total": r["bytes_per_step_total"],
         **{f"raw_bytes_{k}": v for k, v in r["checkpoint_raw_bytes_per_step"].items()},
         "num_layer_blocks": r["grid"]["num_layer_blocks"]}
  return [row]


def _verify_point(config, s: dict[str, int], vs) -> list[res.Row]:
  from aftune.bench import verify as bench_verify  # pylint: disable=g-import-not-at-top
  n_sb = max(int(vs.num_step_blocks), int(s["I_C"]))
  r = bench_verify.bench_verify(with_settings(config, s), num_step_blocks=n_sb, cold=bool(vs.cold))
  warm = [c for c in r["cells"] if c["step_block"] > 0] or r["cells"]
  mean = lambda key: sum(c[key] for c in warm) / len(warm)
  g = r["grid"]
  n_cells = g["num_layer_blocks"] * g["num_step_blocks"]
  return [{"model": "lm", **s, "num_params": r["num_params"], "num_layer_blocks": g["num_layer_blocks"],
           "num_step_blocks": g["num_step_blocks"], "n_cells": n_cells,
           "step_s": r["step_s"], "run_train_s": r["step_s"] * g["num_steps"],
           "median_verify_s": r["median_auth_s"] + r["median_replay_s"],
           "median_auth_s": r["median_auth_s"], "median_replay_s": r["median_replay_s"],
           "median_open_s": r["median_open_s"], "mean_verify_s": mean("verify_s"),
           "mean_open_s": mean("open_s"), "median_verify_over_train": r["median_verify_over_train"],
           "cold_first_cell_verify_s": r["cold_first_cell_verify_s"],
           "audit_fraction": r["audit_fraction"],
           "audit_cost_over_training": r["audit_cost_over_training"],
           "opening_cost_over_training": r["opening_cost_over_training"],
           "client_bytes_commitment": r["client_bytes"]["commitment"],
           "client_bytes_job_spec": r["client_bytes"]["job_spec"]}]


def _infer_point(config, s: dict[str, int], isheet) -> list[res.Row]:
  from aftune.bench import infer as bench_infer  # pylint: disable=g-import-not-at-top
  c = with_settings(config, {"B_L": s["B_L"]})
  model = bench_infer.random_init_model(c)
  prompts = bench_infer.bench_prompts(model, c.data.train_path, int(isheet.prompts),
                                      int(isheet.max_prompt_len))
  r = bench_infer.bench_infer(model, prompts, max_new_tokens=int(isheet.max_new_tokens),
                              rounds=int(isheet.rounds), warmup=int(isheet.warmup),
                              verify_cells=int(isheet.verify_cells), label="random init",
                              activation_interval=int(s["I_A"]))
  return [{"model": "lm", **s, "num_params": r["num_params"], "num_blocks": r["num_blocks"],
           "generated_tokens": r["generated_tokens"],
           **{f"tokens_per_s_{n}": v for n, v in r["tokens_per_s"].items()},
           "recorded_over_plain": r["ratios"]["recorded/plain"],
           "recorded_over_plain_paired": r["paired_ratios"]["recorded/plain"],
           "verify_cell_median_s": r["verify_cell_median_s"],
           "verify_cell_min_s": min(c["verify_s"] for c in r["cells"]),
           "verify_cell_max_s": max(c["verify_s"] for c in r["cells"]),
           "bytes_per_token": r["bytes_per_token"]}]


def _attack_points(sheet: ml_collections.ConfigDict, results: Path) -> list[Point]:
  """The attack suite runs once and yields two results files (detection, success)."""
  part = {"attacks": json.loads(sheet.attacks.to_json_best_effort())}
  cache: dict[str, Any] = {}

  def run_suite() -> dict[str, Any]:
    if not cache:
      from aftune.bench import attack_eval  # pylint: disable=g-import-not-at-top
      # One directory per attack sheet: attack_eval reuses the runs it finds there.
      cache.update(attack_eval.run(sheet.attacks,
                                   results / "attack_eval" / res.sheet_hash(part)[:12]))
    return cache

  keep = ("attack", "strength", "strategy", "rate", "m", "k", "k_flagged", "N", "draws",
          "detected", "measured", "ci_low", "ci_high", "predicted", "prediction", "misses",
          "B_S", "B_L", "mode", "what")
  return [
      Point("attacks", "detection", part,
            lambda: [{k: r[k] for k in keep} for r in run_suite()["detection"]]),
      Point("attacks", "success", part, lambda: list(run_suite()["success"])),
  ]


def points(sheet: ml_collections.ConfigDict, results: Path) -> list[Point]:
  """Every experiment point of the sheet, in the order they run."""
  centre = {k: int(v) for k, v in sheet.centre.items()}
  lm, vis = sheet.lm, sheet.vision
  rs = sheet.record
  rec_part = {k: rs[k] for k in ("steps", "warmup", "round_steps")}
  lm_json = json.loads(lm.to_json_best_effort())
  vis_json = json.loads(vis.to_json_best_effort())
  out: list[Point] = []
  for model, config, cjson, sweep in (("lm", lm, lm_json, rs.sweep),
                                      ("vision", vis, vis_json, rs.vision_sweep)):
    for s in sweep_settings(centre, sweep.to_dict(), tuple(rs.pairs)):
      out.append(Point("record", f"{model}_{tag(s)}",
                       {"model": cjson, "settings": s, "record": rec_part},
                       lambda m=model, c=config, s=s: _record_point(m, c, s, rs)))
  vs = sheet.verify
  for s in sweep_settings(centre, vs.sweep.to_dict()):
    out.append(Point("verify", f"lm_{tag(s)}",
                     {"model": lm_json, "settings": s, "num_step_blocks": vs.num_step_blocks,
                      "cold": vs.cold},
                     lambda s=s: _verify_point(lm, s, vs)))
  isheet = sheet.infer
  ic = {"B_L": centre["B_L"], "I_A": centre["I_A"]}
  inf_settings = [ic] + [{**ic, axis: int(v)} for axis in ("B_L", "I_A")
                         for v in isheet.sweep[axis]]
  seen = []
  for s in inf_settings:
    if s in seen:
      continue
    seen.append(s)
    out.append(Point("infer", f"lm_{tag(s)}",
                     {"model": lm_json, "settings": s,
                      "infer": {k: v for k, v in isheet.to_dict().items() if k != "sweep"}},
                     lambda s=s: _infer_point(lm, s, isheet)))
  out += _attack_points(sheet, results)
  return out


def run(sheet: ml_collections.ConfigDict, out: Path, *, only: tuple[str, ...] = (),
        stream=None) -> dict[str, int]:
  """Runs every point of `sheet` whose results are not yet in `out/results` (resuming).

  Args:
    sheet: a `configs/figures.py` run sheet.
    out: the output directory (results go to out/results).
    only: run only these experiments (record, verify, infer, attacks); () = all.
    stream: where the progress lines go (default stderr).

  Returns:
    {"ran": points run now, "skipped": points already there}.

  Raises:
    results.ResultsError: a results file that is present but not valid (never overwritten).
  """
  from aftune import jsonio  # pylint: disable=g-import-not-at-top
  from aftune import provenance  # pylint: disable=g-import-not-at-top

  results = out / "results"
  every = points(sheet, results)
  todo, skipped = [], 0
  for p in every:
    if only and p.experiment not in only:
      continue
    if res.read_point(p.path(results), p.sheet) is None:  # raises on a bad file: before any run
      todo.append(p)                                      # or any write
    else:
      skipped += 1
  results.mkdir(parents=True, exist_ok=True)
  sheet_json = json.loads(sheet.to_json_best_effort())
  jsonio.write_json(results / "run_sheet.json", {"scale": sheet.scale, "sheet": sheet_json,
                                                 "sheet_hash": res.sheet_hash(sheet_json)})
  prov = provenance.provenance()
  jsonio.write_json(results / "provenance.json", prov)
  # The figures read the points of this sheet only (not others left in the directory).
  jsonio.write_json(results / "index.json", {"sheet_hash": res.sheet_hash(sheet_json),
                                             "points": [f"{p.experiment}/{p.name}" for p in every]})
  progress = res.Progress(len(todo), stream=stream)
  if skipped:
    print(f"{skipped} points already in {results}: skipped", file=progress.stream, flush=True)
  made_by = {k: prov[k] for k in ("git_sha", "backend", "device_kind", "intra_op_threads")}
  for p in todo:
    if res.read_point(p.path(results), p.sheet) is None:  # a shared run may have written it
      rows = p.run()
      res.write_point(p.path(results), experiment=p.experiment, point=p.name, sheet=p.sheet,
                      rows=rows, made_by=made_by)
    progress.line(f"{p.experiment}/{p.name}")
  return {"ran": len(todo), "skipped": skipped}

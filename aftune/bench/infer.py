"""What auditable serving costs: recorded vs plain vs blocked generation, interleaved.

One batch of prompts is generated again and again by four variants of the same model
(same prompts, same settings, no stop token so that every variant runs max_new_tokens
steps), timed interleaved by `bench.time_interleaved` (one timed "step" = one whole
batch: prefill and every decode step):

  plain      `generate.generate_plain`: one jit for the prefill, one per decode step
  blocked    `generate.generate`: per-layer-block jitted calls, no observer
  observed   `generate.generate` with the `serving.InferenceRecorder` observer (hashes
             every boundary and keeps the stored tensors; nothing written)
  recorded   `serving.serve(..., record=True)`: the above plus the program
             fingerprint, the spec, the Merkle leaves, the compressed tensors and the
             signed commitment on disk: what a provider really pays per batch

Then the bytes committed per generated token (every file of one record) and the
verification time of single (block, step) cells (warm: each cell verified once first).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import ml_collections

from aftune import provenance
from aftune.audit import infer_provider
from aftune.audit import infer_verifier
from aftune.bench import timing as bench
from aftune.crypto import hashing
from aftune.data import encoding
from aftune.data import records as records_lib
from aftune.infer import generate as gen_lib
from aftune.infer import serving
from aftune.record import jobspec
from aftune.train import job as job_lib


def random_init_model(config: ml_collections.ConfigDict) -> serving.ServedModel:
  """The config's random-init base model, served under a declared hash."""
  job = job_lib.build_job(config)
  h = hashing.hexdigest(jobspec.model_hash(job.blocked))
  return serving.ServedModel(job.blocked, job.model_cfg, h, {"declared": h}, job.tokenizer,
                               job.template)


def bench_prompts(model: serving.ServedModel, train_path: str, n: int,
                  max_prompt_len: int = 64) -> list[list[int]]:
  """The prompts (turns before the last answer) of the first records that fit max_prompt_len."""
  out = []
  for conv in records_lib.load_jsonl(train_path):
    ids = encoding.encode_prompt(conv.prompt_and_response()[0], model.tokenizer, model.template)
    if len(ids) <= max_prompt_len:
      out.append(ids)
    if len(out) == n:
      return out
  if not out:
    raise ValueError(f"{train_path}: no prompt of at most {max_prompt_len} tokens")
  return [out[i % len(out)] for i in range(n)]  # too few records: repeat them


def bench_infer(model: serving.ServedModel, prompts: list[list[int]], *, max_new_tokens: int = 32,
                temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, rounds: int = 5,
                warmup: int = 1, verify_cells: int = 6, label: str = "") -> dict[str, Any]:
  """Times the four variants interleaved and measures storage and cell verification.

  Args:
    model: the served model.
    prompts: the batch (token ids per prompt).
    max_new_tokens, temperature, top_k, top_p: the generation settings (no stop token).
    rounds: timed batches per variant; warmup: untimed batches per variant first.
    verify_cells: at most this many cells to verify (spread over blocks and steps).
    label: a name for the report.

  Returns:
    A JSON-able dict (see `format_infer_bench`).
  """
  b = model.blocked
  settings = serving.ServeSettings(max_new_tokens=max_new_tokens, temperature=temperature,
                                     top_k=top_k, top_p=top_p, pad_id=model.tokenizer.pad_id)
  gen_kw = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k,
            "top_p": top_p, "pad_id": settings.pad_id}
  tmp = tempfile.TemporaryDirectory(prefix="aftune_bench_infer_")
  base = Path(tmp.name)
  records: list[Path] = []

  def plain(i):
    return gen_lib.generate_plain(b.specs, b.trainable, b.frozen, prompts, **gen_kw).token_array

  def blocked(i):
    return gen_lib.generate(b.specs, b.trainable, b.frozen, prompts, **gen_kw).token_array

  def observed(i):
    rec = serving.InferenceRecorder(b.num_blocks, settings.activation_interval)
    return gen_lib.generate(b.specs, b.trainable, b.frozen, prompts, observer=rec,
                            **gen_kw).token_array

  def recorded(i):
    records.append(base / f"batch_{i}")
    out = serving.serve(model, prompts, dataclasses.replace(settings, batch_id=i), records[-1],
                          key_path=base / "provider_key.pem")
    return out["result"].token_array

  fns = {"plain": plain, "blocked": blocked, "observed": observed, "recorded": recorded}
  timings = bench.time_interleaved(fns, steps=rounds, warmup=warmup, round_steps=1)
  tokens = {n: fn(-1) for n, fn in (("plain", plain), ("blocked", blocked))}
  record = records[-1]
  doc, spec, grid, _ = serving.load_record(record)
  gen_tokens = len(prompts) * grid.num_steps
  files = {p.name: p.stat().st_size for p in sorted(record.iterdir())}

  t0 = time.perf_counter()
  serving.program_fingerprint(b, *gen_lib.left_pad(prompts, settings.pad_id), spec["max_total_len"])
  fingerprint_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  provenance.environment_manifest()
  environment_s = time.perf_counter() - t0

  provider = infer_provider.InferenceProvider(record, model)
  ks = sorted({0, grid.num_layer_blocks // 2, grid.num_layer_blocks - 1})
  ts = sorted({grid.num_steps // 2, grid.num_steps - 1})
  cells = [(k, t) for t in ts for k in ks][:verify_cells]
  per_cell = []
  for k, t in cells:
    t0 = time.perf_counter()
    bundle = provider.open_cell(k, t)
    open_s = time.perf_counter() - t0
    infer_verifier.verify_inference_bundle(bundle, commitment=doc)  # compile (warm-up)
    t0 = time.perf_counter()
    rep = infer_verifier.verify_inference_bundle(bundle, commitment=doc)
    wall = time.perf_counter() - t0
    if not rep.passed:
      raise AssertionError(f"honest cell ({k}, {t}) rejected: {rep.check}: {rep.reason}")
    per_cell.append({"cell": [k, t], "verify_s": wall, "auth_s": rep.auth_s,
                     "replay_s": rep.replay_s, "open_s": open_s,
                     "bundle_tensor_bytes": sum(a.nbytes for a in bundle.tensors.values())})
  tmp.cleanup()
  n_params = sum(job_lib.count_params(p) for p in b.trainable) + sum(
      job_lib.count_params(f) for f in b.frozen)
  out = {
      "label": label, "num_params": n_params, "num_blocks": b.num_blocks,
      "units_per_block": grid.units_per_block, "batch": len(prompts),
      "prompt_lengths": [len(p) for p in prompts], "max_new_tokens": max_new_tokens,
      "steps": grid.num_steps, "generated_tokens": gen_tokens,
      "sampling": {"temperature": temperature, "top_k": top_k, "top_p": top_p},
      "rounds": rounds, "warmup": warmup,
      "timings": {n: t.to_json() for n, t in timings.items()},
      "tokens_per_s": {n: gen_tokens / t.median_s for n, t in timings.items()},
      "plain_equals_blocked": bool((tokens["plain"] == tokens["blocked"]).all()),
      "ratios": {f"{n}/plain": 1 / bench.time_ratio(t, timings["plain"])
                 for n, t in timings.items() if n != "plain"},
      "paired_ratios": {f"{n}/plain": 1 / bench.paired_ratio(t, timings["plain"])
                        for n, t in timings.items() if n != "plain"},
      "recorded/blocked": 1 / bench.time_ratio(timings["recorded"], timings["blocked"]),
      "program_fingerprint_s": fingerprint_s, "environment_manifest_s": environment_s,
      "record_bytes": files, "bytes_per_token": sum(files.values()) / gen_tokens,
      "cells": per_cell,
      "verify_cell_median_s": statistics.median(c["verify_s"] for c in per_cell),
      "environment": provenance.environment_manifest(),
  }
  return out


def format_infer_bench(r: dict[str, Any]) -> str:
  """The human-readable report of `bench_infer`."""
  env = r["environment"]
  rows = [[n, f"{t['median_s'] * 1e3:.1f}", f"{100 * t['rel_spread']:.1f}%",
           f"{r['tokens_per_s'][n]:,.1f}", f"{r['ratios'].get(f'{n}/plain', 1.0):.3f}",
           f"{r['paired_ratios'].get(f'{n}/plain', 1.0):.3f}"] for n, t in r["timings"].items()]
  table = bench.format_table(["variant", "ms/batch", "IQR/med", "tokens/s", "tok/s vs plain",
                              "paired"], rows)
  cells = bench.format_table(
      ["cell (k, t)", "verify ms", "auth ms", "replay ms", "open ms", "bundle tensors"],
      [[str(tuple(c["cell"])), f"{c['verify_s'] * 1e3:.1f}", f"{c['auth_s'] * 1e3:.1f}",
        f"{c['replay_s'] * 1e3:.1f}", f"{c['open_s'] * 1e3:.1f}",
        bench.fmt_bytes(c["bundle_tensor_bytes"])] for c in r["cells"]])
  files = "  ".join(f"{k} {bench.fmt_bytes(v)}" for k, v in r["record_bytes"].items())
  return "\n".join([
      f"model            {r['label'] or '(unnamed)'}: {r['num_params']:,} parameters "
      f"({r['num_params'] / 1e6:.1f}M), {r['num_blocks']} layer blocks of {r['units_per_block']} units",
      f"backend          {env['backend']} ({env['device_kind']}), intra-op pool of {env['intra_op_threads']} threads, "
      f"jax {env['packages']['jax']}",
      f"batch            {r['batch']} prompts of {min(r['prompt_lengths'])}..{max(r['prompt_lengths'])} "
      f"tokens x {r['steps']} new tokens = {r['generated_tokens']} generated tokens per batch; "
      f"sampling {r['sampling']}",
      f"timing           {r['rounds']} batches per variant after {r['warmup']} warmup, interleaved",
      "",
      table,
      "",
      f"recorded / plain    tokens/s {r['ratios']['recorded/plain']:.3f}x (paired "
      f"{r['paired_ratios']['recorded/plain']:.3f}x; target >= 0.95)",
      f"recorded / blocked  tokens/s {r['recorded/blocked']:.3f}x",
      f"recorded / plain without the per-batch program fingerprint (estimate: median minus "
      f"its time) {r['timings']['plain']['median_s'] / (r['timings']['recorded']['median_s'] - r['program_fingerprint_s']):.3f}x",
      f"plain and blocked tokens equal: {r['plain_equals_blocked']}",
      f"per served batch  program fingerprint {r['program_fingerprint_s'] * 1e3:.0f} ms, "
      f"environment manifest {r['environment_manifest_s'] * 1e3:.0f} ms (in 'recorded')",
      f"committed bytes    {bench.fmt_bytes(r['bytes_per_token'])} per generated token "
      f"({files})",
      "",
      f"verification of one (block, step) cell, warm: median {r['verify_cell_median_s'] * 1e3:.1f} ms",
      cells,
  ])


def to_json(r: dict[str, Any]) -> str:
  return json.dumps(r, indent=2, default=str)

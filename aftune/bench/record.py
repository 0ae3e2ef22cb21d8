"""What recording costs: plain vs blocked vs blocked+recording, interleaved in one process.

The recorded variant's rounds end only when its recorder has hashed and written every
step of the round (`Recorder.flush`), and checkpoints are saved every I_C step blocks as
in a real run, so its time covers all the recording work, none of it hidden in another
variant's round.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

import blake3
import jax
import ml_collections
import numpy as np

from aftune.bench import timing as bench
from aftune.crypto import hashing
from aftune.record import recorder as recorder_lib
from aftune.train import checkpoint as ckpt_lib
from aftune.train import job as job_lib
from aftune.train import loop
from aftune.train import step as step_lib


def hash_throughput(arrays: list[np.ndarray], repeats: int = 3) -> dict[str, float]:
  """GB/s of aftune's canonical tensor hash vs raw BLAKE3 over the same bytes."""
  nbytes = sum(a.nbytes for a in arrays)
  views = [np.ascontiguousarray(a).reshape(-1).view(np.uint8) for a in arrays]

  def best(fn):
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      fn()
      times.append(time.perf_counter() - t0)
    return min(times)

  t_ours = best(lambda: [hashing.hash_array(a) for a in arrays])
  t_raw = best(lambda: [blake3.blake3(v).digest() for v in views])
  return {"bytes": nbytes, "aftune_GBps": nbytes / t_ours / 1e9, "raw_blake3_GBps": nbytes / t_raw / 1e9,
          "ratio": t_ours / t_raw}


def bench_record(config: ml_collections.ConfigDict, *, steps: int = 16, warmup: int = 2,
                 round_steps: int = 4, workdir: str | Path | None = None,
                 torch: bool = False) -> dict[str, Any]:
  """Times plain, blocked and recorded steps of one job, interleaved.

  Args:
    config: a finetune config (its audit settings are the recorded variant's).
    steps, warmup, round_steps: see `bench.time_interleaved`.
    workdir: where the recorded variant writes (default: a temporary directory).
    torch: also time a plain transformers step of the same architecture
      (`bench/torch_ref.py`), the CPU speed baseline.

  Returns:
    A JSON-able dict: timings, ratios, bytes per step by category, hash throughput.
  """
  job = job_lib.build_job(config)
  total = warmup + steps
  job = dataclasses.replace(job, num_steps=total)
  tmp = None
  if workdir is None:
    tmp = tempfile.TemporaryDirectory(prefix="aftune_bench_record_")
    workdir = tmp.name
  workdir = Path(workdir)
  batches = [job.batch(i) for i in range(total)]
  keys = [job.step_key(i) for i in range(total)]
  specs, frozen, opt_cfg = job.blocked.specs, job.blocked.frozen, job.opt_cfg
  state = {n: (list(job.blocked.trainable), job.init_opt_states()) for n in ("plain", "blocked", "recorded")}
  b_s = int(config.audit.steps_per_block)
  ckpt_every = b_s * int(config.audit.checkpoint_interval)
  rec = recorder_lib.Recorder(workdir, job, key_path=workdir / "provider_key.pem")
  ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints")

  fns = step_lib.default_fns()

  def plain(i):
    p, o = state["plain"]
    p, o, loss, _ = fns.plain_step(specs, opt_cfg, p, o, frozen, batches[i][1], keys[i])
    state["plain"] = (p, o)
    return (p, loss), None

  def blocked(i):
    p, o = state["blocked"]
    p, o, tr = step_lib.blocked_step(specs, opt_cfg, p, o, frozen, batches[i][1], keys[i])
    state["blocked"] = (p, o)
    return (p, tr.loss), None

  def recorded(i):
    # The training loop itself, one step at a time: recorder hooks and checkpoints
    # every B_S * I_C steps, as in a recorded run.
    p, o = state["recorded"]
    losses = []
    out = loop.run_steps(job, loop.TrainState(i, p, o), i + 1, observer=rec, checkpointer=ckpt,
                         on_step=lambda t, loss, g, tr: losses.append(loss))
    state["recorded"] = (out.params, out.opt_states)
    return (out.params, losses[-1]), rec.flush

  def block(out):
    arrays, finish = out
    jax.block_until_ready(arrays)
    if finish is not None:
      finish()  # the recorded variant is done when its trace is on disk

  variants = {"plain": plain, "blocked": blocked, "recorded": recorded}
  if torch:
    from aftune.bench import torch_ref  # pylint: disable=g-import-not-at-top
    ref = torch_ref.step_fn(job.model_cfg, opt_cfg, [b for _, b in batches], seed=int(config.seed))
    if ref is not None:
      variants["torch"] = lambda i, f=ref[0]: (f(i), None)
  timings = bench.time_interleaved(variants, steps=steps, warmup=warmup, round_steps=round_steps,
                                   block=block)
  ckpt.wait()
  p, o = state["recorded"]
  rec.finish(total, p, o)
  rec.close()
  ckpt.close()
  storage = recorder_lib.storage_report(workdir, rec.grid)
  n_ckpts = len(ckpt.all_steps())
  per_step = dict(storage["bytes_per_step"])
  # Checkpoints were written n_ckpts times in `total` steps; in a real run once per I_C
  # step blocks: report the amortised cost of that period.
  for cat in ("parameters", "optimizer_state"):
    per_step[cat] = storage["bytes"][cat] / max(n_ckpts, 1) / ckpt_every
  # On disk, a checkpoint at step 0 (AdamW moments all zero) compresses away; the raw
  # size of one checkpoint per period is the figure that holds for a whole run.
  raw_per_step = {"parameters": sum(x.nbytes for x in jax.tree.leaves(p)) / ckpt_every,
                  "optimizer_state": sum(x.nbytes for x in jax.tree.leaves(o)) / ckpt_every}
  _, tr_batch = batches[0]
  p0 = job.blocked.trainable
  _, _, tr = step_lib.blocked_step(specs, opt_cfg, p0, job.init_opt_states(), frozen, tr_batch, keys[0])
  boundary = [np.asarray(x) for x in jax.device_get(tr.fwd_out + tr.bwd_in)]
  params = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(p0))]
  result = {
      "timings": {n: t.to_json() for n, t in timings.items()},
      "recorded_over_plain": bench.time_ratio(timings["recorded"], timings["plain"]),
      "recorded_over_plain_paired": bench.paired_ratio(timings["recorded"], timings["plain"]),
      "blocked_over_plain": bench.time_ratio(timings["blocked"], timings["plain"]),
      "recorded_over_blocked": bench.time_ratio(timings["recorded"], timings["blocked"]),
      **({f"{n}_over_torch": bench.time_ratio(timings[n], timings["torch"])
          for n in ("plain", "blocked", "recorded")} if "torch" in timings else {}),
      "recorder_timings_s": dict(rec.timings),
      "bytes_per_step": per_step,
      "checkpoint_raw_bytes_per_step": raw_per_step,
      "bytes_per_step_total": sum(per_step.values()),
      "hash_throughput_boundaries": hash_throughput(boundary),
      "hash_throughput_params": hash_throughput(params),
      "num_params": sum(job_lib.count_params(x) for x in p0) + sum(job_lib.count_params(f) for f in frozen),
      "grid": rec.grid.to_dict(),
  }
  if tmp is not None:
    tmp.cleanup()
  return result


def format_record_bench(r: dict[str, Any]) -> str:
  rows = [[n, f"{t['median_s'] * 1e3:.1f}", f"{t['steps_per_s']:.2f}", f"{t['rel_spread']:.1%}"]
          for n, t in r["timings"].items()]
  out = [f"{r['num_params'] / 1e6:.1f}M parameters, grid {r['grid']}",
         bench.format_table(["variant", "ms/step", "steps/s", "spread"], rows), "",
         f"recorded / plain   = {r['recorded_over_plain']:.3f} (paired {r['recorded_over_plain_paired']:.3f})",
         f"blocked / plain    = {r['blocked_over_plain']:.3f}",
         f"recorded / blocked = {r['recorded_over_blocked']:.3f}",
         *([f"vs torch (transformers, same architecture): plain {r['plain_over_torch']:.3f}, "
            f"blocked {r['blocked_over_torch']:.3f}, recorded {r['recorded_over_torch']:.3f}"]
           if "recorded_over_torch" in r else []),
         f"recorder worker: {r['recorder_timings_s']}", "", "bytes stored per step:"]
  out += [f"  {k:16s} {bench.fmt_bytes(v)}" for k, v in r["bytes_per_step"].items()]
  out.append(f"  {'total':16s} {bench.fmt_bytes(r['bytes_per_step_total'])}")
  out.append("  (checkpoints uncompressed, per step of their I_C period: " + ", ".join(
      f"{k} {bench.fmt_bytes(v)}" for k, v in r["checkpoint_raw_bytes_per_step"].items()) + ")")
  for name in ("boundaries", "params"):
    h = r[f"hash_throughput_{name}"]
    out.append(f"hash throughput ({name}, {bench.fmt_bytes(h['bytes'])}): aftune {h['aftune_GBps']:.2f} GB/s, "
               f"raw blake3 {h['raw_blake3_GBps']:.2f} GB/s (aftune/raw time {h['ratio']:.3f})")
  return "\n".join(out)

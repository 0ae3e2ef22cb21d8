"""What auditing costs: verification of a cell against the training time the cell represents.

A cell (layer block k, step block s) stands for B_S steps of block k's share of the
training step (its forward, backward and update). The share is measured by timing the
block functions one by one (synchronously) inside training steps; the cell's training
time is B_S x (measured step time) x share_k. Verification = authentication + replay,
as `train_verifier.verify_bundle` reports them; the provider's opening time is reported too.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections

from aftune.audit import train_provider
from aftune.audit import train_verifier
from aftune.train import job as job_lib
from aftune.train import step as step_lib
from aftune.train import trainer as train


class _TimedFns:
  """The job's block functions, each call synchronised and its time charged to its block.

  `blocked_step` calls fwd for blocks 0..K-1, bwd for K-1..0 and update for 0..K-1, so
  the calls of bwd and update are attributed by their order.
  """

  def __init__(self, fns: step_lib.BlockFns, n: int):
    self.fns, self.n = fns, n
    self.times = [0.0] * n
    self._bwd = self._upd = 0
    self.sq_norms, self.combine = fns.sq_norms, fns.combine  # not charged to a block

  def _timed(self, k, fn, *args):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    self.times[k] += time.perf_counter() - t0
    return out

  def fwd(self, spec, *args):
    return self._timed(spec.index, self.fns.fwd, spec, *args)

  def bwd(self, *args):
    self._bwd += 1
    return self._timed(self.n - 1 - (self._bwd - 1) % self.n, self.fns.bwd, *args)

  def update(self, *args):
    self._upd += 1
    return self._timed((self._upd - 1) % self.n, self.fns.update, *args)


def block_shares(job: job_lib.Job, steps: int = 3) -> tuple[list[float], float]:
  """Per-block fraction of a blocked step's time, and the (pipelined) step time in s."""
  specs, frozen, opt_cfg = job.blocked.specs, job.blocked.frozen, job.opt_cfg
  params, opt = list(job.blocked.trainable), job.init_opt_states()
  n = len(specs)
  per_block = [0.0] * n
  for t in range(steps + 1):  # step 0 compiles
    _, batch = job.batch(t)
    timed = _TimedFns(step_lib.default_fns(), n)
    params, opt, _ = step_lib.blocked_step(specs, opt_cfg, params, opt, frozen, batch,
                                           job.step_key(t), fns=timed)
    if t:
      per_block = [a + b for a, b in zip(per_block, timed.times)]
  total = sum(per_block)
  step_times = []
  params, opt = list(job.blocked.trainable), job.init_opt_states()
  for t in range(steps + 1):
    _, batch = job.batch(t)
    t0 = time.perf_counter()
    params, opt, tr = step_lib.blocked_step(specs, opt_cfg, params, opt, frozen, batch, job.step_key(t))
    jax.block_until_ready((params, tr.loss))
    if t:
      step_times.append(time.perf_counter() - t0)
  return [b / total for b in per_block], statistics.median(step_times)


def bench_verify(config: ml_collections.ConfigDict, *, num_step_blocks: int = 2,
                 audit_fraction: float = 0.1, workdir: str | Path | None = None,
                 cold: bool = True) -> dict[str, Any]:
  """Records `num_step_blocks` step blocks, then opens and verifies every cell of them.

  Args:
    config: a finetune config (its grid is the audited one).
    num_step_blocks: how many step blocks to train and audit.
    audit_fraction: the share of cells of a whole run an audit would check.
    workdir: where to record (default: a temporary directory).
    cold: clear JAX's caches before the first cell, so that it compiles as in a fresh
      verifier process (False: reuse what this process compiled; quicker, for smoke runs).

  Returns:
    A JSON-able dict of per-cell times and the ratios.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  config.num_steps = int(config.audit.steps_per_block) * num_step_blocks
  config.num_epochs = 0.0
  tmp = None
  if workdir is None:
    tmp = tempfile.TemporaryDirectory(prefix="aftune_bench_verify_")
    workdir = tmp.name
  t0 = time.perf_counter()
  result = train.train(config, workdir)
  train_s = time.perf_counter() - t0
  job = result.job
  shares, step_s = block_shares(job)
  provider = train_provider.Provider(workdir)
  commitment = provider.commitment
  b_s = int(config.audit.steps_per_block)
  cells = []
  if cold:
    jax.clear_caches()  # the first verification compiles, as a fresh verifier process would
  for s in range(provider.grid.num_step_blocks):
    for k in range(provider.grid.num_layer_blocks):
      t_open = time.perf_counter()
      b = provider.open_cell(k, s)
      open_s = time.perf_counter() - t_open
      r = train_verifier.verify_bundle(b, commitment=commitment)
      if not r.passed:
        raise RuntimeError(f"honest cell ({k}, {s}) failed: {r.reason}")
      train_cell_s = b_s * step_s * shares[k]
      cells.append({"layer_block": k, "step_block": s, "open_s": open_s, "auth_s": r.auth_s,
                    "replay_s": r.replay_s, "verify_s": r.auth_s + r.replay_s,
                    "train_cell_s": train_cell_s,
                    "verify_over_train": (r.auth_s + r.replay_s) / train_cell_s})
  warm = [c for c in cells if c["step_block"] > 0] or cells
  median = lambda key, cs=warm: statistics.median(c[key] for c in cs)
  n_cells = provider.grid.num_layer_blocks * provider.grid.num_step_blocks
  verify_all = sum(c["verify_s"] for c in warm) / len(warm) * n_cells
  open_all = sum(c["open_s"] for c in warm) / len(warm) * n_cells
  run_train_s = step_s * provider.grid.num_steps
  out = {
      "num_params": sum(job_lib.count_params(p) for p in job.blocked.trainable)
                    + sum(job_lib.count_params(f) for f in job.blocked.frozen),
      "grid": provider.grid.to_dict(),
      "step_s": step_s,
      "block_shares": shares,
      "cells": cells,
      "median_verify_over_train": median("verify_over_train"),
      "median_auth_s": median("auth_s"),
      "median_replay_s": median("replay_s"),
      "median_open_s": median("open_s"),
      "cold_first_cell_verify_s": cells[0]["verify_s"],
      "audit_fraction": audit_fraction,
      "audit_cost_over_training": audit_fraction * verify_all / run_train_s,
      "opening_cost_over_training": audit_fraction * open_all / run_train_s,
      "recorded_training_wall_s": train_s,
      # What the client keeps to audit this run later: the signed commitment and the job
      # spec it agreed to (docs/audit.md); the trace itself stays with the provider.
      "client_bytes": {name: (Path(workdir) / rel).stat().st_size
                       for name, rel in (("commitment", "commitment.json"),
                                         ("job_spec", "trace/job_spec.json"))},
  }
  if tmp is not None:
    tmp.cleanup()
  return out


def format_verify_bench(r: dict[str, Any]) -> str:
  g = r["grid"]
  lines = [f"{r['num_params'] / 1e6:.1f}M parameters; grid {g['num_layer_blocks']} layer blocks x "
           f"{g['num_step_blocks']} step blocks, B_S={g['steps_per_block']}, B_L={g['units_per_block']}",
           f"training step {r['step_s'] * 1e3:.1f} ms; block shares "
           + ", ".join(f"{s:.2f}" for s in r["block_shares"]),
           "", "cell      open s  auth s  replay s  train-share s  verify/train"]
  for c in r["cells"]:
    lines.append(f"({c['layer_block']},{c['step_block']})  {c['open_s']:7.3f} {c['auth_s']:7.3f} "
                 f"{c['replay_s']:9.3f} {c['train_cell_s']:14.3f} {c['verify_over_train']:12.2f}")
  lines += ["",
            f"one cell: verification (auth + replay) / training time it represents = "
            f"{r['median_verify_over_train']:.2f} (median over warm cells; the first, cold cell "
            f"took {r['cold_first_cell_verify_s']:.2f} s with compilation)",
            f"auditing {r['audit_fraction']:.0%} of all cells costs {r['audit_cost_over_training']:.3f} of "
            f"the training time (verifier) and {r['opening_cost_over_training']:.3f} (provider's opening)"]
  return "\n".join(lines)

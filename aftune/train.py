"""The fine-tuning loop: blocked (auditable) or plain steps, checkpoints, resume, metrics.

A run is a pure function of its config: batch order from (seed, N, step), step keys
from fold_in(root, step), state only from the previous state. So a run killed and
resumed from its last checkpoint ends bitwise equal to an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Protocol

import jax
import ml_collections
import numpy as np
from absl import logging

from aftune import checkpoint as ckpt_lib
from aftune import job as job_lib
from aftune import optim
from aftune import provenance
from aftune import recorder as recorder_lib
from aftune import step as step_lib

PyTree = Any


class StepObserver(Protocol):
  """What the loop tells a recorder (`recorder.Recorder`). Arrays may still be in flight."""

  def step_block_start(self, step: int, params: list[PyTree], opt_states: list[PyTree]) -> None:
    ...

  def after_step(self, step: int, indices: np.ndarray, batch: dict[str, jax.Array],
                 step_key: jax.Array, trace: step_lib.StepTrace) -> None:
    ...

  def before_checkpoint(self, step: int) -> None:
    ...

  def finish(self, step: int, params: list[PyTree], opt_states: list[PyTree]) -> Any:
    ...

  def close(self) -> None:
    ...


class NonFiniteLossError(FloatingPointError):
  pass


@dataclasses.dataclass
class TrainResult:
  params: list[PyTree]
  opt_states: list[PyTree]
  step: int  # steps completed
  losses: list[float]  # per step, of this process's steps
  job: job_lib.Job


def _check_or_write_config(workdir: Path, config: ml_collections.ConfigDict) -> None:
  """A workdir belongs to one config: resuming under another one would mix two runs."""
  path = workdir / "config.json"
  new = json.loads(config.to_json_best_effort(sort_keys=True))
  if path.exists():
    try:
      old = json.loads(path.read_text())
    except json.JSONDecodeError as e:
      raise job_lib.ConfigError(f"{path}: not valid JSON ({e}); refusing to touch this workdir")
    if old != new:
      diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
      raise job_lib.ConfigError(
          f"{path}: the workdir holds a run with another config (differs in {diff}); "
          "use a new --workdir")
    return
  recorder_lib.write_json(path, new)


def _checkpoint_items(params: list[PyTree], opt_states: list[PyTree]) -> dict[str, PyTree]:
  items = {f"params_{k}": p for k, p in enumerate(params)}
  items.update({f"opt_state_{k}": o for k, o in enumerate(opt_states)})
  return items


def restore_state(checkpointer: ckpt_lib.Checkpointer, step: int, job: job_lib.Job,
                  blocks: list[int] | None = None) -> tuple[list[PyTree], list[PyTree]]:
  """Params and optimizer state at `step` (optionally of some layer blocks only)."""
  opt0 = job.init_opt_states()
  blocks = list(range(job.blocked.num_blocks)) if blocks is None else blocks
  abstract = {f"params_{k}": job.blocked.trainable[k] for k in blocks}
  abstract.update({f"opt_state_{k}": opt0[k] for k in blocks})
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), abstract)
  items = checkpointer.restore(step, abstract)
  return [items[f"params_{k}"] for k in blocks], [items[f"opt_state_{k}"] for k in blocks]


class _Progress:
  """Rate and ETA over the steps this process ran."""

  def __init__(self, start_step: int, total: int):
    self.start_step, self.total, self.t0 = start_step, total, time.perf_counter()

  def line(self, step: int) -> tuple[str, float]:
    done = step - self.start_step
    dt = time.perf_counter() - self.t0
    rate = done / dt if dt > 0 else 0.0
    eta = (self.total - step) / rate if rate > 0 else float("nan")
    return f"{rate:.2f} steps/s, ETA {eta:.0f}s", rate


def train(config: ml_collections.ConfigDict, workdir: str | Path, *,
          stop_after_steps: int | None = None, job: job_lib.Job | None = None,
          tamper: Any = None) -> TrainResult:
  """Runs (or resumes) the fine-tuning job in `workdir`.

  Args:
    config: a `configs/finetune.py` config.
    workdir: where config.json, provenance.json, metrics.jsonl, checkpoints/ and (when
      config.record) the trace and commitment.json go.
    stop_after_steps: stop (as if killed, after the last checkpoint save) once this
      process has run this many steps; for tests of resume.
    job: a prebuilt job (otherwise built from config).
    tamper: a dishonest provider's deviations (aftune/attacks.py), for tests and
      detection experiments; None for an honest run.

  Returns:
    The final state and the losses of the steps this process ran.
  """
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  _check_or_write_config(workdir, config)
  job = job or job_lib.build_job(config)
  recorder_lib.write_json(workdir / "provenance.json", provenance.provenance())
  b_s = int(config.audit.steps_per_block)
  ckpt_every = b_s * int(config.audit.checkpoint_interval)

  if config.record and config.step_impl != "blocked":
    raise job_lib.ConfigError("record=True needs step_impl='blocked' (the plain step is the "
                              "unaudited baseline); set --config.record=False")
  checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints")
  latest = checkpointer.latest_step()
  start = latest or 0
  done = start == job.num_steps and (not config.record or (workdir / "commitment.json").exists())
  observer = None
  if config.record and not done:
    observer = recorder_lib.Recorder(
        workdir, job, start_step=start,
        key_path=config.audit.provider_key or workdir / "provider_key.pem")
  if latest is not None:
    params, opt_states = restore_state(checkpointer, start, job)
    logging.info("resumed from checkpoint at step %d", start)
  else:
    params, opt_states = list(job.blocked.trainable), job.init_opt_states()
    if tamper is not None:
      params = tamper.initial(params)
    if observer is not None:
      observer.before_checkpoint(0)
    checkpointer.save(0, _checkpoint_items(params, opt_states), {"step": 0})
  _truncate_metrics(workdir / "metrics.jsonl", start)
  n_trainable = sum(job_lib.count_params(p) for p in params)
  n_total = n_trainable + sum(job_lib.count_params(f) for f in job.blocked.frozen)
  logging.info("model %s: %d params (%d trainable) in %d layer blocks; %d steps of batch %d",
               job.model_cfg.arch, n_total, n_trainable, job.blocked.num_blocks, job.num_steps,
               config.batch_size)

  progress = _Progress(start, job.num_steps)
  losses: list[float] = []
  pending: list[tuple[int, Any, Any]] = []  # (step, loss, grad_norm) still on device
  specs, frozen = job.blocked.specs, job.blocked.frozen
  metrics_f = open(workdir / "metrics.jsonl", "a")

  def drain(keep: int) -> None:
    # Reading a loss blocks on its step, so read it one step late: the next step is
    # already dispatched and the device never idles on the host.
    while len(pending) > keep:
      s, loss, g_norm = pending.pop(0)
      loss_f = float(loss)
      if not math.isfinite(loss_f):
        raise NonFiniteLossError(f"loss is {loss_f} at step {s} (workdir {workdir})")
      losses.append(loss_f)
      if (s + 1) % config.log_every == 0 or s + 1 == job.num_steps:
        rate_msg, rate = progress.line(s + 1)
        lr = optim.learning_rate_at(job.opt_cfg, s)
        logging.info("step %d/%d  loss %.4f  grad_norm %.4f  lr %.3g  | %s", s + 1, job.num_steps,
                     loss_f, float(g_norm), lr, rate_msg)
        metrics_f.write(json.dumps({"step": s + 1, "loss": loss_f, "grad_norm": float(g_norm),
                                    "learning_rate": lr, "steps_per_sec": rate}) + "\n")
        metrics_f.flush()

  step = start
  try:
    while step < job.num_steps:
      if stop_after_steps is not None and step - start >= stop_after_steps:
        break
      indices, batch = job.batch(step)
      step_key = job.step_key(step)
      opt_cfg = job.opt_cfg
      if tamper is not None:
        indices, batch = tamper.batch(step, indices, batch, job)
        opt_cfg = tamper.opt_cfg(step, opt_cfg)
      if observer is not None and step % b_s == 0:
        observer.step_block_start(step, params, opt_states)
      if config.step_impl == "plain":
        params, opt_states, loss, g_norm = step_lib.plain_step(specs, opt_cfg, params, opt_states,
                                                               frozen, batch, step_key)
      else:
        new_params, new_opt, trace = step_lib.blocked_step(specs, opt_cfg, params, opt_states,
                                                           frozen, batch, step_key)
        if tamper is not None:
          new_params, new_opt, trace = tamper.after_step(step, params, opt_states, new_params,
                                                         new_opt, trace)
        params, opt_states = new_params, new_opt
        loss, g_norm = trace.loss, trace.grad_norm
        if observer is not None:
          observer.after_step(step, indices, batch, step_key, trace)
      pending.append((step, loss, g_norm))
      drain(keep=1)
      step += 1
      if tamper is not None and step == job.num_steps:
        params = tamper.final(params)  # e.g. a layer edited after training
      if step % ckpt_every == 0 or step == job.num_steps:
        if observer is not None:
          observer.before_checkpoint(step)
        checkpointer.save(step, _checkpoint_items(params, opt_states), {"step": step}, wait=False)
    drain(keep=0)
    if observer is not None and step == job.num_steps:
      observer.finish(step, params, opt_states)
  finally:
    metrics_f.close()
    checkpointer.close()
    if observer is not None:
      observer.close()
  return TrainResult(params=params, opt_states=opt_states, step=step, losses=losses, job=job)


def _truncate_metrics(path: Path, start: int) -> None:
  """Drops metric rows past the checkpoint we resume from: they will be recomputed."""
  if not path.exists():
    return
  keep = []
  for line in path.read_text().splitlines():
    try:
      if json.loads(line)["step"] <= start:
        keep.append(line)
    except (json.JSONDecodeError, KeyError):
      continue  # a line torn by a kill
  path.write_text("".join(l + "\n" for l in keep))

"""The fine-tuning loop: blocked (auditable) or plain steps, checkpoints, resume, metrics.

A run is a pure function of its config: batch order from (seed, N, step), step keys
from fold_in(root, step), state only from the previous state. So a run killed and
resumed from its last checkpoint ends bitwise equal to an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import ml_collections
from absl import logging

from aftune import errors
from aftune import jsonio
from aftune import platform_flags
from aftune import provenance
from aftune.record import recorder as recorder_lib
from aftune.train import checkpoint as ckpt_lib
from aftune.train import job as job_lib
from aftune.train import loop
from aftune.train import mesh as mesh_lib
from aftune.train import multihost
from aftune.train import optim

PyTree = Any


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
    old = jsonio.load_json(path, errors.ConfigError, "refusing to touch this workdir")
    if old != new:
      diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
      raise errors.ConfigError(
          f"{path}: the workdir holds a run with another config (differs in {diff}); "
          "use a new --workdir")
    return
  jsonio.write_json(path, new)


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


def apply_platform(config: ml_collections.ConfigDict, num_processes: int = 1) -> None:
  """The run sheet's platform settings, applied before JAX starts (or already in effect):
  the intra-op pool size and the GPU determinism flags (committed in the job spec); on the
  CPU, a mesh's host devices (its size over the processes of the run)."""
  platform = config.get("platform", {})
  threads = int(platform.get("intra_op_threads", 0))
  if threads:
    provenance.set_intra_op_threads(threads)
  deterministic = bool(platform.get("gpu_deterministic", False))
  autotune = str(platform.get("gpu_autotune", "default"))
  if deterministic or autotune != "default":
    platform_flags.apply(platform_flags.gpu_flags(deterministic=deterministic, autotune=autotune))
  mesh = mesh_lib.spec_from_sheet(config)
  if mesh is not None:  # a mesh on the CPU needs that many host devices
    if mesh.size % num_processes:
      raise errors.ConfigError(f"a mesh of {mesh.size} devices cannot be split over "
                               f"{num_processes} processes")
    mesh_lib.force_host_devices(mesh.size // num_processes)


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
    tamper: a dishonest provider's deviations (aftune/attacks/training.py), for tests and
      detection experiments; None for an honest run.

  Returns:
    The final state and the losses of the steps this process ran.
  """
  workdir = Path(workdir)
  apply_platform(config)
  if config.record and config.step_impl != "blocked":
    raise errors.ConfigError("record=True needs step_impl='blocked' (the plain step is the "
                              "unaudited baseline); set --config.record=False")
  # Bad input (a corrupt example, a wrong checkpoint) fails here, before anything is written.
  job = job or job_lib.build_job(config)
  primary = multihost.is_primary()  # with several processes, only process 0 writes files
  workdir.mkdir(parents=True, exist_ok=True)
  if primary:
    _check_or_write_config(workdir, config)
    jsonio.write_json(workdir / "provenance.json", provenance.provenance())
  multihost.barrier("aftune-config")  # a refused workdir stops the others before they touch it
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
    params, opt_states = loop.restore_state(checkpointer, start, job)
    logging.info("resumed from checkpoint at step %d", start)
  else:
    params, opt_states = list(job.blocked.trainable), job.init_opt_states()
    if tamper is not None:
      params = tamper.initial(params)
    if observer is not None:
      observer.before_checkpoint(0)
    loop.save_state(checkpointer, loop.TrainState(0, params, opt_states))
  if primary:
    _truncate_metrics(workdir / "metrics.jsonl", start)
  n_trainable = sum(job_lib.count_params(p) for p in params)
  n_total = n_trainable + sum(job_lib.count_params(f) for f in job.blocked.frozen)
  logging.info("model %s: %d params (%d trainable) in %d layer blocks; %d steps of batch %d",
               job.model_cfg.arch, n_total, n_trainable, job.blocked.num_blocks, job.num_steps,
               config.batch_size)

  progress = _Progress(start, job.num_steps)
  losses: list[float] = []
  pending: list[tuple[int, Any, Any]] = []  # (step, loss, grad_norm) still on device
  metrics_f = open(workdir / "metrics.jsonl" if primary else os.devnull, "a")

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

  def on_step(t, loss, g_norm, trace):
    del trace
    pending.append((t, loss, g_norm))
    drain(keep=1)

  stop = job.num_steps if stop_after_steps is None else min(job.num_steps, start + stop_after_steps)
  state = loop.TrainState(start, params, opt_states)
  try:
    state = loop.run_steps(job, state, stop, hooks=tamper, observer=observer,
                           checkpointer=checkpointer, on_step=on_step,
                           plain=config.step_impl == "plain")
    drain(keep=0)
    if observer is not None and state.step == job.num_steps:
      # The commitment's storage report counts the checkpoints on disk: the last one's
      # asynchronous save must be finished, not half-written, when it is measured.
      checkpointer.wait()
      observer.finish(state.step, state.params, state.opt_states)
  finally:
    metrics_f.close()
    checkpointer.close()
    if observer is not None:
      observer.close()
  return TrainResult(params=state.params, opt_states=state.opt_states, step=state.step,
                     losses=losses, job=job)


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

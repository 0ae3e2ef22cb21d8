"""Phase 1: records a blocked training run into a signed, Merkle-committed trace.

The training thread only enqueues device arrays (the step is already dispatched); a
worker thread fetches, hashes and writes them, in leaf order, behind the computation.
The queue is bounded: a slow disk slows training down rather than filling memory.

Workdir layout written here:
  trace/job_spec.json       the canonical job spec (hash = job id)
  trace/leaves.bin          one fixed-size record per Merkle leaf (see aftune/trace.py)
  trace/steps/<t>.fwd.safetensors.zst   indices, loss, grad norm, per-block norm partials,
                                        fwd_out[k] for stored blocks (every I_A)
  trace/steps/<t>.bwd.safetensors.zst   bwd_in[k] for stored blocks
  trace/roots/<t>.json      signed root of the leaves before step t (every checkpoint)
  commitment.json           the signed commitment: job id, root, counts, grid
  storage.json              bytes stored per category
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import Any
from typing import Callable

import jax
import numpy as np
from absl import logging

from aftune import jsonio
from aftune.crypto import hashing
from aftune.crypto import signing
from aftune.record import commitment as commitment_lib
from aftune.record import jobspec
from aftune.record import layout as trace
from aftune.record import tensorfile
from aftune.train import job as job_lib

PyTree = Any


def step_file(workdir: Path, step: int, direction: str) -> Path:
  return Path(workdir) / "trace" / "steps" / f"{step:08d}.{direction}{tensorfile.SUFFIX}"


def load_or_create_key(path: Path):
  path = Path(path)
  if not path.exists():
    path.parent.mkdir(parents=True, exist_ok=True)
    signing.generate_key(path)
    logging.info("generated provider key %s", path)
  return signing.load_private_key(path)


class Recorder:
  """Implements `train.loop.StepObserver`; one per (process, run)."""

  def __init__(self, workdir: str | Path, job: job_lib.Job, *, key_path: str | Path,
               start_step: int = 0, queue_size: int = 2):
    self.workdir = Path(workdir)
    self.job = job
    self.grid = jobspec.make_grid(job)
    self.key = load_or_create_key(Path(key_path))
    tdir = self.workdir / "trace"
    for sub in ("steps", "roots"):
      (tdir / sub).mkdir(parents=True, exist_ok=True)
    spec = jobspec.build_job_spec(job)
    spec_path = tdir / "job_spec.json"
    if spec_path.exists():
      old = jsonio.load_json(spec_path, trace.TraceError, "job spec")
      if old != spec:
        diff = sorted(k for k in set(old) | set(spec) if old.get(k) != spec.get(k))
        raise trace.TraceError(f"{spec_path}: this workdir was recorded under another job spec "
                               f"(differs in {diff}); the environment or program changed")
    else:
      jsonio.write_json(spec_path, spec)
    self.spec = spec
    self.job_id = jobspec.job_id(spec)
    leaves_path = tdir / "leaves.bin"
    # A run killed before its first checkpoint resumes at step 0 too: keep the job_spec leaf.
    resume = leaves_path.exists() and leaves_path.stat().st_size >= trace.RECORD.size
    self.writer = trace.LeafWriter(leaves_path, self.grid,
                                   resume_at=self.grid.offset(start_step) if resume else 0)
    if self.writer.size == 0:
      self.writer.append(trace.Leaf("job_spec", -1, -1, self.job_id))
    # hash_s/write_s: the worker's own work; fetch_s: the worker waiting for the device;
    # wait_s: the training thread waiting for the worker (backpressure and flushes).
    self.timings = {"hash_s": 0.0, "write_s": 0.0, "fetch_s": 0.0, "wait_s": 0.0}
    self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
    self._error: BaseException | None = None
    self._thread = threading.Thread(target=self._work, name="aftune-recorder", daemon=True)
    self._thread.start()

  # ---- called from the training loop -------------------------------------------

  def step_block_start(self, step: int, params: list[PyTree], opt_states: list[PyTree]) -> None:
    self._put(self._record_state, step, params, opt_states)

  def after_step(self, step: int, indices: np.ndarray, batch: dict[str, jax.Array],
                 step_key: jax.Array, tr: Any) -> None:
    self._put(self._record_step, step, indices, batch, step_key, tr)

  def before_checkpoint(self, step: int) -> None:
    """Everything before `step` is on disk and under a signed root before the checkpoint."""
    self._put(self._emit_root, step)
    self.flush()

  def finish(self, step: int, params: list[PyTree], opt_states: list[PyTree]) -> dict:
    self._put(self._record_state, step, params, opt_states)
    self.flush()
    return self._commit(params)

  def flush(self) -> None:
    t0 = time.perf_counter()
    self._queue.join()
    self.timings["wait_s"] += time.perf_counter() - t0
    self._raise_if_failed()

  def close(self) -> None:
    if self._thread.is_alive():
      self._queue.put(None)
      self._thread.join()
    self.writer.close()

  # ---- worker --------------------------------------------------------------------

  def _put(self, fn: Callable, *args) -> None:
    self._raise_if_failed()
    t0 = time.perf_counter()
    self._queue.put((fn, args))  # blocks when the worker is behind: backpressure
    self.timings["wait_s"] += time.perf_counter() - t0

  def _raise_if_failed(self) -> None:
    if self._error is not None:
      raise RuntimeError(f"recorder for {self.workdir} failed: {self._error}") from self._error

  def _work(self) -> None:
    while True:
      item = self._queue.get()
      try:
        if item is None:
          return
        if self._error is None:
          fn, args = item
          fn(*args)
      except BaseException as e:  # reported to the training thread at its next call
        self._error = e
      finally:
        self._queue.task_done()

  def _append(self, kind: str, step: int, block: int, payload: bytes) -> None:
    self.writer.append(trace.Leaf(kind, step, block, payload))

  def _record_state(self, step: int, params: list[PyTree], opt_states: list[PyTree]) -> None:
    t_wait = time.perf_counter()
    params, opt_states = jax.device_get((params, opt_states))
    t0 = time.perf_counter()
    self.timings["fetch_s"] += t0 - t_wait
    params_h = [hashing.hash_pytree(p) for p in params]
    opt_h = [hashing.hash_pytree(o) for o in opt_states]
    self.timings["hash_s"] += time.perf_counter() - t0
    for k, h in enumerate(params_h):
      self._append("params", step, k, h)
    for k, h in enumerate(opt_h):
      self._append("opt_state", step, k, h)

  def _record_step(self, step: int, indices: np.ndarray, batch: dict, step_key: jax.Array,
                   tr: Any) -> None:
    t_wait = time.perf_counter()
    # Blocks until the step has been computed: waiting, not recording work.
    fwd, bwd, partials, loss, g_norm, batch, units = jax.device_get(
        (tr.fwd_out, tr.bwd_in, tr.sq_norm_partials, tr.loss, tr.grad_norm, dict(batch),
         tr.unit_out))
    t0 = time.perf_counter()
    self.timings["fetch_s"] += t0 - t_wait
    loss, g_norm = np.asarray(loss), np.asarray(g_norm)
    indices = np.asarray(indices, np.int64)
    globals_h = {
        "indices": hashing.hash_array(indices),
        "batch": hashing.hash_batch(batch),
        "step_key": hashing.hash_key(step_key),
        "loss": hashing.hash_array(loss),
        "grad_norm": hashing.hash_array(g_norm),
    }
    block_h = {
        "fwd_out": [hashing.hash_array(x) for x in fwd],
        "bwd_in": [hashing.hash_array(x) for x in bwd],
        "sq_norms": [hashing.hash_array(x) for x in partials],
    }
    unit_h = [hashing.hash_array(x) for block_units in units for x in block_units]
    t1 = time.perf_counter()
    self.timings["hash_s"] += t1 - t0
    k_count = self.grid.num_layer_blocks
    fwd_file = {"indices": indices, "loss": loss, "grad_norm": g_norm}
    fwd_file.update({f"sq_norms/{k}": np.asarray(p) for k, p in enumerate(partials)})
    fwd_file.update({f"fwd_out/{k}": fwd[k] for k in range(k_count) if self.grid.stores_boundary(k)})
    bwd_file = {f"bwd_in/{k}": bwd[k] for k in range(k_count) if self.grid.stores_boundary(k)}
    tensorfile.write(step_file(self.workdir, step, "fwd"), fwd_file)
    tensorfile.write(step_file(self.workdir, step, "bwd"), bwd_file)
    self.timings["write_s"] += time.perf_counter() - t1
    for kind in trace.GLOBAL_KINDS:
      self._append(kind, step, -1, globals_h[kind])
    for kind in trace.BLOCK_KINDS:
      for k in range(k_count):
        self._append(kind, step, k, block_h[kind][k])
    for u, h in zip(self.grid.inner_units, unit_h, strict=True):
      self._append("unit_out", step, u, h)

  def _emit_root(self, step: int) -> None:
    """Signs the root of every leaf before `step` (periodic: history cannot be rewritten)."""
    self.writer.sync()
    size = self.writer.size
    if size != self.grid.offset(step):
      raise trace.TraceError(f"root at step {step}: {size} leaves, expected {self.grid.offset(step)}")
    doc = {"format": commitment_lib.ROOT_FORMAT, "job_id": hashing.hexdigest(self.job_id), "step": step,
           "size": size, "root": hashing.hexdigest(self.writer.tree.root())}
    path = self.workdir / "trace" / "roots" / f"{step:08d}.json"
    if path.exists():  # written before a crash: the resumed run must reproduce it
      old = jsonio.load_json(path, trace.TraceError, "signed root")
      if old.get("root") != doc["root"] or old.get("size") != size:
        raise trace.TraceError(f"{path}: the resumed run's root differs from the signed one "
                               "written before the interruption")
      return
    jsonio.write_json(path, signing.sign_document(doc, self.key))

  def _commit(self, final_params: list[PyTree]) -> dict:
    self.writer.sync()
    if self.writer.size != self.grid.num_leaves:
      raise trace.TraceError(f"trace has {self.writer.size} leaves, the grid needs {self.grid.num_leaves}")
    doc = {
        "format": commitment_lib.TRAINING_FORMAT,
        "job_id": hashing.hexdigest(self.job_id),
        "merkle_root": hashing.hexdigest(self.writer.tree.root()),
        "num_leaves": self.writer.size,
        "grid": self.grid.to_dict(),
        "base_model_hash": self.spec["base_model_hash"],
        "final_model_hash": hashing.hexdigest(jobspec.model_hash(self.job.blocked, final_params)),
    }
    doc = signing.sign_document(doc, self.key)
    jsonio.write_json(self.workdir / "commitment.json", doc)
    jsonio.write_json(self.workdir / "storage.json", storage_report(self.workdir, self.grid))
    logging.info("committed: job %s root %s (%d leaves)", doc["job_id"][:16], doc["merkle_root"][:16],
                 doc["num_leaves"])
    return doc


def _dir_bytes(path: Path) -> int:
  return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def storage_report(workdir: Path, grid: trace.Grid) -> dict:
  """Bytes on disk per category, total and per step."""
  workdir = Path(workdir)
  cats = {"parameters": 0, "optimizer_state": 0, "activations": 0, "cotangents": 0, "hashes": 0}
  for step_dir in (workdir / "checkpoints").glob("*"):
    for item in step_dir.glob("*"):
      if item.name.startswith("params_"):
        cats["parameters"] += _dir_bytes(item)
      elif item.name.startswith("opt_state_"):
        cats["optimizer_state"] += _dir_bytes(item)
  for f in (workdir / "trace" / "steps").glob("*"):
    cats["activations" if ".fwd." in f.name else "cotangents"] += f.stat().st_size
  tdir = workdir / "trace"
  cats["hashes"] = sum(f.stat().st_size for f in [tdir / "leaves.bin", tdir / "job_spec.json"]
                       if f.exists()) + _dir_bytes(tdir / "roots")
  return {"bytes": cats, "total_bytes": sum(cats.values()), "num_steps": grid.num_steps,
          "bytes_per_step": {k: v / grid.num_steps for k, v in cats.items()}}

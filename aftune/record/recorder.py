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
  trace/steps/<t>.{fwd,bwd}.p<i>.safetensors.zst   with several processes: process i's rows
                                        of those boundary tensors, as `name@first_row` (each
                                        process writes its own shards; `read_step` joins them)
  trace/roots/<t>.json      signed root of the leaves before step t (every checkpoint)
  commitment.json           the signed commitment: job id, root, counts, grid
  storage.json              bytes stored per category
"""

from __future__ import annotations

import queue
import threading
import time
import types
from pathlib import Path
from typing import Any
from typing import Callable

import jax
import numpy as np
from absl import logging

from aftune import jsonio
from aftune.crypto import hashing
from aftune.crypto import shards
from aftune.crypto import signing
from aftune.record import commitment as commitment_lib
from aftune.record import jobspec
from aftune.record import layout as trace
from aftune.record import tensorfile
from aftune.train import job as job_lib
from aftune.train import multihost

PyTree = Any


def step_file(workdir: Path, step: int, direction: str) -> Path:
  return Path(workdir) / "trace" / "steps" / f"{step:08d}.{direction}{tensorfile.SUFFIX}"


def process_step_files(workdir: Path, step: int, direction: str) -> list[Path]:
  """The per-process files of a step recorded by several processes (each holds its rows)."""
  d = Path(workdir) / "trace" / "steps"
  return sorted(d.glob(f"{step:08d}.{direction}.p*{tensorfile.SUFFIX}"))


def read_step(workdir: Path, step: int, direction: str) -> dict[str, np.ndarray]:
  """A step file's tensors; with several processes, each boundary tensor is assembled from
  the row runs `name@first_row` that each process wrote of its own shards."""
  out = tensorfile.read(step_file(workdir, step, direction))
  pieces: dict[str, list[tuple[int, np.ndarray, Path]]] = {}
  for f in process_step_files(workdir, step, direction):
    for name, arr in tensorfile.read(f).items():
      base, _, lo = name.rpartition("@")
      if not base or not lo.isdigit():
        raise trace.TraceError(f"{f}: tensor {name!r} is not a row run name@first_row")
      pieces.setdefault(base, []).append((int(lo), arr, f))
  for base, runs in pieces.items():
    runs.sort(key=lambda r: r[0])
    if len(runs) == 1 and runs[0][0] == 0:  # held whole by one process (e.g. the loss)
      out[base] = runs[0][1]
      continue
    at = 0
    for lo, arr, f in runs:
      if lo != at or arr.ndim == 0 or arr.shape[1:] != runs[0][1].shape[1:]:
        raise trace.TraceError(f"{f}: rows of {base!r} from {lo} do not continue the runs "
                               f"of the other processes (expected row {at})")
      at += arr.shape[0]
    if base in out:
      raise trace.TraceError(f"{step_file(workdir, step, direction)}: {base!r} is both whole "
                             "and in per-process row runs")
    out[base] = np.concatenate([r[1] for r in runs])
  return out


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
    # Several processes: each hashes what it holds on the training thread and the parts are
    # merged there (train/multihost.py); only the primary process writes and signs.
    self.multi = jax.process_count() > 1
    self.primary = multihost.is_primary()
    spec = jobspec.build_job_spec(job)
    self.spec = spec
    self.job_id = jobspec.job_id(spec)
    self.timings = {"hash_s": 0.0, "write_s": 0.0, "fetch_s": 0.0, "wait_s": 0.0}
    # Logical bytes committed, and bytes this process copied off its devices to hash them.
    self.transfer = {"bytes_hashed": 0, "bytes_fetched": 0}
    self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
    self._error: BaseException | None = None
    self.writer = None
    if self.primary:
      self._open_trace(spec, key_path, start_step)
    self._thread = threading.Thread(target=self._work, name="aftune-recorder", daemon=True)
    self._thread.start()

  def _open_trace(self, spec: dict, key_path: str | Path, start_step: int) -> None:
    self.key = load_or_create_key(Path(key_path))
    tdir = self.workdir / "trace"
    for sub in ("steps", "roots"):
      (tdir / sub).mkdir(parents=True, exist_ok=True)
    spec_path = tdir / "job_spec.json"
    if spec_path.exists():
      old = jsonio.load_json(spec_path, trace.TraceError, "job spec")
      if old != spec:
        diff = sorted(k for k in set(old) | set(spec) if old.get(k) != spec.get(k))
        raise trace.TraceError(f"{spec_path}: this workdir was recorded under another job spec "
                               f"(differs in {diff}); the environment or program changed")
    else:
      jsonio.write_json(spec_path, spec)
    leaves_path = tdir / "leaves.bin"
    # A run killed before its first checkpoint resumes at step 0 too: keep the job_spec leaf.
    resume = leaves_path.exists() and leaves_path.stat().st_size >= trace.RECORD.size
    self.writer = trace.LeafWriter(leaves_path, self.grid,
                                   resume_at=self.grid.offset(start_step) if resume else 0)
    if self.writer.size == 0:
      self.writer.append(trace.Leaf("job_spec", -1, -1, self.job_id))
    # hash_s/write_s: the worker's own work; fetch_s: the worker waiting for the device;
    # wait_s: the training thread waiting for the worker (backpressure and flushes).

  # ---- called from the training loop -------------------------------------------

  def step_block_start(self, step: int, params: list[PyTree], opt_states: list[PyTree]) -> None:
    if self.multi:
      self._put_primary(self._append_state, step, *self._state_digests(params, opt_states))
    else:
      self._put(self._record_state, step, params, opt_states)

  def after_step(self, step: int, indices: np.ndarray, batch: dict[str, jax.Array],
                 step_key: jax.Array, tr: Any) -> None:
    if self.multi:
      t0 = time.perf_counter()
      digests = self._step_digests(indices, batch, step_key, tr)
      t1 = time.perf_counter()
      host = self._step_host_values(tr, multihost.host_value, boundaries=False)  # scalars
      rows = self._own_rows(tr)  # this process's rows of the stored boundary tensors
      self.timings["hash_s"] += t1 - t0
      self.timings["fetch_s"] += time.perf_counter() - t1
      self._put(self._write_rows, step, rows)
      self._put_primary(self._write_step, step, np.asarray(indices, np.int64), host, digests)
    else:
      self._put(self._record_step, step, indices, batch, step_key, tr)

  def before_checkpoint(self, step: int) -> None:
    """Everything before `step` is on disk and under a signed root before the checkpoint."""
    self._put_primary(self._emit_root, step)
    self.flush()

  def finish(self, step: int, params: list[PyTree], opt_states: list[PyTree]) -> dict | None:
    self.step_block_start(step, params, opt_states)
    self.flush()
    # The final model hash: with several processes its parts are merged on every process.
    final_hash = jobspec.model_hash(self.job.blocked, params)
    doc = self._commit(final_hash) if self.primary else None
    multihost.barrier("aftune-commit")
    return doc

  def flush(self) -> None:
    t0 = time.perf_counter()
    self._queue.join()
    self.timings["wait_s"] += time.perf_counter() - t0
    self._raise_if_failed()

  def close(self) -> None:
    if self._thread.is_alive():
      self._queue.put(None)
      self._thread.join()
    if self.writer is not None:
      self.writer.close()
    # What this process moved to hash (docs/sharding.md's benchmark reads these files).
    stats = {"process": jax.process_index(), "processes": jax.process_count(),
             "bytes_hashed": self.transfer["bytes_hashed"],
             "bytes_fetched": self.transfer["bytes_fetched"],
             "timings": self.timings}
    jsonio.write_json(self.workdir / f"recorder_stats.p{jax.process_index()}.json", stats)

  def _fetch_all(self, tree: Any) -> Any:
    """The host values (shard by shard: `shards.host_copy`), counted as bytes copied off the
    devices to hash them."""
    out = jax.tree.map(shards.host_copy, tree)
    self.transfer["bytes_fetched"] += sum(np.asarray(x).nbytes for x in jax.tree.leaves(out))
    return out

  def _global_digests(self, items: list) -> list[bytes]:
    """`multihost.global_digests`, counting what this process copied off its devices."""
    before = hashing.BYTES_FETCHED[0]
    out = multihost.global_digests(items)
    self.transfer["bytes_fetched"] += hashing.BYTES_FETCHED[0] - before
    return out

  def _count(self, trees: Any) -> None:
    self.transfer["bytes_hashed"] += sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize
                                         for x in jax.tree.leaves(trees)
                                         if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key))

  # ---- worker --------------------------------------------------------------------

  def _put(self, fn: Callable, *args) -> None:
    self._raise_if_failed()
    t0 = time.perf_counter()
    self._queue.put((fn, args))  # blocks when the worker is behind: backpressure
    self.timings["wait_s"] += time.perf_counter() - t0

  def _put_primary(self, fn: Callable, *args) -> None:
    if self.primary:
      self._put(fn, *args)

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
    # Copies shard by shard on this thread, then only host work: a computation across
    # devices dispatched from here beside the training thread's collectives can leave an
    # in-process rendezvous short (shards.host_copy). One process holds every shard anyway.
    params, opt_states = self._fetch_all((params, opt_states))
    t0 = time.perf_counter()
    self.timings["fetch_s"] += t0 - t_wait
    self._count((params, opt_states))
    params_h = [hashing.hash_pytree(p) for p in params]
    opt_h = [hashing.hash_pytree(o) for o in opt_states]
    self.timings["hash_s"] += time.perf_counter() - t0
    self._append_state(step, params_h, opt_h)

  def _append_state(self, step: int, params_h: list[bytes], opt_h: list[bytes]) -> None:
    for k, h in enumerate(params_h):
      self._append("params", step, k, h)
    for k, h in enumerate(opt_h):
      self._append("opt_state", step, k, h)

  def _state_digests(self, params: list[PyTree], opt_states: list[PyTree]) -> tuple[list, list]:
    t0 = time.perf_counter()
    self._count((params, opt_states))
    d = self._global_digests([("pytree", p) for p in params] + [("pytree", o) for o in opt_states])
    self.timings["hash_s"] += time.perf_counter() - t0
    return d[:len(params)], d[len(params):]

  def _step_digests(self, indices: np.ndarray, batch: dict, step_key: jax.Array, tr: Any) -> dict:
    """Every digest of step's leaves (the values may span processes: `global_digests`)."""
    units = [x for block_units in tr.unit_out for x in block_units]
    items = ([("tensor", np.asarray(indices, np.int64)), ("batch", dict(batch)),
              ("tensor", tr.loss), ("tensor", tr.grad_norm)]
             + [("tensor", x) for x in (*tr.fwd_out, *tr.bwd_in, *tr.sq_norm_partials, *units)])
    self._count([v for _, v in items])
    d = self._global_digests(items) if self.multi else [
        hashing.hash_batch(v) if kind == "batch" else hashing.hash_array(v) for kind, v in items]
    k_count = self.grid.num_layer_blocks
    blocks = d[4:]
    return {
        "indices": d[0], "batch": d[1], "step_key": hashing.hash_key(step_key), "loss": d[2],
        "grad_norm": d[3],
        "fwd_out": blocks[:k_count], "bwd_in": blocks[k_count:2 * k_count],
        "sq_norms": blocks[2 * k_count:3 * k_count], "unit_out": blocks[3 * k_count:],
    }

  def _step_host_values(self, tr: Any, fetch: Callable, boundaries: bool = True) -> dict:
    """What the step files hold: small scalars and the stored blocks' boundary tensors."""
    out = {"loss": fetch(tr.loss), "grad_norm": fetch(tr.grad_norm)}
    out.update({f"sq_norms/{k}": fetch(p) for k, p in enumerate(tr.sq_norm_partials)})
    for k in range(self.grid.num_layer_blocks):
      if boundaries and self.grid.stores_boundary(k):
        out[f"fwd_out/{k}"] = fetch(tr.fwd_out[k])
        out[f"bwd_in/{k}"] = fetch(tr.bwd_in[k])
    return out

  def _record_step(self, step: int, indices: np.ndarray, batch: dict, step_key: jax.Array,
                   tr: Any) -> None:
    t_wait = time.perf_counter()
    # Blocks until the step has been computed (waiting, not recording work), then copies
    # (see _record_state: nothing else touches the devices from this thread).
    fields = ("fwd_out", "bwd_in", "sq_norm_partials", "loss", "grad_norm", "unit_out")
    *values, batch = self._fetch_all((*(getattr(tr, f) for f in fields), dict(batch)))
    tr = types.SimpleNamespace(**dict(zip(fields, values)))
    t0 = time.perf_counter()
    self.timings["fetch_s"] += t0 - t_wait
    digests = self._step_digests(indices, batch, step_key, tr)
    self.timings["hash_s"] += time.perf_counter() - t0
    host = self._step_host_values(tr, np.asarray)
    self._write_step(step, np.asarray(indices, np.int64), host, digests)

  def _own_rows(self, tr: Any) -> dict[str, dict[str, np.ndarray]]:
    """Per direction, `name@first_row` -> the rows of each stored boundary tensor that this
    process writes (the rows it holds and no lower process does; `shards.writer_rows`)."""
    out: dict[str, dict[str, np.ndarray]] = {"fwd": {}, "bwd": {}}
    for k in range(self.grid.num_layer_blocks):
      if self.grid.stores_boundary(k):
        for direction, name, x in (("fwd", f"fwd_out/{k}", tr.fwd_out[k]),
                                   ("bwd", f"bwd_in/{k}", tr.bwd_in[k])):
          if shards.needs_regroup(x):  # a collective, on the training thread of every process
            x = shards.row_layout(x)
          for lo, rows in shards.writer_rows(x):
            out[direction][f"{name}@{lo}"] = rows
    return out

  def _write_rows(self, step: int, rows: dict[str, dict[str, np.ndarray]]) -> None:
    t0 = time.perf_counter()
    for direction, tensors in rows.items():
      path = step_file(self.workdir, step, direction)
      path = path.with_name(path.name.replace(f".{direction}.", f".{direction}.p{jax.process_index()}."))
      tensorfile.write(path, tensors)
    self.timings["write_s"] += time.perf_counter() - t0

  def _write_step(self, step: int, indices: np.ndarray, host: dict, digests: dict) -> None:
    t1 = time.perf_counter()
    fwd_file = {"indices": indices}
    fwd_file.update({k: v for k, v in host.items() if not k.startswith("bwd_in/")})
    bwd_file = {k: v for k, v in host.items() if k.startswith("bwd_in/")}
    tensorfile.write(step_file(self.workdir, step, "fwd"), fwd_file)
    tensorfile.write(step_file(self.workdir, step, "bwd"), bwd_file)
    self.timings["write_s"] += time.perf_counter() - t1
    for kind in trace.GLOBAL_KINDS:
      self._append(kind, step, -1, digests[kind])
    for kind in trace.BLOCK_KINDS:
      for k in range(self.grid.num_layer_blocks):
        self._append(kind, step, k, digests[kind][k])
    for u, h in zip(self.grid.inner_units, digests["unit_out"], strict=True):
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

  def _commit(self, final_model_hash: bytes) -> dict:
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
        "final_model_hash": hashing.hexdigest(final_model_hash),
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

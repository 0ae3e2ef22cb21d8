"""The serving engine: batches concurrent requests, generates, records, issues receipts.

One worker thread owns the model and the jitted generation functions. Requests arrive from
any thread (`submit`) or from the HTTP server's event loop; the worker takes the first
waiting request, waits up to `batch_window_s` for more (up to `max_batch`), groups them by
sampling settings (temperature, top-k, top-p: a batch shares them), pads each group to a
shape bucket (rows: a power of two, with filler rows; prompt width: a multiple of
`prompt_bucket`) so that a few compiled programs serve every batch, and runs it. A second
thread writes each recorded batch whole (`request_record.write_batch`) while the next one
is generated, and only then releases its responses: a receipt is never issued for something not on disk, and a
server killed mid-batch leaves no partial record (the temporary directory is removed at
the next start). Tokens are streamed per step to requests that asked for it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import queue
import shutil
import threading
import time
from pathlib import Path
from typing import Any
from typing import Callable

import numpy as np
from absl import logging

from aftune import provenance
from aftune.infer import generate as gen_lib
from aftune.infer import request_record as rr
from aftune.infer import serving


@dataclasses.dataclass
class EngineSettings:
  max_batch: int = 8  # rows per batch at most (a power of two: the largest row bucket)
  batch_window_s: float = 0.02  # how long the first request of a batch waits for others
  max_tokens_cap: int = 64  # the largest max_tokens a request may ask for
  default_max_tokens: int = 16
  prompt_bucket: int = 16  # prompt widths are padded up to a multiple of this
  max_prompt_tokens: int = 512
  activation_interval: int = 1  # I_A: store every I_A-th block's outputs
  record: bool = True  # False: serve without recording (the unaudited baseline)


def settings_from_sheet(sheet: Any) -> EngineSettings:
  """EngineSettings from the `server` part of a `configs/serve.py` run sheet."""
  return EngineSettings(**{f.name: type(f.default)(sheet[f.name])
                           for f in dataclasses.fields(EngineSettings) if f.name in sheet})


@dataclasses.dataclass
class Result:
  """What a request gets back: its output, and its receipt when the batch was recorded."""
  request_id: str
  tokens: list[int]
  finish_reason: str
  prompt_tokens: int
  receipt: dict | None
  batch_id: int
  row: int
  queued_s: float
  batch_s: float


@dataclasses.dataclass
class _Pending:
  request: rr.Request
  future: concurrent.futures.Future
  on_token: Callable[[int], None] | None
  arrived: float


def _bucket_rows(n: int, max_batch: int) -> int:
  b = 1
  while b < n:
    b *= 2
  return min(b, max_batch) if n <= max_batch else n


class Engine:
  """Serves the model of `model` with batching; records batches under `serving_dir`.

  Args:
    model: the served model (`serving.load_from_training`).
    serving_dir: where batches go (`batches/<id>/`); batch ids continue after the last
      one there.
    settings: batching, limits and recording.
    key_path: the provider's Ed25519 key (signs every batch).
    hooks: a dishonest server's deviations (`aftune/attacks/serving.py`: the weights it
      serves, its block outputs, tokens, keys); None: honest.
  """

  def __init__(self, model: serving.ServedModel, serving_dir: str | Path,
               settings: EngineSettings, *, key_path: str | Path,
               hooks: gen_lib.ServeHooks | None = None):
    self.hooks = hooks or gen_lib.Honest()
    self.model, self.settings = self.hooks.served(model), settings
    self.dir = Path(serving_dir)
    self.batches = self.dir / "batches"
    self.batches.mkdir(parents=True, exist_ok=True)
    for tmp in self.batches.glob(".tmp-*"):  # a batch written when the server was killed:
      shutil.rmtree(tmp)  # no receipt was issued for it
    ids = [int(p.name) for p in self.batches.glob("[0-9]*") if p.name.isdigit()]
    self.next_batch_id = max(ids) + 1 if ids else 0
    # request id -> receipt file: read once here, then added to as batches are written.
    self._receipts = rr.receipt_index(self.batches)
    self.key = rr.new_key(Path(key_path))
    self.environment = provenance.environment_manifest()
    self.tokenizer = model.tokenizer
    self.stop_tokens = (self.tokenizer.eos_id,) if self.tokenizer is not None else ()
    self.pad_id = self.tokenizer.pad_id if self.tokenizer is not None else 0
    self._queue: queue.Queue[_Pending | None] = queue.Queue()
    self._writes: queue.Queue = queue.Queue(maxsize=2)  # generation runs at most 2 batches ahead
    self._thread: threading.Thread | None = None
    self._writer: threading.Thread | None = None
    self.stats = {"batches": 0, "requests": 0, "rows": 0, "tokens": 0, "generate_s": 0.0,
                  "write_s": 0.0}

  # ----------------------------------------------------------------- lifecycle

  def start(self) -> "Engine":
    if self._thread is None:
      self._writer = threading.Thread(target=self._write_loop, name="aftune-writer", daemon=True)
      self._writer.start()
      self._thread = threading.Thread(target=self._run, name="aftune-engine", daemon=True)
      self._thread.start()
    return self

  def stop(self) -> None:
    """Serves what was queued, writes every generated batch, then stops both threads."""
    if self._thread is not None:
      self._queue.put(None)
      self._thread.join()
      self._writes.put(None)
      self._writer.join()
      self._thread = self._writer = None

  def warmup(self, prompt_len: int = 8) -> float:
    """Compiles the programs of every row bucket for one prompt width; returns seconds."""
    start = time.perf_counter()
    b = 1
    while b <= self.settings.max_batch:
      reqs = [rr.new_request([self.pad_id + 1] * prompt_len, max_tokens=2, seed=0)
              for _ in range(b)]
      self._generate(reqs, record=False)
      b *= 2
    return time.perf_counter() - start

  # ----------------------------------------------------------------- requests

  def submit(self, request: rr.Request, on_token: Callable[[int], None] | None = None
             ) -> concurrent.futures.Future:
    """Queues a request; the future's result is a `Result` (or the batch's exception)."""
    if len(request.prompt) > self.settings.max_prompt_tokens:
      raise ValueError(f"the prompt has {len(request.prompt)} tokens, this server takes at most "
                       f"{self.settings.max_prompt_tokens}")
    if request.max_tokens > self.settings.max_tokens_cap:
      raise ValueError(f"max_tokens {request.max_tokens} is over this server's limit "
                       f"{self.settings.max_tokens_cap}")
    vocab = int(self.model.model_cfg.vocab_size)
    if any(not 0 <= x < vocab for x in request.prompt):
      raise ValueError(f"prompt token ids must be in 0..{vocab - 1}")
    fut: concurrent.futures.Future = concurrent.futures.Future()
    self._queue.put(_Pending(request, fut, on_token, time.perf_counter()))
    return fut

  def receipt_path(self, request_id: str) -> Path | None:
    """Where the receipt of `request_id` is kept (None: no recorded batch holds it)."""
    return self._receipts.get(request_id) if rr.is_request_id(request_id) else None

  # ----------------------------------------------------------------- the worker

  def _run(self) -> None:
    while True:
      first = self._queue.get()
      if first is None:
        return
      pending = [first]
      deadline = time.perf_counter() + self.settings.batch_window_s
      stop = False
      while len(pending) < self.settings.max_batch:
        wait = deadline - time.perf_counter()
        if wait <= 0:
          break
        try:
          item = self._queue.get(timeout=wait)
        except queue.Empty:
          break
        if item is None:
          stop = True
          break
        pending.append(item)
      groups: dict[tuple, list[_Pending]] = {}
      for p in pending:
        groups.setdefault(p.request.group, []).append(p)
      for group in groups.values():
        self._serve(group)
      if stop:
        return

  def _serve(self, group: list[_Pending]) -> None:
    """Generates the group's batch here; the writer thread records it and answers."""
    start = time.perf_counter()
    try:
      finish = self._run_batch(group)
    except Exception as e:  # pylint: disable=broad-except  # every waiting client hears of it
      self._fail(group, e)
      return
    self.stats["generate_s"] += time.perf_counter() - start
    self._writes.put((group, finish, start))

  def _fail(self, group: list[_Pending], e: Exception) -> None:
    logging.exception("batch failed")
    for p in group:
      if not p.future.done():
        p.future.set_exception(e)

  def _write_loop(self) -> None:
    """Writes each batch whole, in order, then releases its responses: the next batch is
    generated meanwhile (recording overlaps generation; nothing is answered before it is
    on disk)."""
    while True:
      item = self._writes.get()
      if item is None:
        return
      group, finish, start = item
      t0 = time.perf_counter()
      try:
        results = finish()
      except Exception as e:  # pylint: disable=broad-except
        self._fail(group, e)
        continue
      self.stats["write_s"] += time.perf_counter() - t0
      done = time.perf_counter()
      for p, res in zip(group, results):
        res.queued_s = start - p.arrived
        res.batch_s = done - start
        if not p.future.done():  # a client that went away (the record stays)
          p.future.set_result(res)

  def _generate(self, requests: list[rr.Request], *, record: bool,
                streams: list | None = None) -> tuple[gen_lib.GenerationResult, Any]:
    s = self.settings
    b = self.model.blocked
    longest = max(len(r.prompt) for r in requests)
    width = -(-longest // s.prompt_bucket) * s.prompt_bucket
    max_new = max(r.max_tokens for r in requests)
    temperature, top_k, top_p = requests[0].sampling
    stop_tokens = () if requests[0].ignore_eos else self.stop_tokens
    rec = rr.RowRecorder(s.activation_interval) if record else None

    def observer(t, ins, outs, logits, tokens, keys):
      if rec is not None:
        rec(t, ins, outs, logits, tokens, keys)
      if streams:
        toks = np.asarray(tokens)
        for row, cb in enumerate(streams):
          if cb is not None and t < requests[row].max_tokens:
            cb(t, int(toks[row]))

    result = self.hooks.generate(
        gen_lib.generate, b.specs, b.trainable, b.frozen, [r.prompt for r in requests],
        max_new_tokens=max_new, hooks=self.hooks,
        temperature=temperature, top_k=top_k, top_p=top_p, stop_tokens=stop_tokens,
        pad_id=self.pad_id, max_total_len=width + s.max_tokens_cap, observer=observer,
        row_seeds=[r.seed for r in requests], row_max_new_tokens=[r.max_tokens for r in requests],
        prompt_width=width)
    return result, rec

  def _run_batch(self, group: list[_Pending]) -> Callable[[], list[Result]]:
    """Generates the batch; returns what records it and builds the results (the writer's)."""
    s = self.settings
    requests = [p.request for p in group]
    rows = _bucket_rows(len(requests), s.max_batch)
    fillers = rows - len(requests)
    requests += [rr.filler_request(self.pad_id, requests[0])] * fillers
    done_rows: set[int] = set()

    def stream(row: int, cb):
      def emit(t: int, token: int):
        if row not in done_rows:
          cb(token)
          if token in self.stop_tokens and not group[row].request.ignore_eos:
            done_rows.add(row)
      return emit

    streams = [stream(i, p.on_token) if p.on_token else None for i, p in enumerate(group)]
    result, rec = self._generate(requests, record=s.record, streams=streams)
    batch_id = self.next_batch_id
    self.next_batch_id += 1
    fingerprint = (serving.program_fingerprint(self.model.blocked, result.prompt_ids,
                                               result.attn_mask, result.max_total_len)
                   if s.record else None)  # lowered here: JAX stays on this thread

    def finish() -> list[Result]:
      receipts: list[dict | None] = [None] * len(group)
      if s.record:
        temperature, top_k, top_p = requests[0].sampling
        batch_dir, _, issued = rr.write_batch(
            self.batches, batch_id, model=self.model, requests=requests, result=result, rec=rec,
            sampling_group={"temperature": temperature, "top_k": top_k, "top_p": top_p},
            stop_tokens=() if requests[0].ignore_eos else self.stop_tokens, pad_id=self.pad_id,
            activation_interval=s.activation_interval, environment=self.environment,
            key=self.key, fillers=fillers, program_fingerprint=fingerprint)
        receipts = list(issued)
        self._receipts.update({r["request_id"]: batch_dir / "receipts" / f"{r['request_id']}.json"
                               for r in issued})
      self.stats["batches"] += 1
      self.stats["requests"] += len(group)
      self.stats["rows"] += rows
      self.stats["tokens"] += sum(len(result.tokens[i]) for i in range(len(group)))
      return [Result(p.request.request_id, list(map(int, result.tokens[i])),
                     result.finish_reasons[i], len(p.request.prompt), receipts[i], batch_id, i,
                     0.0, 0.0) for i, p in enumerate(group)]

    return finish

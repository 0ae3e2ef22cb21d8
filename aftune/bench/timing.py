"""Side-by-side timing of step functions, and the blocked-vs-plain training benchmark.

On a shared CPU the machine's speed drifts by tens of percent within a minute, so two
variants timed one after the other are not comparable. `time_interleaved` runs them in
alternating rounds (round robin, the starting variant rotating), so both see the same
drift; report their ratio, and medians over rounds rather than means.

Generic helpers (reused by the record/verify benchmarks):
  time_interleaved(step_fns, steps=, warmup=, round_steps=) -> {name: Timing}
  Timing: per-round seconds per step; .median_s, .iqr_s, .rel_spread, .steps_per_s
  time_ratio(num, den): ratio of medians; paired_ratio(num, den): median of per-round ratios
  format_table(header, rows), peak_rss_bytes(), fmt_bytes(n)
The training benchmark:
  bench_train(config, steps=, warmup=, round_steps=) -> TrainBench; format_train_bench(r)
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.metadata
import resource
import statistics
import sys
import time
from typing import Any
from typing import Callable
from typing import Mapping
from typing import Sequence

import jax
import ml_collections
import numpy as np

from aftune import provenance
from aftune.model import family
from aftune.train import job as job_lib
from aftune.train import step as step_lib

StepFn = Callable[[int], Any]  # runs step i, returns arrays that depend on all its work


@dataclasses.dataclass(frozen=True)
class Timing:
  """One variant's timed rounds: `round_s[r]` is round r's wall time / its step count."""
  name: str
  round_s: tuple[float, ...]
  steps: int  # timed steps in all (warmup excluded)

  def _quantile(self, q: float) -> float:
    return float(np.quantile(np.asarray(self.round_s), q))

  @property
  def median_s(self) -> float:
    return float(statistics.median(self.round_s))

  @property
  def iqr_s(self) -> float:
    """Interquartile range of the per-round seconds per step."""
    return self._quantile(0.75) - self._quantile(0.25)

  @property
  def rel_spread(self) -> float:
    """IQR / median: the noise to read the median (and ratios of medians) against."""
    return self.iqr_s / self.median_s if self.median_s > 0 else float("nan")

  @property
  def min_s(self) -> float:
    return min(self.round_s)

  @property
  def max_s(self) -> float:
    return max(self.round_s)

  @property
  def steps_per_s(self) -> float:
    return 1.0 / self.median_s if self.median_s > 0 else float("inf")

  def to_json(self) -> dict[str, Any]:
    return {"name": self.name, "steps": self.steps, "rounds": len(self.round_s),
            "median_s": self.median_s, "iqr_s": self.iqr_s, "rel_spread": self.rel_spread,
            "min_s": self.min_s, "max_s": self.max_s, "steps_per_s": self.steps_per_s,
            "round_s": list(self.round_s)}


def time_interleaved(step_fns: Mapping[str, StepFn], *, steps: int, warmup: int = 1,
                     round_steps: int = 1, timer: Callable[[], float] = time.perf_counter,
                     block: Callable[[Any], Any] = jax.block_until_ready,
                     on_warmup_done: Callable[[str], None] | None = None) -> dict[str, Timing]:
  """Times named step functions interleaved, compilation (warmup) excluded.

  Every variant is called with the same step indices: 0..warmup-1 untimed (each variant
  in turn, blocking after each call), then warmup..warmup+steps-1 in rounds of
  `round_steps` consecutive steps. A round dispatches its steps back to back and blocks
  once on the last result, as a training loop lets the device run ahead of the host;
  each step function keeps its own state (a closure), so a variant continues from where
  its last round left it. Round r runs the variants in their given order rotated by r,
  so none is always first after another's.

  Args:
    step_fns: name -> fn(step_index) returning arrays that depend on all of that step's
      work (blocking on them means the step is done).
    steps: timed steps per variant.
    warmup: untimed steps per variant first (at least 1 to exclude compilation).
    round_steps: steps per variant per round (the last round may be shorter).
    timer, block: the clock and the wait-for-device function (injectable for tests).
    on_warmup_done: called with each variant's name after its warmup (e.g. to read
      peak memory, which compilation and the first steps set).

  Returns:
    name -> Timing, in the order of `step_fns`.
  """
  if steps < 1 or warmup < 0 or round_steps < 1:
    raise ValueError(f"need steps >= 1, warmup >= 0, round_steps >= 1; got {steps}, {warmup}, "
                     f"{round_steps}")
  if not step_fns:
    raise ValueError("no step functions to time")
  names = list(step_fns)
  for name in names:
    for i in range(warmup):
      block(step_fns[name](i))
    if on_warmup_done is not None:
      on_warmup_done(name)
  rounds: dict[str, list[float]] = {n: [] for n in names}
  starts = list(range(warmup, warmup + steps, round_steps))
  for r, first in enumerate(starts):
    n_steps = min(round_steps, warmup + steps - first)
    for name in names[r % len(names):] + names[:r % len(names)]:
      fn = step_fns[name]
      gc_was_enabled = gc.isenabled()
      gc.disable()  # a collection inside one variant's round would be charged to it alone
      try:
        t0 = timer()
        out = None
        for i in range(first, first + n_steps):
          out = fn(i)
        block(out)
        t1 = timer()
      finally:
        if gc_was_enabled:
          gc.enable()
      del out
      rounds[name].append((t1 - t0) / n_steps)
  return {n: Timing(n, tuple(rounds[n]), steps) for n in names}


def time_ratio(num: Timing, den: Timing) -> float:
  """num's median time per step / den's."""
  return num.median_s / den.median_s


def paired_ratio(num: Timing, den: Timing) -> float:
  """Median over rounds of num's / den's time in the same round.

  Rounds of the two variants run back to back, so each pair sees about the same machine
  load; under drift (another job starting or stopping) this is steadier than the ratio
  of medians, which compares different moments.
  """
  if len(num.round_s) != len(den.round_s):
    raise ValueError(f"{num.name} has {len(num.round_s)} rounds, {den.name} {len(den.round_s)}")
  return float(statistics.median(a / b for a, b in zip(num.round_s, den.round_s)))


def peak_rss_bytes() -> int:
  """This process's peak resident set size so far."""
  kib_or_b = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(kib_or_b if sys.platform == "darwin" else kib_or_b * 1024)  # Linux: KiB


def fmt_bytes(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if abs(n) < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
    n /= 1024
  raise AssertionError("unreachable")


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A plain-text table: first column left-aligned, the rest right-aligned."""
  cells = [[str(h) for h in header]] + [[str(c) for c in row] for row in rows]
  if any(len(r) != len(header) for r in cells):
    raise ValueError("every row needs one cell per header column")
  widths = [max(len(r[j]) for r in cells) for j in range(len(header))]

  def line(r):
    return "  ".join(c.ljust(w) if j == 0 else c.rjust(w)
                     for j, (c, w) in enumerate(zip(r, widths)))

  rule = "  ".join("-" * w for w in widths)
  return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


# ---------------------------------------------------------------- the training benchmark


@dataclasses.dataclass
class TrainBench:
  """Blocked vs plain steps of one job, timed interleaved on the same batches."""
  config_name: str
  num_params: int
  num_trainable: int
  num_blocks: int
  batch_size: int
  seq_len: int  # 1 for images
  real_tokens_per_step: float  # mean non-padding tokens (images) of the timed batches
  warmup: int
  round_steps: int
  timings: dict[str, Timing]  # "blocked", "plain"
  final_loss: dict[str, float]
  max_abs_loss_diff: float  # over every step run (warmup included), blocked vs plain
  losses_bitwise_equal: bool
  peak_rss_bytes: int
  rss_stages: dict[str, int]  # peak RSS after: job built, each variant's warmup
  environment: dict[str, Any]
  item: str = "tokens"  # what tokens_per_step counts: "tokens" | "images"

  @property
  def tokens_per_step(self) -> int:
    return self.batch_size * self.seq_len

  @property
  def time_ratio(self) -> float:
    """blocked / plain median seconds per step (> 1: the blocked step is slower)."""
    return time_ratio(self.timings["blocked"], self.timings["plain"])

  @property
  def steps_per_s_ratio(self) -> float:
    """blocked / plain steps per second (the inverse of time_ratio)."""
    return self.timings["blocked"].steps_per_s / self.timings["plain"].steps_per_s

  @property
  def paired_time_ratio(self) -> float:
    """blocked / plain, the median over rounds of the per-round ratio (drift-robust)."""
    return paired_ratio(self.timings["blocked"], self.timings["plain"])

  def to_json(self) -> dict[str, Any]:
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "timings"}
    out["timings"] = {n: t.to_json() for n, t in self.timings.items()}
    for n, t in self.timings.items():
      out["timings"][n]["tokens_per_s"] = self.tokens_per_step * t.steps_per_s
    out.update(tokens_per_step=self.tokens_per_step, time_ratio=self.time_ratio,
               steps_per_s_ratio=self.steps_per_s_ratio, paired_time_ratio=self.paired_time_ratio)
    return out


def bench_train(config: ml_collections.ConfigDict, *, steps: int = 20, warmup: int = 3,
                round_steps: int = 2, job: job_lib.Job | None = None,
                config_name: str = "", torch: bool = False) -> TrainBench:
  """Times `blocked_step` against `plain_step` on one job.

  Both variants start from the job's initial state and take the same batches and step
  keys (steps 0..warmup+steps-1, prepared on device before timing, so batch assembly is
  not timed); they are interleaved by `time_interleaved`. Their losses are compared at
  the end: a sanity check that the two ran the same computation.

  Args:
    config: a `configs/finetune.py` config (its step_impl is ignored: both run).
    steps, warmup, round_steps: see `time_interleaved`.
    job: a prebuilt job (otherwise built from config).
    config_name: a label for the report.
    torch: also time a plain transformers step of the same architecture
      (`bench/torch_ref.py`; skipped when torch is missing or the family has no
      counterpart there).

  Returns:
    The TrainBench.
  """
  job = job or job_lib.build_job(config)
  rss_stages = {"job built": peak_rss_bytes()}
  total = warmup + steps
  batches = [job.batch(i)[1] for i in range(total)]
  keys = [job.step_key(i) for i in range(total)]
  jax.block_until_ready((batches, keys))
  specs, frozen, opt_cfg = job.blocked.specs, job.blocked.frozen, job.opt_cfg
  state = {n: (list(job.blocked.trainable), job.init_opt_states()) for n in ("blocked", "plain")}
  losses: dict[str, list[jax.Array]] = {"blocked": [], "plain": []}

  def blocked(i):
    params, opt = state["blocked"]
    params, opt, trace = step_lib.blocked_step(specs, opt_cfg, params, opt, frozen, batches[i],
                                               keys[i])
    state["blocked"] = (params, opt)
    losses["blocked"].append(trace.loss)
    return params, opt, trace.loss, trace.grad_norm

  def plain(i):
    params, opt = state["plain"]
    params, opt, loss, g_norm = step_lib.default_fns().plain_step(specs, opt_cfg, params, opt, frozen,
                                                    batches[i], keys[i])
    state["plain"] = (params, opt)
    losses["plain"].append(loss)
    return params, opt, loss, g_norm

  variants = {"blocked": blocked, "plain": plain}
  torch_losses: list[float] = []
  if torch:
    from aftune.bench import torch_ref  # pylint: disable=g-import-not-at-top
    ref = torch_ref.step_fn(job.model_cfg, opt_cfg, batches, seed=int(config.seed))
    if ref is not None:
      variants["torch"], torch_losses = ref
  timings = time_interleaved(variants, steps=steps, warmup=warmup,
                             round_steps=round_steps,
                             on_warmup_done=lambda n: rss_stages.update(
                                 {f"{n} warmup": peak_rss_bytes()}))
  loss_b = np.asarray(jax.device_get(losses["blocked"]))
  loss_p = np.asarray(jax.device_get(losses["plain"]))
  params0 = job.blocked.trainable
  n_trainable = sum(job_lib.count_params(p) for p in params0)
  n_frozen = sum(job_lib.count_params(f) for f in frozen)
  x0 = batches[0][family.of(job.model_cfg).INPUT_KEY]
  text = "attn_mask" in batches[0]  # images: one item per example
  real = [float(np.asarray(b["attn_mask"]).sum()) if text else float(x0.shape[0])
          for b in batches[warmup:]]
  return TrainBench(
      config_name=config_name, num_params=n_trainable + n_frozen,
      num_trainable=n_trainable, num_blocks=job.blocked.num_blocks,
      batch_size=int(x0.shape[0]), seq_len=int(x0.shape[1]) if text else 1,
      item="tokens" if text else "images",
      real_tokens_per_step=float(np.mean(real)), warmup=warmup, round_steps=round_steps,
      timings=timings, final_loss={"blocked": float(loss_b[-1]), "plain": float(loss_p[-1]),
                                   **({"torch": torch_losses[-1]} if torch_losses else {})},
      max_abs_loss_diff=float(np.max(np.abs(loss_b - loss_p))),
      losses_bitwise_equal=loss_b.tobytes() == loss_p.tobytes(),
      peak_rss_bytes=peak_rss_bytes(), rss_stages=rss_stages,
      environment=provenance.environment_manifest())


def _version(package: str) -> str:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return "?"


def format_train_bench(r: TrainBench) -> str:
  """The human-readable report of a TrainBench."""
  env = r.environment
  steps = r.timings["blocked"].steps
  rows = [[name, f"{t.median_s:.4f}", f"{t.iqr_s:.4f}", f"{100 * t.rel_spread:.1f}%",
           f"{t.min_s:.4f}", f"{t.max_s:.4f}", f"{t.steps_per_s:.3f}",
           f"{r.tokens_per_step * t.steps_per_s:,.0f}"] for name, t in r.timings.items()]
  table = format_table(["variant", "median s/step", "IQR s", "IQR/med", "min s", "max s",
                        "steps/s", f"{r.item}/s"], rows)
  agree = ("bitwise equal" if r.losses_bitwise_equal else f"max |diff| {r.max_abs_loss_diff:.3g}")
  return "\n".join([
      f"config           {r.config_name or '(unnamed)'}",
      f"backend          {env['backend']} ({env['device_kind']}), "
      f"intra-op pool of {env['intra_op_threads']} threads, "
      f"jax {env['packages']['jax']}",
      f"model            {r.num_params:,} parameters ({r.num_params / 1e6:.1f}M), "
      f"{r.num_trainable:,} trainable, {r.num_blocks} layer blocks",
      (f"batch x seq len  {r.batch_size} x {r.seq_len} = {r.tokens_per_step:,} tokens/step "
       f"({r.real_tokens_per_step:,.0f} non-padding)" if r.item == "tokens" else
       f"batch            {r.batch_size} images/step"),
      f"timing           {steps} steps per variant after {r.warmup} warmup, interleaved in rounds "
      f"of {r.round_steps}",
      "",
      table,
      "",
      f"ratio blocked/plain  time per step {r.time_ratio:.3f}x   steps/s {r.steps_per_s_ratio:.3f}x"
      "   (ratio of medians)",
      f"{'':21s}time per step {r.paired_time_ratio:.3f}x   (median of per-round ratios)",
      *([f"ratio blocked/torch  time per step "
         f"{time_ratio(r.timings['blocked'], r.timings['torch']):.3f}x   plain/torch "
         f"{time_ratio(r.timings['plain'], r.timings['torch']):.3f}x   (torch {_version('torch')}, "
         f"transformers {_version('transformers')}, random init of the same architecture; its "
         f"loss after the last step {r.final_loss['torch']:.6f})"]
        if "torch" in r.timings else []),
      f"loss after {r.warmup + steps} steps  blocked {r.final_loss['blocked']:.6f}  "
      f"plain {r.final_loss['plain']:.6f}  (per-step losses: {agree})",
      f"peak RSS         {fmt_bytes(r.peak_rss_bytes)}  (peak after "
      + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in r.rss_stages.items()) + ")",
  ])

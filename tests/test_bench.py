"""Timing helpers on a fake clock, and the blocked-vs-plain benchmark on a very small job."""

import json

import pytest

from aftune.bench import timing as bench
from configs import finetune


class _FakeClock:
  """A clock that moves only when a fake step says how long it took."""

  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def _fake_steps(clock, costs, log):
  def make(name):
    def fn(i):
      log.append((name, i))
      clock.now += costs[name] * (3.0 if i == 5 else 1.0)  # one slow step: an outlier
      return i
    return fn
  return {name: make(name) for name in costs}


def test_time_interleaved_order_warmup_and_stats():
  clock, log, blocked_on = _FakeClock(), [], []
  fns = _fake_steps(clock, {"a": 2.0, "b": 1.0}, log)
  timings = bench.time_interleaved(fns, steps=5, warmup=2, round_steps=2, timer=clock,
                                   block=blocked_on.append,
                                   on_warmup_done=lambda n: log.append((n, "warm")))
  # Warmup: each variant alone on steps 0, 1; then rounds of 2 (the last of 1), the
  # starting variant rotating; both variants see the same step indices.
  assert log == [("a", 0), ("a", 1), ("a", "warm"), ("b", 0), ("b", 1), ("b", "warm"),
                 ("a", 2), ("a", 3), ("b", 2), ("b", 3),
                 ("b", 4), ("b", 5), ("a", 4), ("a", 5),
                 ("a", 6), ("b", 6)]
  assert blocked_on == [0, 1, 0, 1, 3, 3, 5, 5, 6, 6]  # warmup: every step; rounds: the last
  a, b = timings["a"], timings["b"]
  assert list(timings) == ["a", "b"] and a.steps == b.steps == 5
  assert a.round_s == (2.0, 4.0, 2.0)  # round 2 holds the 3x step 5: (2 + 6) / 2
  assert b.round_s == (1.0, 2.0, 1.0)
  assert a.median_s == 2.0 and b.median_s == 1.0
  assert a.min_s == 2.0 and a.max_s == 4.0
  assert a.iqr_s == pytest.approx(1.0) and a.rel_spread == pytest.approx(0.5)
  assert b.steps_per_s == 1.0
  assert bench.time_ratio(a, b) == 2.0
  assert bench.paired_ratio(a, b) == 2.0
  assert json.loads(json.dumps(a.to_json()))["median_s"] == 2.0


def test_paired_ratio_cancels_drift():
  # The machine slows 3x in round 2, after a's part and before b's: a is 0.8x b in every
  # other round, but the ratio of medians compares a's fast rounds with b's slow ones.
  a = bench.Timing("a", (0.8, 0.8, 0.8, 2.4, 2.4), 5)
  b = bench.Timing("b", (1.0, 1.0, 3.0, 3.0, 3.0), 5)
  assert bench.paired_ratio(a, b) == pytest.approx(0.8)
  assert bench.time_ratio(a, b) == pytest.approx(0.8 / 3.0)


def test_time_interleaved_rejects_bad_arguments():
  with pytest.raises(ValueError):
    bench.time_interleaved({"a": lambda i: i}, steps=0)
  with pytest.raises(ValueError):
    bench.time_interleaved({}, steps=1)


def test_format_table_and_helpers():
  table = bench.format_table(["name", "value"], [["blocked", "1.5"], ["p", "10.25"]])
  lines = table.splitlines()
  assert lines[0] == "name     value"
  assert lines[2] == "blocked    1.5" and lines[3] == "p        10.25"
  assert len({len(l) for l in lines}) == 1
  with pytest.raises(ValueError):
    bench.format_table(["a", "b"], [["only one"]])
  assert bench.fmt_bytes(512) == "512 B" and bench.fmt_bytes(3 * 2**30) == "3.00 GiB"
  assert bench.peak_rss_bytes() > 10 * 2**20


def _very_small_config():
  c = finetune.get_config("tiny")
  c.model.hidden_size, c.model.intermediate_size, c.model.num_layers = 32, 64, 2
  c.model.num_heads, c.model.num_kv_heads = 4, 2
  c.data.max_len, c.data.num_samples = 32, 64
  c.batch_size, c.num_steps = 4, 10
  return c


def test_bench_train_on_a_very_small_job():
  r = bench.bench_train(_very_small_config(), steps=2, warmup=1, round_steps=1,
                        config_name="very small")
  assert set(r.timings) == {"blocked", "plain"}
  blocked, plain = r.timings["blocked"], r.timings["plain"]
  assert blocked.steps == plain.steps == 2 and len(blocked.round_s) == len(plain.round_s) == 2
  assert all(t > 0 for t in blocked.round_s + plain.round_s)
  assert r.time_ratio == blocked.median_s / plain.median_s
  assert r.steps_per_s_ratio == pytest.approx(1.0 / r.time_ratio)
  assert r.paired_time_ratio == pytest.approx(
      sorted(x / y for x, y in zip(blocked.round_s, plain.round_s))[0] / 2
      + sorted(x / y for x, y in zip(blocked.round_s, plain.round_s))[1] / 2)
  assert list(r.rss_stages) == ["job built", "blocked warmup", "plain warmup"]
  assert (r.batch_size, r.seq_len, r.tokens_per_step) == (4, 32, 128)
  assert 0 < r.real_tokens_per_step <= 128
  assert r.num_params >= r.num_trainable > 0 and r.num_blocks >= 2
  assert r.max_abs_loss_diff < 1e-4  # fp32: the two steps compute the same thing
  assert r.peak_rss_bytes > 0

  report = bench.format_train_bench(r)
  rows = {l.split()[0]: l.split() for l in report.splitlines() if l.split()[:1] in (["blocked"],
                                                                                  ["plain"])}
  assert set(rows) == {"blocked", "plain"}
  assert float(rows["blocked"][1]) == pytest.approx(blocked.median_s, abs=1e-4)
  assert f"time per step {r.time_ratio:.3f}x" in report
  assert f"{r.num_params:,} parameters" in report and "peak RSS" in report

  out = json.loads(json.dumps(r.to_json(), default=str))
  assert out["time_ratio"] == r.time_ratio and out["paired_time_ratio"] == r.paired_time_ratio
  assert set(out["timings"]) == {"blocked", "plain"}
  assert out["timings"]["plain"]["tokens_per_s"] == pytest.approx(128 * plain.steps_per_s)


def test_bench_train_times_the_torch_baseline_of_the_same_architecture():
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  import math  # pylint: disable=g-import-not-at-top

  from aftune.bench import torch_ref  # pylint: disable=g-import-not-at-top
  from aftune.train import job as job_lib  # pylint: disable=g-import-not-at-top

  config = _very_small_config()
  job = job_lib.build_job(config)
  batches = [job.batch(i)[1] for i in range(3)]
  step, losses = torch_ref.step_fn(job.model_cfg, job.opt_cfg, batches)
  first = step(0)
  # A random-init LM predicts near-uniformly: the masked mean cross-entropy is ~ln(V).
  assert abs(first - math.log(job.model_cfg.vocab_size)) < 0.5
  step(1)
  step(2)
  assert losses[0] == first and len(losses) == 3 and all(math.isfinite(x) for x in losses)

  r = bench.bench_train(config, steps=2, warmup=1, round_steps=1, torch=True)
  assert set(r.timings) == {"blocked", "plain", "torch"} and r.timings["torch"].steps == 2
  report = bench.format_train_bench(r)
  assert "ratio blocked/torch" in report and "torch" in r.final_loss

r"""Benchmark of the auditable server: throughput, latency, receipts, per-request audit cost.

  python -m experiments.bench_serve --out /tmp/bench_serve [--workdir W] [--duration_s 30]

Without --workdir it first fine-tunes `configs/finetune.py:tiny` for 8 steps into OUT/run.
Parts, each measured side by side in this one run (the machine is shared: only the
ratios within a table mean something):

  load     `experiments.serve` as a process, loaded by `serve_client load` (16 concurrent
           clients, 16 tokens each, ignore_eos) for --duration_s in --rounds rounds that
           alternate between three servers running side by side:
           recorded (batches of up to 8), unrecorded (the baseline), and recorded with
           max_batch 1 (every request alone: batch-invariant by construction, the cost of
           not batching). Throughput, p50/p95 latency, receipts verified, receipt bytes.
  audit    one recorded request of 16 tokens: every cell (k, t) for t in {0, 7, 15}
           opened and verified (medians of --repeats); the exact replay per token vs the
           teacher-forced first pass per token (both warm); the replay at the committed
           batch shape (B rows) vs at batch 1 (not bitwise: the steps that match are counted).

Writes OUT/bench_serve.json and prints the tables (docs/serving.md has them).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from experiments import serve_client

ROOT = Path(__file__).resolve().parent.parent


def _server(workdir: Path, serving_dir: Path, log: Path, *overrides: str):
  return serve_client.launch_server(workdir, log, "--serving_dir", str(serving_dir),
                                    *[f"--serve.server.{o}" for o in overrides])


def _load(url: str, out: Path, args) -> dict:
  subprocess.run([sys.executable, "-m", "experiments.serve_client", "load", "--url", url,
                  "--clients", str(args.clients), "--duration_s", str(args.duration_s),
                  "--max_tokens", str(args.max_tokens), "--ignore_eos", "--out", str(out)],
                 cwd=ROOT, check=True, capture_output=True)
  return json.loads(out.read_text())


SETTINGS = (("recorded", ("max_batch=8",)), ("unrecorded", ("max_batch=8", "record=false")),
            ("recorded, max_batch 1", ("max_batch=1",)))


def _merge(parts: list[dict]) -> dict:
  """One setting's rounds as one load: summed counts, pooled latency percentiles."""
  n = sum(p["requests"] for p in parts)
  wall = sum(p["wall_s"] for p in parts)
  tokens = sum(p["tokens_per_s"] * p["wall_s"] for p in parts)
  mean = lambda key: sum(p[key] * p["requests"] for p in parts) / max(n, 1)
  return {"requests": n, "wall_s": wall, "tokens_per_s": tokens / wall,
          "requests_per_s": n / wall, "latency_p50_s": mean("latency_p50_s"),
          "latency_p95_s": mean("latency_p95_s"), "latency_mean_s": mean("latency_mean_s"),
          "receipts_verified": sum(p["receipts_verified"] for p in parts),
          "failures": [f for p in parts for f in p["failures"]], "recording": parts[0]["recording"],
          "rounds": parts}


def part_load(args, workdir: Path, out: Path) -> dict:
  """The three servers run side by side (idle ones cost nothing); the load alternates
  between them in --rounds rounds, so that the machine's drift hits each setting alike."""
  servers = {}
  try:
    for i, (name, overrides) in enumerate(SETTINGS):
      servers[name] = _server(workdir, out / f"serving_{i}", out / f"server_{i}.log",
                              f"max_tokens_cap={args.max_tokens}", *overrides)
    per_round = argparse.Namespace(**{**vars(args), "duration_s": args.duration_s / args.rounds})
    warm = argparse.Namespace(**{**vars(args), "duration_s": 5})
    for name, (_, url) in servers.items():
      _load(url, out / "warm.json", warm)
    parts: dict[str, list[dict]] = {name: [] for name in servers}
    for r in range(args.rounds):
      for name, (_, url) in servers.items():
        parts[name].append(_load(url, out / f"load_{len(parts[name])}_{r}.json", per_round))
  finally:
    for proc, _ in servers.values():
      proc.send_signal(signal.SIGTERM)
      proc.wait(timeout=120)
  results = {name: _merge(p) for name, p in parts.items()}
  for name, r in results.items():
    print(f"{name:24s} {r['requests']:5d} req  {r['tokens_per_s']:8.1f} tok/s  "
          f"p50 {r['latency_p50_s']:.3f}s  p95 {r['latency_p95_s']:.3f}s  receipts "
          f"{r['receipts_verified']}  failures {len(r['failures'])}", flush=True)
  return results


def part_audit(args, workdir: Path, out: Path) -> dict:
  import numpy as np  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from aftune.audit import request_provider  # pylint: disable=g-import-not-at-top
  from aftune.audit import request_verifier as rv  # pylint: disable=g-import-not-at-top
  from aftune.audit import names  # pylint: disable=g-import-not-at-top
  from aftune.infer import engine as engine_lib  # pylint: disable=g-import-not-at-top
  from aftune.infer import generate as gen_lib  # pylint: disable=g-import-not-at-top
  from aftune.infer import request_record as rr  # pylint: disable=g-import-not-at-top
  from aftune.infer import serving  # pylint: disable=g-import-not-at-top
  model = serving.load_from_training(workdir)
  settings = engine_lib.EngineSettings(max_batch=8, batch_window_s=0.5, max_tokens_cap=args.max_tokens)
  engine = engine_lib.Engine(model, out / "serving_audit", settings,
                             key_path=workdir / "provider_key.pem").start()
  tok = model.tokenizer
  futs = [engine.submit(rr.new_request(tok.encode(f"question number {i}"), max_tokens=args.max_tokens,
                                       ignore_eos=True, seed=i)) for i in range(8)]
  res = [f.result() for f in futs]
  engine.stop()
  r = res[3]
  batch = rr.load_batch(engine.batches / rr.batch_name(r.batch_id))
  prov = request_provider.RequestProvider(batch, model)
  lay = batch.layout
  rows = []
  for k in range(lay.num_layer_blocks):
    for t in sorted({0, args.max_tokens // 2 - 1, args.max_tokens - 1}):
      bundle = prov.open_cell(r.row, k, t)
      rv.verify_request_bundle(bundle, receipt=r.receipt, first_pass=True)  # compile
      exacts = [rv.verify_request_bundle(bundle, receipt=r.receipt) for _ in range(args.repeats)]
      fps = [rv.verify_request_bundle(bundle, receipt=r.receipt, first_pass=True, mode="tolerance")
             for _ in range(args.repeats)]
      exact = sorted(exacts, key=lambda x: x.replay_s)[len(exacts) // 2]  # the median
      fp = sorted(fps, key=lambda x: x.max_rel_err["first_pass_s"])[len(fps) // 2]
      fp_s = fp.max_rel_err["first_pass_s"]
      rows.append({"block": k, "step": t, "passed": exact.passed and fp.passed,
                   "auth_s": exact.auth_s, "exact_replay_s": exact.replay_s,
                   "exact_per_token_s": exact.replay_s / (t + 1), "first_pass_s": fp_s,
                   "first_pass_per_token_s": fp_s / (t + 1),
                   "first_pass_err": max(v for key, v in fp.max_rel_err.items()
                                         if key.startswith("first_pass/"))})
      print(f"cell ({k}, {t:2d}): exact replay {exact.replay_s * 1e3:7.1f} ms "
            f"({rows[-1]['exact_per_token_s'] * 1e3:6.2f} ms/token), first pass "
            f"{fp_s * 1e3:6.1f} ms ({rows[-1]['first_pass_per_token_s'] * 1e3:6.2f} ms/token), "
            f"first-pass error {rows[-1]['first_pass_err']:.2g}", flush=True)
  # The replay at the committed shape (B rows) vs at batch 1, for the last cell of each block.
  fns = gen_lib.default_fns()
  b = model.blocked
  t_last = lay.num_steps - 1
  shape_rows = []
  for k in range(lay.num_layer_blocks):
    bundle = prov.open_cell(r.row, k, t_last)
    T = bundle.tensors
    mask1 = rr.row_mask(len(r.receipt["request"]["prompt"]), batch.spec["prompt_width"])
    ids1 = np.zeros((1, batch.spec["prompt_width"]), np.int32)
    ids1[0, -len(r.receipt["request"]["prompt"]):] = r.receipt["request"]["prompt"]
    out = {}
    for n in (lay.rows, 1):
      def run():
        cache, same = None, 0
        mask = rr.replay_rows(mask1, n)
        for s in range(t_last + 1):
          x = (ids1 if s == 0 else T[names.infer_tokens(s - 1)][:, None]) if k == 0 else T[names.infer_out(s, k - 1)]
          x = jnp.asarray(rr.replay_rows(x, n))
          if s == 0:
            y, cache = fns.prefill(b.specs[k], b.trainable[k], b.frozen[k], x, gen_lib.prefill_ctx(mask),
                                   batch.spec["max_total_len"])
          else:
            y, cache = fns.decode(b.specs[k], b.trainable[k], b.frozen[k], x, cache,
                                  gen_lib.decode_ctx(mask, s, batch.spec["max_total_len"]))
          same += int(np.array_equal(np.asarray(y)[:1], T[names.infer_out(s, k)]))
        return same
      run()
      times = []
      for _ in range(args.repeats):
        t0 = time.perf_counter()
        same = run()
        times.append(time.perf_counter() - t0)
      out[n] = (sorted(times)[len(times) // 2], same)  # the median
    shape_rows.append({"block": k, "steps": t_last + 1, "committed_rows": lay.rows,
                       "replay_committed_shape_s": out[lay.rows][0],
                       "bitwise_steps_committed_shape": out[lay.rows][1],
                       "replay_batch1_s": out[1][0], "bitwise_steps_batch1": out[1][1]})
    print(f"block {k}: replay of {t_last + 1} steps at B={lay.rows}: {out[lay.rows][0] * 1e3:.1f} ms "
          f"({out[lay.rows][1]}/{t_last + 1} steps bitwise); at B=1: {out[1][0] * 1e3:.1f} ms "
          f"({out[1][1]}/{t_last + 1} bitwise)", flush=True)
  return {"cells": rows, "shape": shape_rows, "receipt_bytes": [len(json.dumps(x.receipt, separators=(",", ":")))
                                                               for x in res]}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m experiments.bench_serve", description=__doc__.split("\n")[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--workdir", help="an audited training run (default: train tiny into OUT/run)")
  ap.add_argument("--duration_s", type=float, default=30, help="load per setting, in all")
  ap.add_argument("--rounds", type=int, default=3, help="the load alternates in this many rounds")
  ap.add_argument("--clients", type=int, default=16)
  ap.add_argument("--max_tokens", type=int, default=16)
  ap.add_argument("--parts", default="load,audit")
  ap.add_argument("--repeats", type=int, default=5, help="audit timings: the median of this many")
  args = ap.parse_args(argv)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  workdir = Path(args.workdir) if args.workdir else out / "run"
  if not (workdir / "commitment.json").exists():
    subprocess.run([sys.executable, "-m", "experiments.finetune", "--config", "configs/finetune.py:tiny",
                    "--config.num_steps=8", "--workdir", str(workdir)], cwd=ROOT, check=True,
                   capture_output=True)
  report = {"workdir": str(workdir), "args": vars(args)}
  if "load" in args.parts:
    report["load"] = part_load(args, workdir, out)
    rec, plain, alone = (report["load"][n] for n in ("recorded", "unrecorded", "recorded, max_batch 1"))
    rounds = lambda a, b: [x["tokens_per_s"] / y["tokens_per_s"] for x, y in
                           zip(report["load"][a]["rounds"], report["load"][b]["rounds"])]
    report["ratios_per_round"] = {
        "recorded/unrecorded tokens_per_s": rounds("recorded", "unrecorded"),
        "max_batch 1 / max_batch 8 tokens_per_s (recorded)": rounds("recorded, max_batch 1",
                                                                    "recorded")}
    print("per round:", {k: [round(x, 2) for x in v] for k, v in report["ratios_per_round"].items()})
    report["ratios"] = {
        "recorded/unrecorded tokens_per_s": rec["tokens_per_s"] / plain["tokens_per_s"],
        "recorded/unrecorded p50 latency": rec["latency_p50_s"] / plain["latency_p50_s"],
        "max_batch 1 / max_batch 8 tokens_per_s (recorded)": alone["tokens_per_s"] / rec["tokens_per_s"]}
    for k, v in report["ratios"].items():
      print(f"{k}: {v:.2f}")
  if "audit" in args.parts:
    report["audit"] = part_audit(args, workdir, out)
  (out / "bench_serve.json").write_text(json.dumps(report, indent=1) + "\n")
  print(f"report: {out / 'bench_serve.json'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

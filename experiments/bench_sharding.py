r"""Benchmarks of sharded and multi-process recording and verification (docs/sharding.md).

  python -m experiments.bench_sharding --out /tmp/bench_sharding      # ~15 min on 2 cores

Three parts, each in fresh processes (a device count is fixed when JAX starts):
  record    recorded/plain step time at each mesh (`experiments.bench_record`, variants
            interleaved in one process per mesh): data parallel and FSDP at 1, 2, 4, 8 devices;
  transfer  the bytes each process copies off its devices to hash what it commits, against
            the logical bytes committed (`recorder_stats.p<i>.json` of a run): one process
            on a (1, 4) mesh, then 2 processes x 2 devices on the same mesh;
  verify    verification throughput (cells/s) with 1, 2, ... verifier processes
            (`experiments.verify --workers`) on the one-process run, and the 2-process run
            verified by its 2 processes together.
Writes <out>/bench_sharding.json and prints the tables (Markdown).
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from absl import app
from absl import flags

_OUT = flags.DEFINE_string("out", "/tmp/bench_sharding", "Working directory and results.")
_CONFIG = flags.DEFINE_string("config", "configs/finetune.py:tiny", "Run sheet of the record part.")
_MESHES = flags.DEFINE_string("meshes", "1,1;2,1;4,1;8,1;1,2;1,4;1,8", "(data,fsdp) meshes.")
_STEPS = flags.DEFINE_integer("steps", 8, "Timed steps per variant (record).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps per variant (record).")
_RUN_STEPS = flags.DEFINE_integer("run_steps", 16, "Steps of the tiny_fsdp runs (transfer, verify).")
_WORKERS = flags.DEFINE_string("workers", "1,2", "Verifier process counts.")
_CELLS = flags.DEFINE_integer("cells", 8, "Cells challenged (verify).")
_PARTS = flags.DEFINE_list("parts", ["record", "transfer", "verify"], "Which parts to run.")

PY = sys.executable


def _run(args, **kw):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  r = subprocess.run([PY, "-m", *args], capture_output=True, text=True, env=env, **kw)
  if r.returncode != 0:
    raise RuntimeError(f"{' '.join(args[:3])}...: exit {r.returncode}\n{r.stderr[-3000:]}")
  return r


def _port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _two(args):
  """Runs `python -m args` as 2 processes of one jax.distributed run."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  port = _port()
  procs = [subprocess.Popen([PY, "-m", *args, "--coordinator", f"localhost:{port}",
                             "--num_processes", "2", "--process_id", str(p)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
           for p in (0, 1)]
  errs = [p.communicate()[1] for p in procs]
  if any(p.returncode for p in procs):
    raise RuntimeError(f"{args[0]} (2 processes) failed:\n{errs[0][-3000:]}")


def record_part(out: Path) -> list[dict]:
  rows = []
  for mesh in _MESHES.value.split(";"):
    d, f = (int(x) for x in mesh.split(","))
    path = out / f"record_{d}x{f}.json"
    try:
      _run(["experiments.bench_record", f"--config={_CONFIG.value}",
            f"--config.mesh.shape=({d},{f})", "--torch=false", f"--steps={_STEPS.value}",
            f"--warmup={_WARMUP.value}", f"--json={path}"], timeout=1800)
    except (RuntimeError, subprocess.TimeoutExpired) as e:  # reported in the table, not hidden
      reason = "XLA:CPU rendezvous abort" if "rendezvous" in str(e).lower() else str(e)[-200:]
      rows.append({"mesh": [d, f], "devices": d * f, "plain_ms": float("nan"),
                   "blocked_over_plain": float("nan"), "recorded_over_plain": float("nan"),
                   "recorded_over_plain_paired": float("nan"),
                   "recorded_over_blocked": float("nan"), "failed": reason})
      print(f"record {d}x{f}: FAILED ({reason})", flush=True)
      continue
    r = json.loads(path.read_text())
    rows.append({"mesh": [d, f], "devices": d * f,
                 "plain_ms": r["timings"]["plain"]["median_s"] * 1e3,
                 "blocked_over_plain": r["blocked_over_plain"],
                 "recorded_over_plain": r["recorded_over_plain"],
                 "recorded_over_plain_paired": r["recorded_over_plain_paired"],
                 "recorded_over_blocked": r["recorded_over_blocked"], "failed": ""})
    print(f"record {d}x{f}: recorded/plain {r['recorded_over_plain']:.2f}", flush=True)
  return rows


def _sheet(w: Path) -> list[str]:
  return ["experiments.finetune", "--config=configs/finetune.py:tiny_fsdp",
          f"--config.num_steps={_RUN_STEPS.value}", "--config.log_every=4", f"--workdir={w}"]


def transfer_part(out: Path) -> list[dict]:
  one, two = out / "run_1proc", out / "run_2proc"
  for w in (one, two):
    if not (w / "commitment.json").exists():
      _run(_sheet(w)) if w is one else _two(_sheet(w))
  rows = []
  for w in (one, two):
    for f in sorted(w.glob("recorder_stats.p*.json")):
      s = json.loads(f.read_text())
      rows.append({"processes": s["processes"], "process": s["process"],
                   "bytes_hashed": s["bytes_hashed"], "bytes_fetched": s["bytes_fetched"],
                   "fetched_over_hashed": s["bytes_fetched"] / s["bytes_hashed"]})
  return rows


def verify_part(out: Path) -> list[dict]:
  rows = []
  for name, w in (("1 process", out / "run_1proc"), ("2 processes", out / "run_2proc")):
    ch, bundles = out / f"ch_{w.name}.json", out / f"bundles_{w.name}"
    _run(["experiments.challenge", "draw", f"--commitment={w / 'commitment.json'}",
          "--strategy=uniform", f"--m={_CELLS.value}", "--nonce=" + "0b" * 32, f"--out={ch}"])
    if not bundles.exists():
      _run(["experiments.open", f"--workdir={w}", f"--challenge={ch}", f"--out={bundles}"])
    args = ["experiments.verify", f"--commitment={w / 'commitment.json'}", f"--challenge={ch}",
            f"--bundles={bundles}", "--allow_unbound"]
    if w.name == "run_1proc":
      for n in (int(x) for x in _WORKERS.value.split(",")):
        t0 = time.perf_counter()
        _run([*args, f"--workers={n}", f"--out={out / f'verdict_{w.name}_{n}.json'}"])
        dt = time.perf_counter() - t0
        rows.append({"job": name, "verifier": f"{n} process(es), --workers={n}", "cells": _CELLS.value,
                     "wall_s": dt, "cells_per_s": _CELLS.value / dt})
    else:
      t0 = time.perf_counter()
      _two([*args, f"--out={out / f'verdict_{w.name}.json'}"])
      dt = time.perf_counter() - t0
      rows.append({"job": name, "verifier": "2 processes together (jax.distributed)",
                   "cells": _CELLS.value, "wall_s": dt, "cells_per_s": _CELLS.value / dt})
    print(f"verify {name}: {rows[-1]['cells_per_s']:.3f} cells/s", flush=True)
  return rows


def _table(rows: list[dict]) -> str:
  if not rows:
    return ""
  keys = list(rows[0])
  fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
  return "\n".join(["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
                   + ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows])


def main(argv):
  del argv
  out = Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  result = {}
  for part, fn in (("record", record_part), ("transfer", transfer_part), ("verify", verify_part)):
    if part in _PARTS.value:
      result[part] = fn(out)
      print(f"\n## {part}\n\n{_table(result[part])}\n", flush=True)
  (out / "bench_sharding.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
  app.run(main)

r"""Client of an auditable server (`experiments.serve`): send, keep receipts, audit, load test.

  # send prompts (one per line), keep one receipt per request, check each one offline
  python -m experiments.serve_client send --url http://127.0.0.1:8000 --prompts prompts.txt \
      --receipts receipts/ --training_commitment W/commitment.json --max_tokens 16
  # audit one request: draw m cells of it, ask the server to open them, verify (exit 0/1/2)
  python -m experiments.serve_client audit --url http://127.0.0.1:8000 \
      --receipt receipts/<id>.json --m 4 --training_commitment W/commitment.json \
      --agreed agreed.json --out verdict.json [--first_pass]
  # load test: N concurrent clients for at most D seconds; every receipt is checked
  python -m experiments.serve_client load --url http://127.0.0.1:8000 --clients 16 \
      --duration_s 30 --max_tokens 16 --out load.json

`send` and `load` pin the provider key to the one that signed the training commitment
(when given), so a receipt signed by anyone else is refused. Exit status: 0 pass, 1 a cell
failed, 2 bad input (a receipt that does not verify, a server error).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from aftune import errors
from aftune import jsonio


def _parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog="python -m experiments.serve_client",
                               description=__doc__.split("\n")[0])
  sub = ap.add_subparsers(dest="cmd", required=True)
  s = sub.add_parser("send", help="send prompts, keep and check their receipts")
  s.add_argument("--url", required=True)
  s.add_argument("--prompts", required=True, help="a text file, one user message per line")
  s.add_argument("--receipts", required=True, help="directory for the receipts")
  s.add_argument("--training_commitment", help="pin the provider key to the one that signed it")
  s.add_argument("--max_tokens", type=int, default=16)
  s.add_argument("--temperature", type=float, default=0.0)
  s.add_argument("--seed", type=int, default=None)
  s.add_argument("--completions", action="store_true", help="/v1/completions, not chat")
  a = sub.add_parser("audit", help="audit one request from its receipt")
  a.add_argument("--url", required=True)
  a.add_argument("--receipt", required=True)
  a.add_argument("--m", type=int, default=4, help="cells to challenge")
  a.add_argument("--seed", type=int, default=None, help="challenge randomness (default: fresh)")
  a.add_argument("--training_commitment")
  a.add_argument("--agreed", help="the agreed job spec fields (experiments.agree)")
  a.add_argument("--public_key")
  a.add_argument("--mode", choices=("exact", "tolerance"), default="exact")
  a.add_argument("--first_pass", action="store_true", help="the teacher-forced pass first")
  a.add_argument("--bundles", help="keep the fetched bundles here (default: a temp dir)")
  a.add_argument("--out", default="verdict.json")
  l = sub.add_parser("load", help="concurrent clients; throughput, latency, receipts")
  l.add_argument("--url", required=True)
  l.add_argument("--clients", type=int, default=8)
  l.add_argument("--requests", type=int, default=0, help="stop after this many (0: duration)")
  l.add_argument("--duration_s", type=float, default=30.0)
  l.add_argument("--max_tokens", type=int, default=16)
  l.add_argument("--temperature", type=float, default=0.0)
  l.add_argument("--ignore_eos", action="store_true", help="every request runs max_tokens steps")
  l.add_argument("--training_commitment")
  l.add_argument("--out", default="load.json")
  return ap


def launch_server(workdir: str | Path, log: str | Path, *flags: str,
                  timeout_s: float = 600) -> tuple[subprocess.Popen, str]:
  """Starts `experiments.serve` on a free loopback port (for tests and benchmarks); returns
  (the process, its URL) once /healthz answers."""
  import httpx  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  root = Path(__file__).resolve().parent.parent
  proc = subprocess.Popen([sys.executable, "-m", "experiments.serve", "--workdir", str(workdir),
                           "--port", str(port), *flags], cwd=root, stdout=open(log, "w"),
                          stderr=subprocess.STDOUT)
  url = f"http://127.0.0.1:{port}"
  deadline = time.time() + timeout_s
  while time.time() < deadline:
    if proc.poll() is not None:
      raise RuntimeError(f"the server exited: {Path(log).read_text()[-2000:]}")
    try:
      if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
        return proc, url
    except httpx.HTTPError:
      time.sleep(0.5)
  proc.kill()
  raise RuntimeError(f"the server did not come up in {timeout_s:.0f}s: {Path(log).read_text()[-2000:]}")


def _pinned_key(args) -> str | None:
  if getattr(args, "public_key", None):
    return args.public_key
  if args.training_commitment:
    doc = jsonio.load_json(args.training_commitment, errors.InputError, "training commitment")
    return doc["signature"]["public_key"]
  return None


def _post(client, url: str, body: dict) -> dict:
  r = client.post(url, json=body)
  if r.status_code != 200:
    raise errors.InputError(f"{url}: HTTP {r.status_code}: {r.text[:300]}")
  return r.json()


def _send(args) -> int:
  import httpx  # pylint: disable=g-import-not-at-top
  from aftune.infer import receipts as receipts_lib  # pylint: disable=g-import-not-at-top
  key = _pinned_key(args)
  lines = [l for l in Path(args.prompts).read_text().splitlines() if l.strip()]
  out = Path(args.receipts)
  out.mkdir(parents=True, exist_ok=True)
  with httpx.Client(timeout=300) as client:
    for line in lines:
      body = {"max_tokens": args.max_tokens, "temperature": args.temperature}
      if args.seed is not None:
        body["seed"] = args.seed
      if args.completions:
        resp = _post(client, f"{args.url}/v1/completions", {"prompt": line, **body})
        text = resp["choices"][0]["text"]
      else:
        resp = _post(client, f"{args.url}/v1/chat/completions",
                     {"messages": [{"role": "user", "content": line}], **body})
        text = resp["choices"][0]["message"]["content"]
      receipt = resp["aftune"]["receipt"]
      if receipt is None:
        raise errors.InputError(f"{args.url}: the server is not recording (no receipt)")
      path = out / f"{receipt['request_id']}.json"
      jsonio.write_json(path, receipt)
      info = receipts_lib.check_receipt(receipt, where=str(path), public_key=key)
      if info["tokens"] != resp["aftune"]["tokens"]:
        raise errors.InputError(f"{path}: the receipt's output is not the response's tokens")
      print(f"{path}: batch {info['batch_id']} row {info['row']}, {len(info['tokens'])} tokens, "
            f"{receipts_lib.receipt_size(receipt)} bytes: {text!r}")
  return 0


def _audit(args) -> int:
  import httpx  # pylint: disable=g-import-not-at-top
  from aftune.audit import client as audit_client  # pylint: disable=g-import-not-at-top
  from aftune.audit import request_audit  # pylint: disable=g-import-not-at-top
  from aftune.audit import request_verifier as rv  # pylint: disable=g-import-not-at-top
  from aftune.infer import receipts as receipts_lib  # pylint: disable=g-import-not-at-top
  key = _pinned_key(args)
  receipt, _ = receipts_lib.load_receipt(args.receipt, public_key=key)
  challenge = rv.draw_cells(receipt, args.m, seed=args.seed)
  training = (jsonio.load_json(args.training_commitment, errors.InputError, "training commitment")
              if args.training_commitment else None)
  agreed = audit_client.load_agreed(args.agreed) if args.agreed else None
  model_config = agreed["hyperparameters"]["model"] if agreed else None
  tmp = None
  if args.bundles:
    bdir = Path(args.bundles)
    bdir.mkdir(parents=True, exist_ok=True)
  else:
    tmp = tempfile.TemporaryDirectory()
    bdir = Path(tmp.name)
  paths = []
  t0 = time.perf_counter()
  with httpx.Client(timeout=600) as client:
    for k, t in challenge.cells:
      r = client.post(f"{args.url}/v1/audit/open", json={"request_id": receipt["request_id"],
                                                         "cell": [k, t]})
      if r.status_code != 200:
        raise errors.InputError(f"{args.url}/v1/audit/open cell ({k}, {t}): HTTP "
                                f"{r.status_code}: {r.text[:300]}")
      path = bdir / f"cell_L{k:03d}_S{t:05d}.bundle"
      path.write_bytes(r.content)
      paths.append(path)
  fetch_s = time.perf_counter() - t0
  verdict = request_audit.verify_request(
      paths, receipt_path=args.receipt, challenge=challenge, public_key=key,
      training_commitment=training, model_config=model_config, mode=args.mode,
      first_pass=args.first_pass)
  verdict["fetch_s"] = fetch_s
  md = request_audit.write_verdict(verdict, args.out)
  print(request_audit.render_markdown(verdict))
  print(f"verdict: {args.out}, report: {md}")
  if tmp is not None:
    tmp.cleanup()
  return 0 if verdict["passed"] else 1


QUESTIONS = ["hi", "what is the capital of france?", "tell me a joke please", "how are you",
             "name three colours", "what is two plus two", "say something nice", "who are you"]


async def _load(args) -> int:
  import httpx  # pylint: disable=g-import-not-at-top
  from aftune.infer import receipts as receipts_lib  # pylint: disable=g-import-not-at-top
  key = _pinned_key(args)
  latencies, tokens, failures, receipts_ok, sizes, kept = [], [], [], 0, [], []
  count = {"sent": 0}
  stop_at = time.perf_counter() + args.duration_s
  recording = True
  async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=args.clients)) as client:
    info = (await client.get(f"{args.url}/v1/provider")).json()
    recording = info["recording"]

    async def one_client(c: int):
      i = 0
      while time.perf_counter() < stop_at and (not args.requests or count["sent"] < args.requests):
        count["sent"] += 1
        q = QUESTIONS[(c + i) % len(QUESTIONS)]
        i += 1
        t0 = time.perf_counter()
        r = await client.post(f"{args.url}/v1/chat/completions", json={
            "messages": [{"role": "user", "content": q}], "max_tokens": args.max_tokens,
            "temperature": args.temperature, "seed": c * 1000 + i,
            "ignore_eos": args.ignore_eos})
        dt = time.perf_counter() - t0
        if r.status_code != 200:
          failures.append(f"HTTP {r.status_code}: {r.text[:200]}")
          continue
        body = r.json()
        latencies.append(dt)
        tokens.append(len(body["aftune"]["tokens"]))
        if recording:  # checked after the timed window: the client's CPU is not the server's
          kept.append((body["aftune"]["receipt"], body["aftune"]["tokens"]))

    t0 = time.perf_counter()
    await asyncio.gather(*(one_client(c) for c in range(args.clients)))
    wall = time.perf_counter() - t0
  for rec, toks in kept:
    try:
      got = receipts_lib.check_receipt(rec, public_key=key)
      if got["tokens"] != toks:
        raise receipts_lib.ReceiptError("the receipt's output is not the response's")
      receipts_ok += 1
      sizes.append(receipts_lib.receipt_size(rec))
    except receipts_lib.ReceiptError as e:
      failures.append(f"receipt: {e}")
  lat = sorted(latencies)
  pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")
  out = {"url": args.url, "recording": recording, "clients": args.clients,
         "requests": len(latencies), "failures": failures, "receipts_verified": receipts_ok,
         "wall_s": wall, "requests_per_s": len(latencies) / wall,
         "tokens_per_s": sum(tokens) / wall, "latency_p50_s": pct(0.5), "latency_p95_s": pct(0.95),
         "latency_mean_s": statistics.fmean(lat) if lat else float("nan"),
         "receipt_bytes_mean": statistics.fmean(sizes) if sizes else None}
  Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
  print(json.dumps({k: v for k, v in out.items() if k != "failures"}, indent=1))
  if failures:
    print(f"{len(failures)} failures, first: {failures[0]}", file=sys.stderr)
    return 1
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  with errors.exit_on_input_error():
    if args.cmd == "send":
      return _send(args)
    if args.cmd == "audit":
      return _audit(args)
    return asyncio.run(_load(args))


if __name__ == "__main__":
  sys.exit(main())

"""The server as a process: the README's client commands, a disconnect, a load test, a kill.

One tiny model is trained; `experiments.serve` runs it on a free loopback port. The client
script sends prompts and keeps their receipts; a streaming client disconnects after the
first event and still finds its receipt; 8 concurrent clients load the server for 10 s
and every response's receipt verifies; the server is killed (SIGKILL) and restarted on
the same workdir: batch ids go on, and a receipt issued before the kill is audited end to
end through the new server and through `experiments.challenge/open/verify --receipt`.
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aftune.infer import receipts as receipts_lib
from aftune.train import trainer as train
from experiments import serve_client

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.xdist_group("serve_process")


def start_server(workdir: Path, log: Path):
  return serve_client.launch_server(
      workdir, log, "--warmup=false", "--serve.server.max_batch=4",
      "--serve.server.max_tokens_cap=8", "--serve.server.batch_window_s=0.05",
      "--serve.server.prompt_bucket=16", timeout_s=180)


def run(*args, timeout=300):
  return subprocess.run([sys.executable, "-m", *map(str, args)], cwd=ROOT, capture_output=True,
                        text=True, timeout=timeout, check=False)


@pytest.fixture(scope="session")  # session: xdist may tear a module fixture down mid-module
def workdir(small_config, tmp_path_factory):
  w = tmp_path_factory.mktemp("served_run")
  train.train(small_config(num_steps=4), w)
  return w


def test_serve_disconnect_load_kill_restart_and_audit(workdir, tmp_path):
  import httpx  # pylint: disable=g-import-not-at-top
  tc = workdir / "commitment.json"
  key = json.loads(tc.read_text())["signature"]["public_key"]
  proc, url = start_server(workdir, tmp_path / "server1.log")
  try:
    # The README's client: send prompts, keep the receipts (checked, pinned to the key).
    (tmp_path / "prompts.txt").write_text("hi\nwhat is the capital of france?\ntell me a joke\n")
    r = run("experiments.serve_client", "send", "--url", url, "--prompts", tmp_path / "prompts.txt",
            "--receipts", tmp_path / "receipts", "--training_commitment", tc, "--max_tokens", 4)
    assert r.returncode == 0, r.stderr[-2000:]
    receipts = sorted((tmp_path / "receipts").glob("*.json"))
    assert len(receipts) == 3

    # A streaming client that goes away after the first event still gets its receipt.
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "bye"}], "max_tokens": 6, "ignore_eos": True,
        "stream": True}) as resp:
      first = next(l for l in resp.iter_lines() if l.startswith("data: "))
    rid = json.loads(first[len("data: "):])["aftune"]["request_id"]
    deadline, got = time.time() + 120, None
    while time.time() < deadline and got is None:
      g = httpx.get(f"{url}/v1/receipts/{rid}", timeout=10)
      got = g.json() if g.status_code == 200 else time.sleep(0.5)
    assert got is not None, "the disconnected request's receipt never appeared"
    assert len(receipts_lib.check_receipt(got, public_key=key)["tokens"]) == 6

    # Load: 8 concurrent clients for 10 s; every response's receipt verifies.
    r = run("experiments.serve_client", "load", "--url", url, "--clients", 8, "--duration_s", 10,
            "--max_tokens", 4, "--training_commitment", tc, "--out", tmp_path / "load.json")
    assert r.returncode == 0, r.stderr[-2000:]
    load = json.loads((tmp_path / "load.json").read_text())
    assert load["requests"] >= 8 and load["receipts_verified"] == load["requests"]
    assert not load["failures"] and load["recording"]
    assert load["latency_p95_s"] >= load["latency_p50_s"] > 0
    last_batch = httpx.get(f"{url}/healthz").json()["batches"]
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()

  proc, url = start_server(workdir, tmp_path / "server2.log")
  try:
    body = httpx.post(f"{url}/v1/completions", timeout=120,
                      json={"prompt": "again", "max_tokens": 2}).json()
    assert body["aftune"]["batch_id"] >= last_batch  # ids go on after the restart
    old = receipts[0]
    r = run("experiments.serve_client", "audit", "--url", url, "--receipt", old, "--m", 2,
            "--seed", 0, "--training_commitment", tc, "--out", tmp_path / "v1.json")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert json.loads((tmp_path / "v1.json").read_text())["passed"]
  finally:
    proc.terminate()
    proc.wait(timeout=60)

  # The same audit from the command-line tools, with the server down: the receipt is the
  # client's evidence; the provider opens from its batches on disk.
  ch, bundles = tmp_path / "ch.json", tmp_path / "bundles"
  r = run("experiments.challenge", "draw", "--receipt", old, "--m", 2, "--seed", 1, "--out", ch)
  assert r.returncode == 0, r.stderr
  r = run("experiments.open", "--workdir", workdir, "--receipt", old, "--challenge", ch,
          "--out", bundles)
  assert r.returncode == 0, r.stderr[-2000:]
  verify = ["experiments.verify", "--receipt", old, "--challenge", ch, "--bundles", bundles,
            "--training_commitment", tc, "--out", tmp_path / "v2.json"]
  r = run(*verify)
  assert r.returncode == 2 and "promised architecture" in r.stderr  # refused unbound
  r = run(*verify, "--allow_unbound")
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
  v = json.loads((tmp_path / "v2.json").read_text())
  assert v["passed"] and [u.split(":")[0] for u in v["unchecked"]] == ["promised architecture"]
  # A receipt edited by the client (another output) is refused: exit 2, naming the file.
  bad = json.loads(old.read_text())
  bad["output"]["tokens"] = bad["output"]["tokens"][:-1] + [bad["output"]["tokens"][-1] ^ 1]
  (tmp_path / "bad.json").write_text(json.dumps(bad))
  r = run("experiments.verify", "--receipt", tmp_path / "bad.json", "--challenge", ch,
          "--bundles", bundles, "--training_commitment", tc, "--allow_unbound",
          "--out", tmp_path / "v3.json")
  assert r.returncode == 2 and "bad.json" in r.stderr and not (tmp_path / "v3.json").exists()

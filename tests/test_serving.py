"""The auditable server: batching, receipts, per-request audits, the HTTP API.

One tiny model is trained once (module scope). An engine batches 3 concurrent requests
(sampled, each with its own seed and max_tokens, generating past EOS) into one batch of
4 rows (a filler row pads it to its shape bucket). Every receipt verifies offline; any
edit to one fails; every cell of a row is audited by that row's client alone (exact, with
the teacher-forced first pass), the opening revealing nothing of the other rows; a
dishonest server is caught. The HTTP routes run in-process (Starlette's TestClient); the
server process, its kill and restart and the load test are in test_serve_process.py.
"""

import dataclasses
import json
import threading

import numpy as np
import pytest

from aftune.attacks import serving as attacks
from aftune.audit import bundle as bundle_lib
from aftune.audit import core
from aftune.audit import request_provider
from aftune.audit import request_verifier as rv
from aftune.infer import engine as engine_lib
from aftune.infer import generate as gen_lib
from aftune.infer import receipts as receipts_lib
from aftune.infer import request_record as rr
from aftune.infer import sampling
from aftune.infer import serving
from aftune.train import trainer as train

pytestmark = pytest.mark.xdist_group("serving")
MAX_TOKENS = (3, 5, 4)
SETTINGS = engine_lib.EngineSettings(max_batch=4, batch_window_s=0.5, max_tokens_cap=8,
                                     prompt_bucket=8, default_max_tokens=4)


@pytest.fixture(scope="session")  # session: xdist may tear a module fixture down mid-module
def trained(small_config, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("trained")
  train.train(small_config(num_steps=4), workdir)
  return workdir


@pytest.fixture(scope="session")  # session: xdist may tear a module fixture down mid-module
def training_commitment(trained):
  return json.loads((trained / "commitment.json").read_text())


@pytest.fixture(scope="session")  # session: xdist may tear a module fixture down mid-module
def model(trained):
  return serving.load_from_training(trained)


@pytest.fixture(scope="session")  # session: xdist may tear a module fixture down mid-module
def prompts(model):
  tok = model.tokenizer
  return [tok.encode(q) for q in ("hi", "what is the capital of france?", "tell me a joke")]


def serve_together(engine, prompts, **kw):
  """Submits the prompts at once (one batch); returns their results."""
  futs = [engine.submit(rr.new_request(p, max_tokens=MAX_TOKENS[i], temperature=0.8, top_p=0.9,
                                       seed=10 + i, ignore_eos=True, **kw))
          for i, p in enumerate(prompts)]
  return [f.result(timeout=300) for f in futs]


@pytest.fixture(scope="session")  # session: xdist may tear a module fixture down mid-module
def served(model, prompts, trained, tmp_path_factory):
  engine = engine_lib.Engine(model, tmp_path_factory.mktemp("serving"), SETTINGS,
                             key_path=trained / "provider_key.pem").start()
  results = serve_together(engine, prompts)
  engine.stop()
  batch = rr.load_batch(engine.batches / rr.batch_name(results[0].batch_id))
  return {"engine": engine, "results": results, "batch": batch,
          "provider": request_provider.RequestProvider(batch, model)}


def test_concurrent_requests_share_one_padded_batch(served):
  res, batch = served["results"], served["batch"]
  assert {r.batch_id for r in res} == {res[0].batch_id}
  assert [r.row for r in res] == [0, 1, 2]
  assert batch.layout.rows == 4  # 3 requests + 1 filler row (the 4-row shape bucket)
  assert [len(r.tokens) for r in res] == list(MAX_TOKENS)  # each its own limit
  assert [r.finish_reason for r in res] == ["length"] * 3
  assert batch.layout.num_steps == max(MAX_TOKENS)
  assert batch.spec["prompt_width"] % SETTINGS.prompt_bucket == 0
  # The private requests file holds the fillers; the public spec holds no prompt at all.
  assert json.loads((batch.dir / "requests.json").read_text())["fillers"] == 1
  assert "prompt" not in json.dumps(batch.spec).replace("prompt_width", "")


def test_receipts_verify_pinned_to_the_training_key(served, training_commitment):
  key = training_commitment["signature"]["public_key"]
  for r in served["results"]:
    got = receipts_lib.check_receipt(r.receipt, public_key=key)
    assert got["tokens"] == r.tokens and got["row"] == r.row and got["key_pinned"]
    assert receipts_lib.receipt_size(r.receipt) < 4096
  with pytest.raises(receipts_lib.ReceiptError, match="signature"):
    receipts_lib.check_receipt(served["results"][0].receipt, public_key="00" * 32)


def _edit(path):
  def apply(receipt):
    node = receipt
    for p in path[:-1]:
      node = node[p]
    v = node[path[-1]]
    node[path[-1]] = (v + 1 if isinstance(v, int) and not isinstance(v, bool) else
                      not v if isinstance(v, bool) else
                      [v[0] + 1] + v[1:] if isinstance(v, list) and isinstance(v[0], int) else
                      ["00" * 32] + v[1:] if isinstance(v, list) else
                      "length" if v == "stop" else "stop" if v == "length" else
                      ("0" if v[0] != "0" else "1") + v[1:])
  return apply


@pytest.mark.parametrize("path,match", [
    (("output", "tokens"), "output of row"), (("output", "finish_reason"), "output of row"),
    (("request", "prompt"), "request of row"), (("request", "seed"), "request of row"),
    (("request", "max_tokens"), "request of row|more than"),
    (("request", "ignore_eos"), "request of row"), (("request", "salt"), "request of row"),
    (("row",), "of row"), (("proofs", "request"), "request of row"),
    (("proofs", "output"), "output of row"), (("commitment", "merkle_root"), "signature"),
    (("commitment", "layout", "rows"), "signature"), (("request_id",), "request id|pattern"),
])
def test_an_edited_receipt_is_refused(served, path, match):
  receipt = json.loads(json.dumps(served["results"][1].receipt))
  _edit(path)(receipt)
  with pytest.raises(receipts_lib.ReceiptError, match=match):
    receipts_lib.check_receipt(receipt)


def test_request_keys_depend_on_the_seed_and_step_only():
  a = sampling.request_keys([5, 7, 5], 3)
  assert np.array_equal(np.asarray(sampling.jax.random.key_data(a[0])),
                        np.asarray(sampling.jax.random.key_data(a[2])))
  assert not np.array_equal(np.asarray(sampling.jax.random.key_data(a[0])),
                            np.asarray(sampling.jax.random.key_data(a[1])))
  b = sampling.request_key(5, 3)
  assert np.array_equal(np.asarray(sampling.jax.random.key_data(b)),
                        np.asarray(sampling.jax.random.key_data(a[0])))


def test_a_row_replays_bitwise_at_the_committed_shape_whatever_the_other_rows(model, prompts):
  """The fact per-request audits rest on: at a fixed batch shape, XLA:CPU's result for a
  row does not depend on the other rows' values (the rows here are the row itself, or the
  batch's rows in another order), so the verifier replays its row copied B times."""
  b = model.blocked
  col = gen_lib.TraceCollector()
  res = gen_lib.generate(b.specs, b.trainable, b.frozen, prompts, max_new_tokens=3,
                         observer=col, pad_id=model.tokenizer.pad_id)
  fns = gen_lib.default_fns()
  n, size = len(prompts), res.max_total_len
  for row in range(n):
    for order in ([row] * n, [row] + [i for i in range(n) if i != row]):
      for k in range(b.num_blocks):
        cache = None
        mask = res.attn_mask[order]
        for s, st in enumerate(col.steps):
          x = np.asarray(st.block_inputs[k])[order]
          if s == 0:
            y, cache = fns.prefill(b.specs[k], b.trainable[k], b.frozen[k], x,
                                   gen_lib.prefill_ctx(mask), size)
          else:
            y, cache = fns.decode(b.specs[k], b.trainable[k], b.frozen[k], x, cache,
                                  gen_lib.decode_ctx(mask, s, size))
          assert np.array_equal(np.asarray(y)[0], np.asarray(st.block_outputs[k])[row]), (
              row, order, k, s)


def test_every_cell_of_a_request_passes_its_own_audit(served, model, training_commitment):
  res = served["results"][1]
  prov = served["provider"]
  lay = served["batch"].layout
  config = model.model_cfg.to_dict()
  for k in range(lay.num_layer_blocks):
    for t in range(len(res.tokens)):
      bundle = prov.open_cell(res.row, k, t)
      rep = rv.verify_request_bundle(
          bundle, receipt=res.receipt, expected_model_hash=training_commitment["final_model_hash"],
          expected_model_config=config, first_pass=(t == len(res.tokens) - 1))
      assert rep.passed, (k, t, rep.check, rep.reason)
      if t == len(res.tokens) - 1:
        fp = [v for key, v in rep.max_rel_err.items() if key.startswith("first_pass/")]
        assert fp and max(fp) <= rv.FIRST_PASS_TOLERANCES["fwd_out"]


def test_an_opening_reveals_nothing_of_the_other_rows(served):
  res = served["results"][0]
  bundle = served["provider"].open_cell(res.row, 1, 2)
  text = json.dumps(bundle.manifest)
  for other in served["batch"].requests[1:]:
    assert other.salt not in text and other.request_id not in text
  rows = {e["row"] for e in bundle.manifest["leaves"] if e["kind"] != "serve_spec"}
  assert rows == {res.row}
  for name, arr in bundle.tensors.items():
    if name.startswith(("step/", "out/", "tokens/")):
      assert arr.shape[0] == 1, name


def test_the_bundle_round_trips_through_a_file_with_the_exact_schema(served, tmp_path):
  res = served["results"][2]
  path = tmp_path / "cell.bundle"
  bundle_lib.write_bundle(path, served["provider"].open_cell(res.row, 2, 3))
  back = bundle_lib.read_bundle(path, schema=lambda m: rv.tensor_schema(m, res.receipt))
  assert rv.verify_request_bundle(back, receipt=res.receipt).passed
  # Another client's receipt (row 0) does not accept row 2's opening.
  with pytest.raises(core.AuditInputError, match="opening is for request"):
    rv.verify_request_bundle(back, receipt=served["results"][0].receipt)


def _tampered(bundle, fn):
  b = bundle_lib.Bundle(json.loads(json.dumps(bundle.manifest)), dict(bundle.tensors))
  fn(b)
  return b


def test_a_tampered_opening_fails_the_right_check(served):
  res = served["results"][1]
  prov = served["provider"]
  bundle = prov.open_cell(res.row, 1, 2)
  verify = lambda b: rv.verify_request_bundle(b, receipt=res.receipt)

  def edit_tensor(b):
    name = "out/2/1"
    b.tensors[name] = b.tensors[name] + np.float32(1e-3)

  def other_rows_leaf(b):  # row 0's leaf, with its own valid proof
    other = prov.open_cell(0, 1, 2).manifest["leaves"]
    i = next(i for i, e in enumerate(b.manifest["leaves"]) if e["kind"] == "inf_out")
    b.manifest["leaves"][i] = next(e for e in other if e["kind"] == "inf_out")

  def forged_proof(b):
    e = next(e for e in b.manifest["leaves"] if e["kind"] == "sample_key")
    e["proof"][0] = "00" * 32

  def other_weights(b):
    name = next(n for n in b.tensors if n.startswith("params/"))
    b.tensors[name] = b.tensors[name] * np.asarray(1.01, b.tensors[name].dtype)

  for fn, check in ((edit_tensor, "opening"), (other_rows_leaf, "inclusion"),
                    (forged_proof, "inclusion"), (other_weights, "model")):
    rep = verify(_tampered(bundle, fn))
    assert not rep.passed and rep.check == check, (fn.__name__, rep.check, rep.reason)


@pytest.mark.parametrize("attack,caught", [
    (attacks.PerturbedActivation(block=1, step=2, scale=1e-2), {(1, 2): "fwd_out", (1, 3): "fwd_out",
                                                                 (0, 2): None, (2, 1): None}),
    (attacks.SwappedToken(step=1, row=1), {(2, 1): "token", (2, 0): None, (1, 1): None}),
    # It claims the promised hash; its own digests do not hash to it: every cell fails.
    (attacks.EditedLayer(), {(1, 0): "model", (0, 0): "model"}),
])
def test_a_dishonest_server_is_caught_by_the_client_it_cheated(attack, caught, model, prompts,
                                                               trained, tmp_path, training_commitment):
  engine = engine_lib.Engine(model, tmp_path, SETTINGS, key_path=trained / "provider_key.pem",
                             hooks=attack).start()
  res = serve_together(engine, prompts)[1]  # row 1
  engine.stop()
  batch = rr.load_batch(engine.batches / rr.batch_name(res.batch_id))
  prov = request_provider.RequestProvider(batch, engine.model)  # reveals what it served
  for (k, t), check in caught.items():
    rep = rv.verify_request_bundle(prov.open_cell(res.row, k, t), receipt=res.receipt,
                                   expected_model_hash=training_commitment["final_model_hash"])
    assert rep.passed == (check is None) and (check is None or rep.check == check), (
        (k, t), rep.check, rep.reason)
  if isinstance(attack, attacks.PerturbedActivation):  # the cheap pass sees it too
    rep = rv.verify_request_bundle(prov.open_cell(res.row, 1, 3), receipt=res.receipt,
                                   first_pass=True, mode="tolerance")
    assert not rep.passed and rep.check == "first_pass" and rep.step == 2


def test_a_killed_batch_leaves_no_record_and_ids_continue(model, trained, tmp_path, prompts):
  (tmp_path / "batches" / ".tmp-00000004").mkdir(parents=True)  # killed while writing
  (tmp_path / "batches" / "00000003").mkdir()
  engine = engine_lib.Engine(model, tmp_path, SETTINGS, key_path=trained / "provider_key.pem")
  assert engine.next_batch_id == 4
  assert not (tmp_path / "batches" / ".tmp-00000004").exists()


# ---------------------------------------------------------------------------------
# HTTP, in process.


@pytest.fixture(scope="session")  # session: xdist may tear a module fixture down mid-module
def http(model, trained, training_commitment, tmp_path_factory):
  from starlette.testclient import TestClient  # pylint: disable=g-import-not-at-top
  from aftune.audit import train_provider  # pylint: disable=g-import-not-at-top
  from aftune.infer import http_api  # pylint: disable=g-import-not-at-top
  engine = engine_lib.Engine(model, tmp_path_factory.mktemp("http"),
                             dataclasses.replace(SETTINGS, batch_window_s=0.01),
                             key_path=trained / "provider_key.pem")
  api = http_api.Api(engine, model_name="tiny", training_commitment=training_commitment,
                     training_binding=train_provider.Provider(trained).training_binding())
  with TestClient(http_api.make_app(api)) as client:
    yield client


def test_chat_and_completions_have_the_conventional_shapes(http, model, training_commitment):
  key = training_commitment["signature"]["public_key"]
  r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                              "max_tokens": 3, "ignore_eos": True, "seed": 1})
  assert r.status_code == 200, r.text
  body = r.json()
  assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
  toks = body["aftune"]["tokens"]
  assert len(toks) == 3 and body["usage"]["completion_tokens"] == 3
  assert body["choices"][0]["message"]["content"] == model.tokenizer.decode(toks, skip_special_tokens=True)
  assert receipts_lib.check_receipt(body["aftune"]["receipt"], public_key=key)["tokens"] == toks
  r = http.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 2, "ignore_eos": True})
  body = r.json()
  assert r.status_code == 200 and body["object"] == "text_completion"
  assert body["aftune"]["receipt"]["request"]["prompt"] == [5, 6, 7]
  # The same seed and prompt give the same tokens (greedy or sampled: the key is the request's).
  again = http.post("/v1/chat/completions", json={
      "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "ignore_eos": True,
      "seed": 1}).json()
  assert again["aftune"]["tokens"] == toks
  assert http.get(f"/v1/receipts/{body['aftune']['request_id']}").json() == body["aftune"]["receipt"]
  assert http.get("/v1/provider").json()["public_key"] == key
  assert http.get("/v1/models").json()["data"][0]["aftune"]["model_hash"] == model.model_hash


@pytest.mark.parametrize("route,body,status,param", [
    ("/v1/completions", {"prompt": "x", "n": 2}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "logprobs": 3}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "stop": ["\n"]}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "frobnicate": 1}, 400, "frobnicate"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 9}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "4"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": [1, 10**9]}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0]"),
    ("/v1/audit/open", {"request_id": "ab" * 16, "cell": [0, 0]}, 404, "request_id"),
    ("/v1/audit/open", {"request_id": "ab" * 16, "cell": [0]}, 400, "cell"),
])
def test_unsupported_or_bad_requests_get_one_clear_4xx(http, route, body, status, param):
  r = http.post(route, json=body)
  assert r.status_code == status, r.text
  assert r.json()["error"]["param"] == param and r.json()["error"]["message"]


def test_malformed_bodies_and_routes(http):
  assert http.post("/v1/completions", content=b"{not json").status_code == 400
  assert http.post("/v1/completions", content=b"[1, 2]").status_code == 400
  assert http.post("/v1/completions", content=b" " * (2 << 20)).status_code == 413
  assert http.get("/v1/completions").status_code == 405
  assert http.get("/v1/receipts/" + "ab" * 16).status_code == 404
  assert http.get("/v1/receipts/..%2f..%2fetc").status_code == 404
  assert http.get("/nope").status_code == 404


def test_a_stream_sends_the_id_first_then_tokens_then_the_receipt(http, model):
  with http.stream("POST", "/v1/chat/completions", json={
      "messages": [{"role": "user", "content": "tell me a joke"}], "max_tokens": 5,
      "ignore_eos": True, "stream": True}) as r:
    assert r.status_code == 200
    events = [l[len("data: "):] for l in r.iter_lines() if l.startswith("data: ")]
  assert events[-1] == "[DONE]"
  chunks = [json.loads(e) for e in events[:-1]]
  rid = chunks[0]["aftune"]["request_id"]
  assert all(c["id"] == "chatcmpl-" + rid and c["object"] == "chat.completion.chunk" for c in chunks)
  final = chunks[-1]
  assert final["choices"][0]["finish_reason"] == "length"
  toks = final["aftune"]["tokens"]
  text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
  assert text == model.tokenizer.decode(toks, skip_special_tokens=True)
  assert receipts_lib.check_receipt(final["aftune"]["receipt"])["tokens"] == toks


def test_a_request_is_audited_over_http(http, tmp_path, training_commitment):
  from aftune.audit import request_audit  # pylint: disable=g-import-not-at-top
  body = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                  "max_tokens": 4, "ignore_eos": True}).json()
  receipt = body["aftune"]["receipt"]
  (tmp_path / "receipt.json").write_text(json.dumps(receipt))
  challenge = rv.draw_cells(receipt, 3, seed=0)
  paths = []
  for k, t in challenge.cells:
    r = http.post("/v1/audit/open", json={"request_id": receipt["request_id"], "cell": [k, t]})
    assert r.status_code == 200, r.text
    paths.append(tmp_path / f"{k}_{t}.bundle")
    paths[-1].write_bytes(r.content)
  verdict = request_audit.verify_request(paths, receipt_path=tmp_path / "receipt.json",
                                         challenge=challenge, training_commitment=training_commitment)
  assert verdict["passed"] and len(verdict["cells"]) == 3, verdict
  assert [u.split(":")[0] for u in verdict["unchecked"]] == ["promised architecture"]
  # A cell outside the request's grid is refused by the provider.
  r = http.post("/v1/audit/open", json={"request_id": receipt["request_id"], "cell": [9, 0]})
  assert r.status_code == 400 and "outside" in r.json()["error"]["message"]


def test_concurrent_http_clients_are_batched(http):
  out, lock = [], threading.Lock()

  def one(i):
    r = http.post("/v1/completions", json={"prompt": [3 + i, 4], "max_tokens": 2,
                                           "ignore_eos": True, "seed": i})
    with lock:
      out.append(r.json()["aftune"])

  threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert len(out) == 4 and all(receipts_lib.check_receipt(a["receipt"]) for a in out)
  assert len({a["batch_id"] for a in out}) < 4  # some requests shared a batch


def test_a_hostile_bundle_file_is_malformed_input_not_a_crash(served, tmp_path):
  """Shapes are checked before anything is read: a spec that is not a batch spec, a cell
  outside the layout, a tensor the cell does not need are one BundleError each."""
  res = served["results"][2]
  good = served["provider"].open_cell(res.row, 1, 1)
  schema = lambda m: rv.tensor_schema(m, res.receipt)
  cases = {
      "spec": lambda b: b.manifest["spec"].__setitem__("environment", "x"),
      "extra tensor": lambda b: b.tensors.__setitem__("out/9/9", np.zeros(3, np.float32)),
      "other cell": lambda b: b.manifest["cell"].__setitem__("step_block", 99),
      "leaf kind": lambda b: b.manifest["leaves"][0].__setitem__("kind", "../x"),
  }
  for name, fn in cases.items():
    path = tmp_path / f"{name}.bundle"
    bundle_lib.write_bundle(path, _tampered(good, fn))
    if name == "other cell":  # a cell outside the layout: no tensors are read, it fails
      back = bundle_lib.read_bundle(path, schema=schema)
      assert back.tensors == {}
      with pytest.raises(core.AuditInputError, match="outside"):
        rv.verify_request_bundle(back, receipt=res.receipt)
      continue
    with pytest.raises(bundle_lib.BundleError):
      bundle_lib.read_bundle(path, schema=schema)


def test_unstored_outputs_are_regenerated_by_running_the_batch_again(model, prompts, trained,
                                                                     tmp_path):
  """I_A = 2: blocks 1 (and 3, ...) are not stored; the provider reruns the batch (every
  row's request is in its private requests.json) and the openings still verify bitwise."""
  engine = engine_lib.Engine(model, tmp_path, dataclasses.replace(SETTINGS, activation_interval=2),
                             key_path=trained / "provider_key.pem").start()
  res = serve_together(engine, prompts)[2]
  engine.stop()
  batch = rr.load_batch(engine.batches / rr.batch_name(res.batch_id))
  prov = request_provider.RequestProvider(batch, model)
  assert "out/0/1" not in prov.stored and "out/0/0" in prov.stored
  for k, t in ((1, 0), (1, 3), (2, 2)):  # block 1 unstored: its own output and block 2's input
    rep = rv.verify_request_bundle(prov.open_cell(res.row, k, t), receipt=res.receipt)
    assert rep.passed, (k, t, rep.check, rep.reason)
  assert prov._regenerated is not None  # pylint: disable=protected-access

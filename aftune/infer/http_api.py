"""The HTTP API of the auditable server (Starlette, served by uvicorn in `experiments.serve`).

OpenAI-shaped routes, the subset aftune supports:

  POST /v1/completions        {"prompt": str | [ids], "max_tokens", "temperature", "top_p",
                              "top_k", "ignore_eos" (vLLM's extensions), "seed", "stream",
                              "n": 1}
  POST /v1/chat/completions   {"messages": [{"role", "content"}], same settings}
  GET  /v1/models             the served model, its hash and where it comes from
  GET  /v1/provider           the provider's public key, the served model hash, the
                              training commitment the model is the end state of
  GET  /v1/receipts/{id}      a request's receipt (kept on disk: a client that lost its
                              connection mid-stream fetches it here)
  POST /v1/audit/open         {"request_id", "cell": [k, t]} -> the opening bundle (bytes)
                              of that cell of that request only
  GET  /healthz

Every response to a generation carries `aftune`: {"request_id", "tokens", "receipt"}. A
stream (`"stream": true`, server-sent events) sends the request id in its first event,
one event per token, then the finish reason and the receipt, then `data: [DONE]`.
Anything else (n > 1, logprobs, echo, stop strings, penalties, suffix, best_of, tools,
unknown fields, a body over 1 MiB) is a 400 with an OpenAI-shaped error naming the field.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.responses import Response
from starlette.responses import StreamingResponse
from starlette.routing import Route

from aftune.audit import bundle as bundle_lib
from aftune.audit import provider as provider_lib
from aftune.audit import request_provider
from aftune.data import encoding
from aftune.data import records as records_lib
from aftune.infer import engine as engine_lib
from aftune.infer import request_record as rr

MAX_BODY = 1 << 20
MAX_OPEN_CELLS = 64
_SETTINGS = {"max_tokens", "temperature", "top_p", "top_k", "seed", "stream", "n", "model", "user",
             "ignore_eos"}
# Accepted only at their no-op values.
_NEUTRAL = {"logprobs": (None, False, 0), "echo": (None, False), "stop": (None, [], ""),
            "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
            "best_of": (None, 1), "suffix": (None, ""), "logit_bias": (None, {}),
            "top_logprobs": (None, 0), "stream_options": (None,), "tools": (None, []),
            "tool_choice": (None, "none"), "response_format": (None,)}


class BadRequest(Exception):

  def __init__(self, message: str, param: str | None = None, status: int = 400):
    super().__init__(message)
    self.message, self.param, self.status = message, param, status


def _error(e: BadRequest) -> JSONResponse:
  kind = "invalid_request_error" if e.status < 500 else "server_error"
  return JSONResponse({"error": {"message": e.message, "type": kind, "param": e.param,
                                 "code": None}}, status_code=e.status)


async def _body(request: Request) -> dict[str, Any]:
  size = request.headers.get("content-length")
  if size is not None and (not size.isdigit() or int(size) > MAX_BODY):
    raise BadRequest(f"the body is over {MAX_BODY} bytes", status=413)
  raw = b""
  async for chunk in request.stream():
    raw += chunk
    if len(raw) > MAX_BODY:
      raise BadRequest(f"the body is over {MAX_BODY} bytes", status=413)
  try:
    body = json.loads(raw)
  except (ValueError, UnicodeDecodeError) as e:
    raise BadRequest(f"the body is not JSON ({e})") from None
  if not isinstance(body, dict):
    raise BadRequest("the body must be a JSON object")
  return body


def _number(body, name, default, kind, lo=None, hi=None):
  v = body.get(name, default)
  if v is None:
    v = default
  ok_types = (int,) if kind is int else (int, float)
  if isinstance(v, bool) or not isinstance(v, ok_types):
    raise BadRequest(f"{name} must be a{'n integer' if kind is int else ' number'}", name)
  if (lo is not None and v < lo) or (hi is not None and v > hi):
    raise BadRequest(f"{name} must be in [{lo}, {hi}], got {v}", name)
  return kind(v)


class Api:
  """The routes over one `engine.Engine` (and the served model's tokenizer)."""

  def __init__(self, engine: engine_lib.Engine, *, model_name: str,
               training_commitment: dict | None = None, training_binding: dict | None = None):
    self.engine, self.model_name = engine, model_name
    self.training_commitment, self.training_binding = training_commitment, training_binding
    self.tok, self.template = engine.model.tokenizer, engine.model.template

  # ----------------------------------------------------------------- parsing

  def _request(self, body: dict, prompt: list[int]) -> rr.Request:
    s = self.engine.settings
    if _number(body, "n", 1, int, 1, 1) != 1:
      raise BadRequest("n must be 1", "n")
    max_tokens = _number(body, "max_tokens", s.default_max_tokens, int, 1, s.max_tokens_cap)
    temperature = _number(body, "temperature", 0.0, float, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, float, 1e-6, 1.0)
    top_k = _number(body, "top_k", 0, int, 0, 1 << 20)
    seed = body.get("seed")
    if seed is not None:
      seed = _number(body, "seed", 0, int, 0, 2**32 - 1)
    ignore_eos = body.get("ignore_eos", False)
    if ignore_eos not in (True, False):
      raise BadRequest("ignore_eos must be a boolean", "ignore_eos")
    if not prompt:
      raise BadRequest("the prompt is empty", "prompt")
    if len(prompt) > s.max_prompt_tokens:
      raise BadRequest(f"the prompt has {len(prompt)} tokens, this server takes at most "
                       f"{s.max_prompt_tokens}", "prompt")
    vocab = int(self.engine.model.model_cfg.vocab_size)
    if any(not 0 <= x < vocab for x in prompt):
      raise BadRequest(f"prompt token ids must be in [0, {vocab - 1}]", "prompt")
    return rr.new_request(prompt, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                          top_p=top_p, seed=seed, ignore_eos=ignore_eos)

  def _check_fields(self, body: dict, own: set[str]) -> None:
    for name, value in body.items():
      if name in _NEUTRAL:
        if value not in _NEUTRAL[name]:
          raise BadRequest(f"{name} is not supported by this server", name)
      elif name not in _SETTINGS | own:
        raise BadRequest(f"unknown field {name!r}", name)
    if body.get("stream") not in (None, True, False):
      raise BadRequest("stream must be a boolean", "stream")

  def _completion_prompt(self, body: dict) -> list[int]:
    self._check_fields(body, {"prompt"})
    p = body.get("prompt")
    if isinstance(p, str):
      return self.tok.encode(p)
    if isinstance(p, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in p):
      return list(p)
    raise BadRequest("prompt must be a string or a list of token ids (one prompt)", "prompt")

  def _chat_prompt(self, body: dict) -> list[int]:
    self._check_fields(body, {"messages"})
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
      raise BadRequest("messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(msgs):
      if (not isinstance(m, dict) or set(m) - {"role", "content", "name"} or
          m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str)):
        raise BadRequest(f"messages[{i}] must be {{role: system|user|assistant, content: str}}",
                         f"messages[{i}]")
      out.append(records_lib.Message(m["role"], m["content"]))
    return encoding.encode_prompt(out, self.tok, self.template)

  # ----------------------------------------------------------------- generation

  async def completions(self, request: Request) -> Response:
    return await self._generate(request, chat=False)

  async def chat_completions(self, request: Request) -> Response:
    return await self._generate(request, chat=True)

  async def _generate(self, request: Request, *, chat: bool) -> Response:
    try:
      body = await _body(request)
      prompt = self._chat_prompt(body) if chat else self._completion_prompt(body)
      req = self._request(body, prompt)
    except BadRequest as e:
      return _error(e)
    created = int(time.time())
    rid = ("chatcmpl-" if chat else "cmpl-") + req.request_id
    if body.get("stream"):
      return self._stream(req, rid, created, chat)
    fut = self.engine.submit(req)
    try:
      res = await asyncio.shield(asyncio.wrap_future(fut))
    except Exception as e:  # pylint: disable=broad-except
      return _error(BadRequest(f"generation failed: {e}", status=500))
    text = self.tok.decode(res.tokens, skip_special_tokens=True)
    choice = ({"index": 0, "message": {"role": "assistant", "content": text},
               "finish_reason": res.finish_reason} if chat else
              {"index": 0, "text": text, "finish_reason": res.finish_reason, "logprobs": None})
    return JSONResponse({
        "id": rid, "object": "chat.completion" if chat else "text_completion",
        "created": created, "model": self.model_name, "choices": [choice],
        "usage": {"prompt_tokens": res.prompt_tokens, "completion_tokens": len(res.tokens),
                  "total_tokens": res.prompt_tokens + len(res.tokens)},
        "aftune": self._aftune(res)})

  def _aftune(self, res: engine_lib.Result) -> dict:
    return {"request_id": res.request_id, "tokens": res.tokens, "batch_id": res.batch_id,
            "receipt": res.receipt}

  def _stream(self, req: rr.Request, rid: str, created: int, chat: bool) -> StreamingResponse:
    loop = asyncio.get_running_loop()
    tokens: asyncio.Queue = asyncio.Queue()
    fut = self.engine.submit(req, on_token=lambda tok: loop.call_soon_threadsafe(tokens.put_nowait, tok))
    done = asyncio.wrap_future(fut)
    kind = "chat.completion.chunk" if chat else "text_completion"

    def event(delta: str | None, finish: str | None = None, extra: dict | None = None) -> bytes:
      if chat:
        choice = {"index": 0, "delta": {} if delta is None else {"content": delta},
                  "finish_reason": finish}
      else:
        choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
      obj = {"id": rid, "object": kind, "created": created, "model": self.model_name,
             "choices": [choice]}
      if extra:
        obj["aftune"] = extra
      return f"data: {json.dumps(obj)}\n\n".encode()

    async def events():
      # The id first: a client that disconnects can still fetch its receipt by it.
      yield event(None, extra={"request_id": req.request_id})
      got: list[int] = []
      text = ""
      while True:
        getter = asyncio.ensure_future(tokens.get())
        finished, _ = await asyncio.wait({getter, done}, return_when=asyncio.FIRST_COMPLETED)
        if getter in finished:
          got.append(getter.result())
          new = self.tok.decode(got, skip_special_tokens=True)
          if new != text:
            yield event(new[len(text):])
            text = new
          continue
        getter.cancel()
        break
      try:
        res = done.result()
      except Exception as e:  # pylint: disable=broad-except
        yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error'}})}\n\n".encode()
        return
      rest = self.tok.decode(res.tokens, skip_special_tokens=True)
      yield event(rest[len(text):] if rest.startswith(text) else None, res.finish_reason,
                  self._aftune(res))
      yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")

  # ----------------------------------------------------------------- the rest

  async def models(self, request: Request) -> Response:
    del request
    m = self.engine.model
    return JSONResponse({"object": "list", "data": [{
        "id": self.model_name, "object": "model", "owned_by": "aftune",
        "aftune": {"model_hash": m.model_hash, "source": m.source}}]})

  async def provider(self, request: Request) -> Response:
    del request
    from cryptography.hazmat.primitives import serialization  # pylint: disable=g-import-not-at-top
    pub = self.engine.key.public_key().public_bytes(serialization.Encoding.Raw,
                                                     serialization.PublicFormat.Raw).hex()
    return JSONResponse({"public_key": pub, "model_hash": self.engine.model.model_hash,
                         "source": self.engine.model.source,
                         "training_commitment": self.training_commitment,
                         "recording": self.engine.settings.record})

  async def receipt(self, request: Request) -> Response:
    path = self.engine.receipt_path(request.path_params["request_id"])
    if path is None:
      return _error(BadRequest("no receipt for this request id (unknown, not recorded, or its "
                               "batch is still running)", "request_id", 404))
    return Response(path.read_bytes(), media_type="application/json")

  async def audit_open(self, request: Request) -> Response:
    try:
      body = await _body(request)
      rid, cell = body.get("request_id"), body.get("cell")
      if set(body) - {"request_id", "cell"} or not isinstance(rid, str):
        raise BadRequest("the body is {request_id: str, cell: [layer_block, step]}")
      if (not isinstance(cell, list) or len(cell) != 2 or
          not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in cell)):
        raise BadRequest("cell must be [layer_block, step]", "cell")
      path = self.engine.receipt_path(rid)
      if path is None:
        raise BadRequest("no recorded request with this id", "request_id", 404)
      data = await asyncio.to_thread(self._open, path.parent.parent, rid, tuple(cell))
    except BadRequest as e:
      return _error(e)
    except provider_lib.OpeningError as e:
      return _error(BadRequest(str(e), "cell"))
    return Response(data, media_type="application/octet-stream")

  def _open(self, batch_dir: Path, request_id: str, cell: tuple[int, int]) -> bytes:
    batch = rr.load_batch(batch_dir)
    prov = request_provider.RequestProvider(batch, self.engine.model,
                                            training_binding=self.training_binding)
    bundle = prov.open_cell(prov.row_of(request_id), *cell)
    with tempfile.TemporaryDirectory() as d:
      path = Path(d) / "cell.bundle"
      bundle_lib.write_bundle(path, bundle)
      return path.read_bytes()

  async def healthz(self, request: Request) -> Response:
    del request
    return JSONResponse({"status": "ok", **{k: v for k, v in self.engine.stats.items()}})


def make_app(api: Api) -> Starlette:
  """The ASGI app; the engine starts with the app and stops with it."""
  import contextlib  # pylint: disable=g-import-not-at-top

  @contextlib.asynccontextmanager
  async def lifespan(app):
    del app
    api.engine.start()
    try:
      yield
    finally:
      await asyncio.to_thread(api.engine.stop)

  return Starlette(routes=[
      Route("/v1/completions", api.completions, methods=["POST"]),
      Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
      Route("/v1/models", api.models, methods=["GET"]),
      Route("/v1/provider", api.provider, methods=["GET"]),
      Route("/v1/receipts/{request_id}", api.receipt, methods=["GET"]),
      Route("/v1/audit/open", api.audit_open, methods=["POST"]),
      Route("/healthz", api.healthz, methods=["GET"]),
  ], lifespan=lifespan)

"""The PyTorch baseline for CPU speed: a plain transformers training step of the same model.

`bench_train` times it interleaved with aftune's blocked and plain steps when torch and
transformers are installed (the `hf` extra): the same architecture (a `LlamaForCausalLM`
built from the job's model config, random init), the same batches and loss (masked mean
cross-entropy over the targets), AdamW with the job's betas, eps and weight decay and
global-norm clipping, the same compute dtype (bf16 via CPU autocast, parameters fp32, as
aftune does) and as many intra-op threads as XLA's pool. It answers "what does aftune's
auditable step cost against the framework a provider would otherwise use", not "are the
bits equal" (they are not: another library, another summation order).
"""

from __future__ import annotations

from typing import Any
from typing import Callable

import numpy as np

from aftune import provenance


def available() -> bool:
  try:
    import torch  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    import transformers  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def step_fn(model_cfg: Any, opt_cfg: Any, batches: list[dict[str, Any]], seed: int = 0
            ) -> tuple[Callable[[int], float], list[float]] | None:
  """A step function (step index -> loss) of the torch model and its loss list, or None
  when torch is missing or the family has no transformers counterpart here."""
  if not available() or model_cfg.arch != "llama" or getattr(model_cfg, "lora", None):
    return None
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  torch.manual_seed(seed)
  torch.set_num_threads(provenance.intra_op_threads())
  head_dim = model_cfg.head_dim or model_cfg.hidden_size // model_cfg.num_heads
  hf_cfg = transformers.LlamaConfig(
      vocab_size=model_cfg.vocab_size, hidden_size=model_cfg.hidden_size,
      intermediate_size=model_cfg.intermediate_size, num_hidden_layers=model_cfg.num_layers,
      num_attention_heads=model_cfg.num_heads, num_key_value_heads=model_cfg.num_kv_heads,
      head_dim=head_dim, rope_theta=model_cfg.rope_theta, rms_norm_eps=model_cfg.rms_norm_eps,
      tie_word_embeddings=model_cfg.tie_embeddings, attention_bias=False, mlp_bias=False,
      max_position_embeddings=int(np.asarray(batches[0]["tokens"]).shape[1]),
      attn_implementation="sdpa")
  model = transformers.LlamaForCausalLM(hf_cfg).float().train()
  if opt_cfg.name == "sgd":
    opt = torch.optim.SGD(model.parameters(), lr=opt_cfg.learning_rate,
                          momentum=opt_cfg.momentum, nesterov=opt_cfg.nesterov)
  else:
    opt = torch.optim.AdamW(model.parameters(), lr=opt_cfg.learning_rate,
                            betas=(opt_cfg.b1, opt_cfg.b2), eps=opt_cfg.eps,
                            weight_decay=opt_cfg.weight_decay)
  bf16 = str(model_cfg.dtype) == "bfloat16"
  host = [{k: torch.from_numpy(np.asarray(v).copy()) for k, v in b.items()} for b in batches]
  losses: list[float] = []

  def step(i: int) -> float:
    b = host[i]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
      logits = model(input_ids=b["tokens"].long(), attention_mask=b["attn_mask"].long()).logits
    nll = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1),
                                            b["targets"].long().flatten(), reduction="none")
    mask = b["loss_mask"].flatten()
    loss = (nll * mask).sum() / mask.sum().clamp(min=1.0)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if opt_cfg.clip_norm:
      torch.nn.utils.clip_grad_norm_(model.parameters(), opt_cfg.clip_norm)
    opt.step()
    value = float(loss.detach())  # synchronous on CPU: the step is done
    losses.append(value)
    return value

  return step, losses

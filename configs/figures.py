"""Run sheets of the paper's evaluation (`paper_figures.make_all`).

  python -m paper_figures.make_all --scale small --out paper_figures/out   # ~20 min, 2 cores
  python -m paper_figures.make_all --scale smoke --out /tmp/figs           # ~1-2 min: the CI test

Variants (the `--scale`):
  smoke  the smoke decoder and ViT, two points per swept setting, 2 attacks on a 3 x 2 grid:
         every figure and table exists and holds what the runs wrote; the numbers mean little.
  small  the tiny decoder (1M) and vit_tiny, the swept settings of the paper's figures, the
         attack sheet `configs/attacks.py:small` with the attack-success measurements.
  paper  Llama-3.1-8B (`configs/finetune.py:llama3_8b`) and ViT-Large (`configs/vision.py:
         vit_large`) at the paper's grid: set --sheet.lm.model.hf_path,
         --sheet.attacks.train.model.hf_path, --sheet.vision.model.hf_path and
         --sheet.vision.data.train_path (with --sheet configs/figures.py:paper); for a GPU.

Every experiment point is one run of an `aftune.bench` / `experiments.attack_eval` library
function with this sheet's settings and one swept value; its results file carries the hash
of the part of the sheet it depends on, so changing one sweep reruns only that sweep.
"""

import ml_collections

from configs import attacks
from configs import finetune
from configs import vision


def _sweeps(b_s, b_l, i_c, i_a) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"B_S": b_s, "B_L": b_l, "I_C": i_c, "I_A": i_a})


def get_config(variant: str = "small") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.scale = variant
  # The two models of figure 1 (recording overhead): a language model and a vision model.
  c.lm = finetune.get_config("tiny")
  c.vision = vision.get_config("vit_tiny")
  # The centre of every sweep: one setting varies, the others stay here (B_S, B_L, I_C, I_A).
  c.centre = ml_collections.ConfigDict({"B_S": 4, "B_L": 2, "I_C": 2, "I_A": 1})
  c.record = ml_collections.ConfigDict()
  c.record.sweep = _sweeps((2, 4, 8), (1, 2, 3), (1, 2, 4), (1, 2, 3))  # figures 1 and 2
  c.record.vision_sweep = _sweeps((2, 4, 8), (1, 2, 3), (1, 2, 4), (1, 2, 3))
  # (I_C, I_A) pairs off the one-at-a-time sweeps (figure 2); the reference implementation
  # refuses I_C > 1 together with I_A > 1, which the centre's I_C = 2 makes of every I_A > 1.
  c.record.pairs = ((1, 2),)
  c.record.steps = 16  # timed steps per variant (aftune.bench.record.bench_record)
  c.record.warmup = 2
  c.record.round_steps = 2
  c.verify = ml_collections.ConfigDict()  # figure 3 (aftune.bench.verify.bench_verify)
  c.verify.sweep = _sweeps((2, 4, 8), (1, 2, 3), (1, 2, 4), (1, 2))
  c.verify.num_step_blocks = 4  # step blocks recorded and audited (>= the largest I_C)
  c.verify.rates = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)  # audit cost vs sampling rate
  c.verify.cold = True  # clear JAX's caches first: the first cell compiles, as a new verifier
  c.infer = ml_collections.ConfigDict()  # figure 6 (aftune.bench.infer.bench_infer)
  c.infer.sweep = ml_collections.ConfigDict({"B_L": (1, 2, 3), "I_A": (1, 2, 3)})
  c.infer.prompts = 4
  c.infer.max_prompt_len = 48
  c.infer.max_new_tokens = 16
  c.infer.rounds = 5
  c.infer.warmup = 1
  c.infer.verify_cells = 6
  # Figures 4, 5, 7: the attack suite (experiments.attack_eval), attack success included.
  c.attacks = attacks.get_config("small")
  c.attacks.success_options = ml_collections.ConfigDict()  # edits.success_table's step counts
  c.detection_ks = (2, 4, 8, 16, 32, 64)  # figure 4's computed curves

  if variant == "small":
    pass
  elif variant == "smoke":
    c.lm = finetune.get_config("smoke")
    c.vision = vision.get_config("smoke")
    c.centre = ml_collections.ConfigDict({"B_S": 2, "B_L": 2, "I_C": 1, "I_A": 1})
    # B_L changes the compiled block functions (a compilation each): one value at this scale.
    c.record.sweep = _sweeps((2, 4), (2,), (1, 2), (1, 2))
    c.record.vision_sweep = _sweeps((2,), (2,), (1,), (1,))
    c.record.pairs = ((2, 2),)
    c.record.steps, c.record.warmup, c.record.round_steps = 2, 1, 1
    c.verify.sweep = _sweeps((2,), (2,), (1, 2), (1,))
    c.verify.num_step_blocks = 2
    c.verify.cold = False
    c.infer.sweep = ml_collections.ConfigDict({"B_L": (2,), "I_A": (1, 2)})
    c.infer.prompts, c.infer.max_prompt_len, c.infer.max_new_tokens = 2, 32, 4
    c.infer.rounds, c.infer.verify_cells = 2, 2
    c.attacks = attacks.get_config("smoke")
    c.attacks.train.num_steps = 4
    c.attacks.attacks = ("skip_steps:0.5", "final_edit:1")
    c.attacks.strategies = ("uniform", "input_only", "output_only")
    c.attacks.rates = (0.2, 0.5)
    c.attacks.draws = 40
    c.attacks.sims = 500
    c.attacks.success = True
    c.attacks.success_options = ml_collections.ConfigDict(
        {"backdoor_steps": 4, "backdoor_pgd_steps": 3, "pgd_steps": 3, "norms": ("linf",),
         "backdoor_blocks": (1,), "activation_blocks": (1,)})
    c.detection_ks = (2, 4, 8)
  elif variant == "paper":
    c.lm = finetune.get_config("llama3_8b")
    c.vision = vision.get_config("vit_large")
    c.centre = ml_collections.ConfigDict({"B_S": 8, "B_L": 4, "I_C": 8, "I_A": 1})
    c.record.sweep = _sweeps((4, 8, 16), (2, 4, 8), (1, 4, 8, 16), (1, 2, 4))
    c.record.vision_sweep = _sweeps((4, 8, 16), (4, 8, 12), (1, 4, 8, 16), (1, 2, 4))
    c.record.pairs = ((1, 4),)
    c.record.steps, c.record.warmup, c.record.round_steps = 32, 2, 4
    c.verify.sweep = _sweeps((4, 8, 16), (2, 4, 8), (1, 4, 8), (1, 4))
    c.verify.num_step_blocks = 8
    c.infer.sweep = ml_collections.ConfigDict({"B_L": (2, 4, 8), "I_A": (1, 2, 4)})
    c.infer.prompts, c.infer.max_prompt_len, c.infer.max_new_tokens = 8, 128, 64
    c.attacks = attacks.get_config("paper")
    c.attacks.success_options = ml_collections.ConfigDict()
  else:
    raise ValueError(f"unknown variant {variant!r}: smoke, small, paper")
  return c

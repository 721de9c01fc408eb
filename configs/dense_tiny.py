"""Dense baseline of `lm_tiny`: the same model with dense FFNs of the same active width.

  python -m moejax.main --config=configs/dense_tiny.py --workdir=/tmp/dense_tiny

Every FFN is one SwiGLU of width 512 = K * F of lm_tiny (top-2 of width-256
experts), so active parameters per token match lm_tiny's; lm_tiny has 4x the FFN
parameters in total. Same data, steps and schedule as lm_tiny.
Expected on a 2-core CPU (measured 2026-11-30): about 2 minutes, 23,000 tokens/s,
validation 2.95 bits per byte (lm_tiny: 3 minutes, 2.85).
"""
from moejax.train import setup


def get_config():
  config = setup.config_from_file("lm_tiny.py", sibling_of=__file__)
  config.model.moe_every = 0          # no MoE blocks
  config.model.mlp_dim = config.moe.top_k * config.moe.hidden_dim
  return config

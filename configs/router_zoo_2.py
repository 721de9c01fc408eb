"""Routing that remembers and looks around, on the tiny LM at top-2 compute.

  python -m moejax.main --config=configs/router_zoo_2.py:recurrent --workdir=/tmp/zoo2

The argument after the colon picks the arm (default `topk`). Everything else is
lm_tiny: 2 MoE blocks, D = 128, E = 8 SwiGLU experts of width 256, top-2 with
weights normalised over the 2, switch loss 1e-2 and z loss 1e-3 (each router's
defaults), batches of 16 rows of 128 bytes. Every arm runs 2 expert rows per token:

  topk             the baseline: lm_tiny's top-2 of 8, each layer on its own
  recurrent        RMoE: a GRU of width 64 over the 2 MoE layers, one cell shared
                   (routers/recurrent.py); the router grows by D*64 + 64*8 per
                   layer and the cell's 3 * 2 * 64 * 64
  similarity       similarity-aware top-2: p' = S p, S = causal softmax(x x^T / sqrt(D))
  attention_aware  attention-aware top-2: p' = A p, A the block's head-averaged
                   attention
  coe              Chain-of-Experts: 2 passes of top-1 over the same 8 experts, each
                   pass its own top-k router, weights the raw softmax (normalising
                   one weight would make it 1 and leave the router no gradient
                   from the loss; the published code does not normalise either)
  rexmoe           ReXMoE: the 2 MoE layers share one pool of 16 experts (the
                   plain model's); each layer's gate scores all 16; progressive
                   scaling from the layer's own 8 to 16 over `psr_steps` = 300
                   (half of a 600-step run; experiments/router_zoo_2.py sets half
                   of its --steps)

Expected on a 2-core CPU at 600 steps: 2 to 4 minutes per run; losses, routing
fluctuation, combination diversity and local consistency, with seeds and paired
intervals against topk: experiments/results/router_zoo_2.md
(experiments/router_zoo_2.py).
"""
from moejax.train import setup

# Per arm: (router, {router setting: value}, {moe setting: value}, {model setting: value}).
ARMS = {
    "topk": ("topk", {}, {}, {}),
    "recurrent": ("recurrent", {"hidden": 64, "normalize": True}, {}, {}),
    "similarity": ("similarity", {"normalize": True}, {}, {}),
    "attention_aware": ("attention_aware", {"normalize": True}, {}, {}),
    "coe": ("topk", {"normalize": False}, {"chain": 2, "top_k": 1}, {}),
    "rexmoe": ("rexmoe", {"normalize": True, "psr_steps": 300}, {}, {"expert_reuse": 2}),
}


def get_config(arm: str = "topk"):
  """lm_tiny's ConfigDict with `arm` at top-2 compute (see the module docstring)."""
  if arm not in ARMS:
    raise ValueError(f"arm must be one of {sorted(ARMS)}, got {arm!r}")
  config = setup.config_from_file("lm_tiny.py", sibling_of=__file__)
  router, router_settings, moe_settings, model_settings = ARMS[arm]
  config.moe.router = router
  section = config.moe[router]
  for key, value in router_settings.items():
    if key not in section:
      raise ValueError(f"router {router!r} has no setting {key!r}")
    section[key] = value
  config.moe.update(moe_settings)
  config.model.update(model_settings)
  return config

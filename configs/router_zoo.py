"""Every registered router on the tiny LM, at equal active compute, one config per router.

  python -m moejax.main --config=configs/router_zoo.py:expert_choice --workdir=/tmp/zoo

The argument after the colon picks the router (default `topk`; any name of
moejax.routers.names()). Everything else is lm_tiny: 2 MoE blocks, D = 128,
E = 8 SwiGLU experts of width 256, batches of 16 rows of 128 bytes, one
micro-batch. The baseline is lm_tiny's top-2 of 8 (softmax, normalised weights,
switch loss 1e-2, z loss 1e-3); each other router is set to run the same number
of expert rows, 2 per token, or 2 on average where the count is adaptive:

  topk                lm_tiny's defaults: top-2 softmax, weights normalised
  expert_choice       capacity factor 1.0: each expert takes C = T * K / E tokens
                      (E * C = 2T rows). NOT CAUSAL: allow_noncausal=True
  sinkhorn            S-BASE: top-2 of the Sinkhorn plan in training, top-2 softmax
                      at evaluation; switch weight 0 (the plan balances).
                      NOT CAUSAL in training: allow_noncausal=True
  selective_sinkhorn  SSR: the plan (gates from the plan) on 10% of the steps,
                      top-2 softmax otherwise; switch weight 0. NOT CAUSAL in
                      training: allow_noncausal=True
  soft                Soft MoE, S = L * K / E = 32 slots per expert per
                      sequence: E * S = 2L rows, as top-2. NOT CAUSAL (and a slot
                      mixes the documents packed into a row): allow_noncausal=True
  top_p               threshold 0.4, at most K_max = 4 experts (moe.top_k = 4),
                      entropy weight its default 1e-4; the count adapts per token
  null_experts        AdaMoE: top-4 of E + N = 8 + 8 (moe.top_k = 4), reference_k 2;
                      balanced over the 16 a token gets 4 * 8 / 16 = 2 true experts
  relu                ReLU gates (relu_rmsnorm), K_max = 4 (moe.top_k = 4), target
                      token sparsity 0.75 (2 of 8 active on average)
  hash                Hash layers: 2 fixed experts per byte value, weights 1/2
  random              THOR: 2 random experts per token, consistency weight 1.0
                      (the train step runs two forward passes: twice the compute)

Loss weights are left None (each router's defaults) except the Sinkhorn ones'
switch weight, set to 0. The non-causal routers let a token's routing depend on
later tokens of the batch (or sequence), so in this causal LM their training,
and for expert_choice and soft also their evaluation, sees the future: their
validation loss is optimistic and not comparable with the causal routers'.
Sinkhorn routers evaluate causally (plain top-2), so their loss is comparable.

Expected on a 2-core CPU at 600 steps: 3 to 5 minutes per run, random about twice
that (two forward passes). Losses, balance and each paper's claim, with seeds and
paired intervals against topk: experiments/results/router_zoo.md
(experiments/router_zoo.py).
"""
from moejax import routers

# Per router: {setting: value} for config.moe.<router>, then moe-level overrides.
ROUTER_SETTINGS = {
    "topk": {},
    "expert_choice": {"capacity_factor": 1.0, "allow_noncausal": True},
    "sinkhorn": {"allow_noncausal": True},
    "selective_sinkhorn": {"allow_noncausal": True, "fraction": 0.1,
                           "fraction_of": "steps"},
    "soft": {"allow_noncausal": True, "slots_per_expert": 32},   # L * K / E = 128 * 2 / 8
    "top_p": {"threshold": 0.4},
    # The zoo's results were measured with weights normalised over all K slots
    # (normalize_over="all"); AdaMoE's code normalises over the true experts.
    "null_experts": {"num_null": 8, "reference_k": 2, "normalize_over": "all"},
    "relu": {"target_sparsity": 0.75, "order": "relu_rmsnorm"},
    "hash": {},
    # Per-token draws, as measured; THOR's own code draws per batch ("per_batch").
    "random": {"consistency_weight": 1.0, "draw": "per_token"},
}
TOP_K = {"top_p": 4, "null_experts": 4, "relu": 4}   # K_max; 2 otherwise
NO_SWITCH = ("sinkhorn", "selective_sinkhorn")


def get_config(router: str = "topk"):
  """lm_tiny's ConfigDict with `router` at top-2 compute (see the module docstring)."""
  from moejax.train import setup  # pylint: disable=g-import-not-at-top
  if router not in routers.names():
    raise ValueError(f"router must be one of {routers.names()}, got {router!r}")
  config = setup.config_from_file("lm_tiny.py", sibling_of=__file__)
  moe = config.moe
  moe.router = router
  moe.top_k = TOP_K.get(router, 2)
  section = moe.get(router)
  for key, value in ROUTER_SETTINGS.get(router, {}).items():
    if key not in section:
      raise ValueError(f"router {router!r} has no setting {key!r}")
    section[key] = value
  if router in NO_SWITCH:
    moe.loss_weights.switch = 0.0
  return config

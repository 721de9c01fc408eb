"""Load-balancing methods on the tiny LM, one config per method.

  python -m moejax.main --config=configs/balance.py:switch_global --workdir=/tmp/balance \\
      --config.data.name=synthetic_domains

The argument after the colon picks the method (default `switch_microbatch`):

  none               no balancing: switch and z weights 0
  switch_microbatch  Switch loss over what one device sees of one micro-batch
                     (the common implementation)
  switch_global      Switch loss with the step's global counts: all devices and
                     all micro-batches ("Demons in the Detail", 2025)
  switch_sequence    Switch loss per sequence (row), averaged
  aux_free           auxiliary-loss-free bias (DeepSeek 2024), sign update
                     u = 1e-3, no balance loss; softmax gates as the switch rows
  aux_free_sequence  DeepSeek-V3 (2024): sigmoid gates normalised over the K
                     chosen, aux-free bias u = 1e-3, and the sequence-wise loss
                     with a small weight alpha = 1e-4
  erc                switch_microbatch plus the expert-router coupling loss
                     (2025), weight 1e-2, proxy noise 0.1

Everything else is lm_tiny, except that each step of 16 rows is taken as 4
micro-batches of 4 rows (gradient accumulation), so that micro-batch and global
balancing differ on one device. With D data-parallel devices (D <= 4) each
device balances its 4 / D rows of a micro-batch; on 8 devices use
--config.train.num_microbatches=1 (2 rows per device) or a larger batch.
Expected on a 2-core CPU: 3.5 to 4.5 minutes per run at 600 steps (twice that for
the config's own 1200 steps); `switch_global` runs one extra forward pass per step
to count. Losses, balance and specialisation per method, with seeds and paired
intervals: experiments/results/balance.md (experiments/balance.py).
"""
import ml_collections

from moejax.train import setup

METHODS = ("none", "switch_microbatch", "switch_global", "switch_sequence", "aux_free",
           "aux_free_sequence", "erc")


def get_config(method: str = "switch_microbatch") -> ml_collections.ConfigDict:
  if method not in METHODS:
    raise ValueError(f"balance method must be one of {METHODS}, got {method!r}")
  config = setup.config_from_file("lm_tiny.py", sibling_of=__file__)
  config.train.num_microbatches = 4
  moe, topk = config.moe, config.moe.topk
  moe.loss_weights.switch, moe.loss_weights.z = 1e-2, 1e-3
  if method in ("none", "aux_free", "aux_free_sequence"):
    moe.loss_weights.switch = 0.0
  if method == "none":
    moe.loss_weights.z = 0.0
  if method.startswith("switch_"):
    topk.balance_scope = method[len("switch_"):]
  if method.startswith("aux_free"):
    topk.aux_free = True
    topk.bias_rate = 1e-3
    topk.bias_update = "sign"
  if method == "aux_free_sequence":
    topk.score = "sigmoid"
    topk.normalize = True
    topk.balance_scope = "sequence"
    moe.loss_weights.switch = 1e-4
  if method == "erc":
    moe.loss_weights.erc = 1e-2
    moe.erc_noise = 0.1
  return config

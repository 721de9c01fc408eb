"""Tiny MoE language model on `stdlib_text`: the `make run` default.

  python -m moejax.main --config=configs/lm_tiny.py --workdir=/tmp/lm_tiny
  python -m moejax.main --config=configs/lm_tiny.py --workdir=/tmp/lm_tiny \\
      --config.moe.num_experts=16 --config.moe.topk.score=sigmoid
  python -m moejax.main --config=configs/lm_tiny.py --workdir=/tmp/lm_top_p \
      --config.moe.router=top_p --config.moe.top_k=4 --config.moe.top_p.threshold=0.4

Every registered router has a section `config.moe.<router>` with its settings at
their defaults; loss weights left None take the chosen router's defaults. Routers
that are not causal (expert_choice, sinkhorn, selective_sinkhorn, soft) stop at
start-up in this causal LM unless --config.moe.<router>.allow_noncausal=True.

Expert parallelism, here on 8 simulated CPU devices (experts over 4, data over 2):

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m moejax.main \
      --config=configs/lm_tiny.py --workdir=/tmp/lm_tiny_ep --config.mesh.data=2 \
      --config.mesh.expert=4 --config.moe.expert_parallel.dispatch=all_to_all

It computes what the data-parallel run computes (tests/test_expert_parallel_training.py);
on simulated devices it is slower, as the devices share the host's cores.

Model: 2 blocks, D = 128, 4 heads, every FFN an MoE of E = 8 SwiGLU experts of
width F = 256 with top-2 softmax routing (active FFN width 512, as `dense_tiny`).
Data: the Python standard library's source as bytes (prepared on first use in
data.data_dir), rows of 128 bytes, batches of 16 rows, 1200 steps.
Expected on a 2-core CPU (measured 2026-11-30, JAX 0.10.2): 3 minutes, about 15,000
tokens/s, validation loss 1.98 nats per byte, 2.85 bits per byte; routers stay
balanced (MaxVio below 0.5) with the default switch-loss weight 0.01.
"""
import os

import ml_collections
from ml_collections import config_dict

from moejax.train import setup


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = ml_collections.ConfigDict(dict(
      name="stdlib_text",
      data_dir=os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"),
      train_split="train",
      eval_split="validation",
      text_key="text",
      domain_key="domain",
      tokenizer="byte",
      tokenizer_model="",
      seq_len=128,
      # The data is read as this many independent streams (source[s::S], each
      # shuffled and packed on its own), every batch taking B/S rows of each in
      # order; each process reads its S/n streams. The batches depend on S, not on
      # the process count n, and a checkpoint resumes under any n dividing S.
      # 1: one stream, one process; a multi-process run needs a multiple of n.
      input_shards=1,
  ))

  config.model = ml_collections.ConfigDict(dict(
      num_layers=2,
      model_dim=128,
      num_heads=4,
      head_dim=config_dict.placeholder(int),
      mlp_dim=512,
      moe_every=1,
      expert_type="glu",
      activation="silu",
      tie_embeddings=True,
      dtype="float32",
      # r adjacent MoE layers share one pool of r * E experts (ReXMoE; the
      # `rexmoe` router grows each layer's candidates over it). 1: no sharing.
      expert_reuse=1,
  ))

  config.moe = ml_collections.ConfigDict(dict(
      num_experts=8,
      top_k=2,
      hidden_dim=256,
      router="topk",
      engine="sorted",
      backend="auto",
      block_size=128,
      capacity_factor=config_dict.placeholder(float),
      drop_policy="position",
      expert_type="glu",
      activation="silu",
      granularity=1,
      num_shared_experts=0,
      chain=1,                        # Chain-of-Experts passes per layer (1: plain)
      use_bias=False,                 # expert biases
      dropout_rate=0.0,               # dropout on the experts' hidden activation
      # Weights of the router's losses (None: the router's defaults, for topk
      # switch 1e-2 and z 1e-3) and of the layer's (tsallis, erc: on when > 0).
      loss_weights=ml_collections.ConfigDict({
          name: config_dict.placeholder(float)
          for name in ("switch", "z", "entropy", "sparsity", "tsallis", "erc")}),
      tsallis_q=2.0,
      erc_noise=0.1,
      erc_form="ce",
      erc_margin=0.5,
      # Expert parallelism over mesh.expert (moejax.parallel.ExpertParallel):
      # dispatch none | all_to_all | all_gather.
      expert_parallel=setup.expert_parallel_section(),
      # The pallas backend's kernel settings (pallas_kernels.KernelSettings), e.g.
      # --config.moe.kernel_settings.tiling.forward="(64,64,128)"; None: the
      # platform's defaults.
      kernel_settings=setup.kernel_settings_section(),
      topk=ml_collections.ConfigDict(dict(
          score="softmax",
          order="softmax_topk",
          normalize=True,
          scale=1.0,
          noisy=False,
          jitter=0.0,
          num_groups=1,
          groups_selected=config_dict.placeholder(int),
          group_score="top2_sum",
          balance_scope="microbatch",
          aux_free=False,
          bias_rate=1e-3,
          bias_update="sign",
          bias_recenter=False,
      )),
  ))

  # Every other router's settings at their defaults: --config.moe.router=NAME.
  config.moe.update(setup.router_sections(exclude=("topk",)))

  config.train = ml_collections.ConfigDict(dict(
      batch_size=16,
      eval_batch_size=16,
      num_microbatches=1,
      steps=1200,
      learning_rate=3e-3,
      warmup_steps=50,
      weight_decay=0.1,
      grad_clip=1.0,
      log_every=20,
      eval_every=400,
      eval_batches=20,
      checkpoint_every=400,
      keep_checkpoints=2,
      probe_every=100,    # route a fixed batch, log routing movement; 0: off
  ))

  config.mesh = ml_collections.ConfigDict(dict(data=-1, expert=1, model=1))
  return config

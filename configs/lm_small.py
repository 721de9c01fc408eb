"""Small MoE language model for one GPU (H100/A100 class).

  python -m moejax.main --config=configs/lm_small.py --workdir=/tmp/lm_small
  python -m moejax.main --config=configs/lm_small.py --workdir=/tmp/lm_small \\
      --config.data.name=lm1b --config.data.data_dir=$TFDS_DATA_DIR

Model: 8 blocks, D = 512, 8 heads, MoE in every other block with E = 16 SwiGLU
experts of width 1024 and top-2 routing (dense blocks of width 2048), bfloat16
activations, float32 routers. About 190M parameters, 60M active per token.
Data: `stdlib_text` by default (bytes, rows of 512); for a real corpus prepare a
TFDS dataset in array_record format and set data.name and data.data_dir.
Batches of 64 rows (32K tokens), 20K steps.
Expected result: not yet measured on a GPU; `experiments/device_check.py` trains
this model for 100 steps on synthetic batches and reports tokens/s and model FLOPs
utilisation, beside the dense twin.

MODEL, MOE, SEQ_LEN and BATCH_SIZE are plain dicts and ints, importable without
ml_collections (the device check builds the model from them).
"""
MODEL = dict(num_layers=8, model_dim=512, num_heads=8, mlp_dim=2048, moe_every=2,
             dtype="bfloat16")
MOE = dict(num_experts=16, top_k=2, hidden_dim=1024)
SEQ_LEN = 512
BATCH_SIZE = 64


def get_config():
  from moejax.train import setup  # pylint: disable=g-import-not-at-top
  config = setup.config_from_file("lm_tiny.py", sibling_of=__file__)
  config.data.seq_len = SEQ_LEN
  config.model.update(**MODEL)
  config.moe.update(**MOE)
  config.train.update(batch_size=BATCH_SIZE, eval_batch_size=BATCH_SIZE, steps=20000,
                      learning_rate=1e-3, warmup_steps=1000, log_every=50, eval_every=1000,
                      eval_batches=50, checkpoint_every=1000, keep_checkpoints=3)
  return config

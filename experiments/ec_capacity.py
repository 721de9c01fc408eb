"""Expert choice with a capacity set from outside, in a masked-diffusion LM.

  PYTHONPATH=. python experiments/ec_capacity.py [--steps 600] [--seeds 3] \\
      [--baseline_seeds 5] [--arms all] [--report_only]

"Expert-Choice Routing Enables Adaptive Computation in Diffusion Language Models"
(2025) varies expert choice's capacity with the denoising step and finds that more
capacity on low-mask-ratio steps is best at matched FLOPs. Expert choice lets
each expert pick among all tokens of the batch, which a causal decoder cannot
allow; a masked-diffusion LM is bidirectional, so there it is legitimate.

The smallest honest version built here (what it is, and is not):
  model    moejax's TransformerLM with causal=False (bidirectional attention),
           lm_tiny's sizes: 2 blocks, D = 128, every FFN an MoE of E = 8 SwiGLU
           experts of width 256, expert choice at capacity factor 1 (the compute
           of top-2)
  data     synthetic_domains (8 Markov-chain domains over bytes), windows of 128
           tokens, 16 per step; generated in memory, no download
  objective  masked diffusion, simplified: per step one mask ratio r ~ U(0.05, 1),
           each token replaced by a mask token with probability r, cross-entropy on
           the masked tokens (their mean; MDLM's 1/r ELBO weight is left out, so
           every ratio counts alike), no sampler
  capacity C(r) per expert through RoutingContext.capacity (traced, one per step),
           at C0 = T K / E on average over r ~ U(0.05, 1) (matched FLOPs):
             ec_constant        C = C0 (the baseline)
             ec_low_mask_more   C = C0 (1 + (E[r] - r)): 1.475 C0 at r = 0.05,
                                0.525 C0 at r = 1 (the paper's direction)
             ec_high_mask_more  C = C0 (1 - (E[r] - r)): the reverse
             ec_layer_front     C = 1.25 C0 in the first MoE layer, 0.75 C0 in the
                                second, whatever r (a per-layer schedule)
             topk               token choice, top-2, dropless (a reference)
  evaluation  masked cross-entropy on 64 fixed validation windows at mask ratios
           0.15, 0.5 and 0.85 (fixed masks), each at the arm's capacity for that
           ratio; the figure `loss` is their mean

Claims, from paired t intervals over seeds (experiments/harness.py): the low-mask
schedule has a lower mean masked loss than constant capacity and than the
reverse schedule. What this scale cannot test: a diffusion LM's generation
quality (no sampler is run), and anything beyond 600 steps of a tiny model.
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time
from typing import Any

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import harness  # noqa: E402  (experiments/)

ARMS = ("ec_constant", "ec_low_mask_more", "ec_high_mask_more", "ec_layer_front", "topk")
BATCH, LENGTH, EXPERTS, TOP_K = 16, 128, 8, 2
MASK_ID, VOCAB = 0, 257                      # byte b -> b + 1; 0 is the mask token
LOW_RATIO, EVAL_RATIOS, EVAL_WINDOWS = 0.05, (0.15, 0.5, 0.85), 64
MEAN_RATIO = (LOW_RATIO + 1.0) / 2
BASE_CAPACITY = BATCH * LENGTH * TOP_K // EXPERTS     # C0 = T K / E
MAX_CAPACITY = math.ceil(1.5 * BASE_CAPACITY)


def capacity(arm: str, ratio, layer: int):
  """C(r) of an arm at mask ratio r (a traced scalar) and MoE layer, or None."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  if arm == "topk":
    return None
  scale = {"ec_constant": 1.0,
           "ec_low_mask_more": 1.0 + (MEAN_RATIO - ratio),
           "ec_high_mask_more": 1.0 - (MEAN_RATIO - ratio),
           "ec_layer_front": 1.25 if layer == 0 else 0.75}[arm]
  return jnp.round(BASE_CAPACITY * jnp.asarray(scale, jnp.float32)).astype(jnp.int32)


def windows(split: str, count: int, seed: int) -> np.ndarray:
  """int32 [count, LENGTH] windows of synthetic_domains sequences (token = byte + 1)."""
  from moejax.data import synthetic_domains  # pylint: disable=g-import-not-at-top
  values, lengths, _ = synthetic_domains.sample_split(split)
  rng = np.random.default_rng(seed)
  rows = rng.integers(len(values), size=count)
  starts = rng.integers(0, lengths[rows] - LENGTH + 1)
  index = starts[:, None] + np.arange(LENGTH)
  return (values[rows[:, None], index] + 1).astype(np.int32)


def model(arm: str):
  from moejax.models import TransformerLM  # pylint: disable=g-import-not-at-top
  if arm == "topk":
    moe = dict(num_experts=EXPERTS, top_k=TOP_K, hidden_dim=256)
  else:
    moe = dict(num_experts=EXPERTS, top_k=TOP_K, hidden_dim=256, router="expert_choice",
               router_kwargs={"capacity_factor": 1.0, "max_capacity": MAX_CAPACITY})
  return TransformerLM(vocab_size=VOCAB, num_layers=2, model_dim=128, num_heads=4,
                       mlp_dim=512, moe=moe, moe_every=1, causal=False)


def run(arm: str, dataset: str, seed: int, args) -> dict[str, Any]:
  """Trains one arm and seed in memory; its figures for the harness."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from moejax.train.state import make_optimizer  # pylint: disable=g-import-not-at-top
  del dataset
  lm = model(arm)
  train_rows = windows("train", args.steps * BATCH, seed)
  eval_rows = jnp.asarray(windows("validation", EVAL_WINDOWS, 1234))
  key = jax.random.key(seed)
  params = lm.init(key, jnp.asarray(train_rows[:BATCH]))["params"]
  tx = make_optimizer(3e-3, args.steps // 10, args.steps)
  opt_state = tx.init(params)

  def masked_loss(params, tokens, ratio, mask, deterministic):
    caps = {f"layer_{l}": capacity(arm, ratio, l) for l in range(2)}
    inputs = jnp.where(mask, MASK_ID, tokens)
    logits, aux = lm.apply({"params": params}, inputs, deterministic=deterministic,
                           capacity=None if arm == "topk" else caps)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)
    loss = jnp.sum(jnp.where(mask, nll, 0)) / jnp.maximum(jnp.sum(mask), 1)
    return loss, (loss, sum(a.loss for a in aux.values()),
                  jnp.mean(jnp.stack([a.metrics["experts_per_token"] for a in aux.values()])))

  @jax.jit
  def step(params, opt_state, tokens, key):
    ratio_key, mask_key = jax.random.split(key)
    ratio = jax.random.uniform(ratio_key, (), minval=LOW_RATIO, maxval=1.0)
    mask = jax.random.bernoulli(mask_key, ratio, tokens.shape)
    grads, metrics = jax.grad(
        lambda p: (lambda out: (out[0] + out[1][1], out[1]))(
            masked_loss(p, tokens, ratio, mask, True)), has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  @functools.partial(jax.jit, static_argnums=2)
  def evaluate(params, tokens, ratio):
    """Masked loss and experts per token over batches of BATCH windows (the
    training batch's T, for which C0 is set)."""
    mask = jax.random.bernoulli(jax.random.key(99), ratio, tokens.shape)
    out = [masked_loss(params, tokens[i:i + BATCH], jnp.float32(ratio), mask[i:i + BATCH],
                       True)[1] for i in range(0, tokens.shape[0], BATCH)]
    return tuple(jnp.mean(jnp.stack([o[k] for o in out])) for k in range(3))

  start, per_token = time.time(), []
  for i in range(args.steps):
    batch = jnp.asarray(train_rows[i * BATCH:(i + 1) * BATCH])
    params, opt_state, (loss, _, epm) = step(params, opt_state, batch,
                                             jax.random.fold_in(key, i))
    per_token.append(float(epm))
  seconds = time.time() - start
  final = {"tokens_per_s": args.steps * BATCH * LENGTH / seconds,
           "experts_per_token_train": float(np.mean(per_token[len(per_token) * 3 // 4:]))}
  for ratio in EVAL_RATIOS:
    loss, _, epm = evaluate(params, eval_rows, ratio)
    final[f"loss_r{ratio}"] = float(loss)
    final[f"experts_per_token_r{ratio}"] = float(epm)
  final["loss"] = float(np.mean([final[f"loss_r{r}"] for r in EVAL_RATIOS]))
  return {"steps": args.steps, "final": final, "evals": []}


CLAIM_TESTS = (
    ("loss", "ec_low_mask_more", "ec_constant", "lower",
     "more capacity on low-mask-ratio steps beats constant capacity at matched FLOPs"),
    ("loss", "ec_low_mask_more", "ec_high_mask_more", "lower",
     "more capacity on low-mask-ratio steps beats the reverse schedule"),
)


def write_report(path: str, data, args) -> None:
  f = harness.fmt
  meta = data.get("meta", {})
  figures = ["loss"] + [f"loss_r{r}" for r in EVAL_RATIOS]
  lines = ["# Expert choice with a capacity schedule in a masked-diffusion LM", "",
           "`experiments/ec_capacity.py`: the setting, the objective and the schedules are "
           "in its docstring (a bidirectional lm_tiny, masked-token cross-entropy at a "
           "random mask ratio per step, expert choice at capacity C(r) with the same mean "
           "over r). Every figure below is computed from `ec_capacity.json` by "
           "`experiments/harness.py`.", "",
           "```", f"PYTHONPATH=. python experiments/ec_capacity.py --steps "
           f"{meta.get('steps', args.steps)}", "```", "",
           f"Machine: {meta.get('machine', 'not recorded')}.", "",
           "Cells: mean ± standard deviation over seeds; Δ, the paired difference against "
           "ec_constant with its 95% t interval. Masked cross-entropy (nats per masked "
           "byte) on fixed validation windows at mask ratios " +
           ", ".join(map(str, EVAL_RATIOS)) + "; `loss` is their mean. Experts per token: "
           "expert rows per token at ratio 0.15 / 0.85.", "",
           "| arm | n | " + " | ".join(figures) + " | experts/token r0.15 / r0.85 |",
           "|---|---|" + "---|" * (len(figures) + 1)]
  comparisons = {name: harness.compare(data, name, "synthetic_domains") for name in figures}
  for arm in data["arms"]:
    if not comparisons["loss"][arm]["spread"]["n"]:
      continue
    cells = [harness.fmt_cell(comparisons[name][arm], 4) for name in figures]
    epm = [harness.spread(list(harness.values_by_seed(
        data, f"experts_per_token_r{r}", "synthetic_domains", arm).values()))["mean"]
           for r in (EVAL_RATIOS[0], EVAL_RATIOS[-1])]
    lines.append(f"| {arm} | {comparisons['loss'][arm]['spread']['n']} | "
                 + " | ".join(cells) + f" | {f(epm[0], 2)} / {f(epm[1], 2)} |")
  lines += ["", *harness.claim_rows(data, "synthetic_domains", CLAIM_TESTS)]
  lines += ["", "What this scale cannot test: generation quality of a diffusion LM (no "
            "sampler runs), and anything beyond 600 steps of a 2-block byte-level model "
            "on CPU.", ""]
  harness.write_report(path, lines, harness.digest(data["runs"]))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  harness.add_grid_arguments(parser, baseline="ec_constant")
  parser.add_argument("--arms", default="all")
  harness.add_path_arguments(parser, "ec_capacity", trains_with_data=False)
  args = parser.parse_args()
  arms = harness.chosen(parser, "arms", args.arms, ARMS, required="ec_constant")
  if args.steps < 10:
    parser.error("--steps must be at least 10")
  harness.run_or_load(parser, args, "ec_capacity", arms, "ec_constant",
                      ["synthetic_domains"],
                      lambda arm, dataset, seed: run(arm, dataset, seed, args),
                      lambda data: write_report(args.out + ".md", data, args),
                      harness.machine_description())


if __name__ == "__main__":
  main()

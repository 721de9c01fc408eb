"""The jitted train and eval steps of the language model.

A batch row holds L + 1 tokens: inputs are tokens[:, :-1], targets tokens[:, 1:].
A target counts when it lies in the same (non-padding) segment as its input, so
no token is predicted across a document boundary of a packed row:

  mask = (segment[:, 1:] == segment[:, :-1]) & (segment[:, 1:] > 0)
  loss = sum_mask CE / sum_mask 1  +  sum over MoE layers of aux.loss (weighted)

Gradient accumulation: the batch is cut into `num_microbatches` equal pieces
along the batch axis and scanned; each piece contributes its CE sum divided by
the token count of the whole batch and 1/num_microbatches of its aux loss, so the
accumulated gradient equals the gradient of the full-batch loss.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from moejax.train.state import TrainState

Array = jax.Array


def split_batch(batch: dict[str, Array]) -> dict[str, Array]:
  """Inputs, targets, positions, segments and the target mask from packed rows."""
  tokens, segments = batch["tokens"], batch["tokens_segment_ids"]
  mask = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] > 0)
  out = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
         "positions": batch["tokens_positions"][:, :-1], "segments": segments[:, :-1],
         "mask": mask}
  if "domain" in batch:
    out["domain"] = batch["domain"][:, :-1]
  return out


def _forward(model: nn.Module, params: Any, routing: Any, rows: dict[str, Array], rng,
             deterministic: bool):
  variables = {"params": params, **({"routing": routing} if routing else {})}
  rngs = {} if deterministic else {"router": rng}
  logits, aux = model.apply(variables, rows["inputs"], rows["positions"], rows["segments"],
                            deterministic=deterministic, rngs=rngs)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, rows["targets"])
  return jnp.where(rows["mask"], nll, 0.0), aux


def _layer_metrics(aux: dict[str, Any]) -> dict[str, Any]:
  return {layer: {**a.metrics, **{f"loss_{k}": v for k, v in a.losses.items()}}
          for layer, a in aux.items()}


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    num_microbatches: int = 1) -> Callable:
  """train_step(state, batch, rng) -> (state, metrics); jit it with shardings."""

  def microbatch_loss(params, routing, rows, rng, total_tokens):
    nll, aux = _forward(model, params, routing, rows, rng, deterministic=False)
    aux_loss = sum((a.loss for a in aux.values()), jnp.zeros((), jnp.float32))
    loss = jnp.sum(nll) / total_tokens + aux_loss / num_microbatches
    return loss, {"nll_sum": jnp.sum(nll), "aux_loss": aux_loss, "layers": _layer_metrics(aux)}

  grad_fn = jax.grad(microbatch_loss, has_aux=True)

  def train_step(state: TrainState, batch: dict[str, Array], rng) -> tuple[TrainState, dict]:
    rows = split_batch(batch)
    total_tokens = jnp.maximum(jnp.sum(rows["mask"]), 1).astype(jnp.float32)
    pieces = jax.tree_util.tree_map(
        lambda a: a.reshape(num_microbatches, a.shape[0] // num_microbatches, *a.shape[1:]),
        rows)

    def accumulate(grads, inputs):
      piece, index = inputs
      g, m = grad_fn(state.params, state.routing, piece, jax.random.fold_in(rng, index),
                     total_tokens)
      return jax.tree_util.tree_map(jnp.add, grads, g), m

    zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
    grads, per_piece = jax.lax.scan(accumulate, zeros,
                                    (pieces, jnp.arange(num_microbatches)))
    # Routing metrics: the mean over micro-batches of each micro-batch's value.
    metrics = {"loss": jnp.sum(per_piece["nll_sum"]) / total_tokens,
               "aux_loss": jnp.mean(per_piece["aux_loss"]), "tokens": total_tokens,
               "grad_norm": optax.tree.norm(grads),
               "layers": jax.tree_util.tree_map(lambda a: jnp.mean(a, axis=0),
                                                per_piece["layers"])}
    return state.apply_gradients(grads, tx), metrics

  return train_step


def make_eval_step(model: nn.Module) -> Callable:
  """eval_step(state, batch) -> sums: nll, tokens, and per-layer routing metrics."""

  def eval_step(state: TrainState, batch: dict[str, Array]) -> dict:
    rows = split_batch(batch)
    nll, aux = _forward(model, state.params, state.routing, rows, None, deterministic=True)
    return {"nll_sum": jnp.sum(nll), "tokens": jnp.sum(rows["mask"]).astype(jnp.float32),
            "layers": _layer_metrics(aux)}

  return eval_step

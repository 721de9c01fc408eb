"""The jitted train and eval steps of the language model.

A batch row holds L + 1 tokens: inputs are tokens[:, :-1], targets tokens[:, 1:].
A target counts when it lies in the same (non-padding) segment as its input, so
no token is predicted across a document boundary of a packed row:

  mask = (segment[:, 1:] == segment[:, :-1]) & (segment[:, 1:] > 0)
  loss = sum_mask CE / sum_mask 1  +  sum over MoE layers of aux.loss (weighted)

A router with a consistency weight w (THOR, Zuo et al. 2021, random routing):
two forward passes with independent routing; the CE is their mean and
w * mean_mask symmetric KL of their predictions is added (logged as
`consistency`).

Gradient accumulation: the batch is cut into `num_microbatches` equal pieces
along the batch axis and scanned; each piece contributes its CE sum divided by
the token count of the whole batch and 1/num_microbatches of its aux loss, so the
accumulated gradient equals the gradient of the full-batch loss. The `routing`
collection (e.g. aux-free balancing counts) is threaded through the pieces and,
after the optimizer step, every router updates it (TransformerLM.update_routing).

Routers declare what the step must do for them (routers/base.py, StepNeeds):
a second stochastic pass with a consistency loss (THOR, above), or the step's
selection counts before the gradient pass (the `global` balance scope): with
several micro-batches a first, forward-only pass over the pieces sums each
layer's RouterOutput.counts, and the gradient pass hands them to the routers
(RoutingContext.global_counts), so f is that of the global batch for every piece.
With one micro-batch the call's own counts are already global (data parallelism
runs inside one jitted program).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from moejax import metrics as load_metrics
from moejax.analysis import joint_counts, mutual_information
from moejax.models import TransformerLM
from moejax.routers import consistency_loss
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


def _forward(model: TransformerLM, params: Any, routing: Any, rows: dict[str, Array], rng,
             deterministic: bool, data_shards: int = 1, global_counts=None, step=None):
  """Masked per-token CE [B, L], aux per MoE layer, the updated routing state and
  the logits."""
  variables = {"params": params, **({"routing": routing} if routing else {})}
  mutable = ["routing"] if routing and not deterministic else False
  rngs = {} if deterministic else {"router": rng, "dropout": jax.random.fold_in(rng, 1)}
  out = model.apply(variables, rows["inputs"], rows["positions"], rows["segments"],
                    deterministic=deterministic, rngs=rngs, mutable=mutable, step=step,
                    global_counts=global_counts, data_shards=data_shards)
  if mutable:
    out, routing = out[0], out[1]["routing"]
  logits, aux = out
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, rows["targets"])
  return jnp.where(rows["mask"], nll, 0.0), aux, routing, logits


def _layer_metrics(aux: dict[str, Any]) -> dict[str, Any]:
  return {layer: {**a.metrics, **{f"loss_{k}": v for k, v in a.losses.items()}}
          for layer, a in aux.items()}


def make_train_step(model: TransformerLM, tx: optax.GradientTransformation,
                    num_microbatches: int = 1, data_shards: int = 1) -> Callable:
  """train_step(state, batch, rng) -> (state, metrics); jit it with shardings.

  `data_shards` is the data-parallel degree: the `microbatch` balance scope
  balances each shard of a micro-batch on its own, as each device would. What the
  routers need of the step, they declare (model.step_needs, routers/base.py).
  """
  needs = model.step_needs
  count_pass = needs.counts_for_loss is not None and num_microbatches > 1
  consistency_weight = needs.consistency_weight

  def microbatch_loss(params, routing, rows, rng, total_tokens, global_counts, step):
    """One micro-batch's share of the step's loss: its CE sum over the step's target
    count, plus 1/num_microbatches of its weighted router losses and, for a router
    that asks for it, of the consistency loss of a second stochastic pass."""
    nll, aux, routing, logits = _forward(model, params, routing, rows, rng, False,
                                         data_shards, global_counts, step)
    aux_loss = sum((a.loss for a in aux.values()), jnp.zeros((), jnp.float32))
    consistency = jnp.zeros((), jnp.float32)
    if consistency_weight > 0:
      nll_b, _, routing, logits_b = _forward(model, params, routing, rows,
                                             jax.random.fold_in(rng, 1), False, data_shards,
                                             global_counts, step)
      nll = 0.5 * (nll + nll_b)
      consistency = consistency_loss(logits, logits_b, rows["mask"])
    loss = (jnp.sum(nll) / total_tokens
            + (aux_loss + consistency_weight * consistency) / num_microbatches)
    return loss, (routing, {"nll_sum": jnp.sum(nll), "aux_loss": aux_loss,
                            "consistency": consistency, "layers": _layer_metrics(aux)})

  def train_step(state: TrainState, batch: dict[str, Array], rng) -> tuple[TrainState, dict]:
    rows = split_batch(batch)
    total_tokens = jnp.maximum(jnp.sum(rows["mask"]), 1).astype(jnp.float32)
    pieces = jax.tree_util.tree_map(
        lambda a: a.reshape(num_microbatches, a.shape[0] // num_microbatches, *a.shape[1:]),
        rows)

    # The routers' count pass: each MoE layer's selection counts over the whole
    # step, forward only, before any gradient (with one micro-batch a call's own
    # counts are the step's, so there is nothing to do).
    global_counts = None
    if count_pass:
      def count(inputs):
        piece, index = inputs
        _, aux, _, _ = _forward(model, state.params, state.routing, piece,
                                jax.random.fold_in(rng, index), False, data_shards,
                                step=state.step)
        return {k: a.counts for k, a in aux.items()}
      per_piece = jax.lax.map(count, (pieces, jnp.arange(num_microbatches)))
      global_counts = jax.tree_util.tree_map(lambda c: jnp.sum(c, axis=0), per_piece)

    # Gradient accumulation over the micro-batches; the `routing` collection is
    # threaded through them.
    def accumulate(carry, inputs):
      grads, routing = carry
      piece, index = inputs
      g, (routing, m) = jax.grad(microbatch_loss, has_aux=True)(
          state.params, routing, piece, jax.random.fold_in(rng, index), total_tokens,
          global_counts, state.step)
      return (jax.tree_util.tree_map(jnp.add, grads, g), routing), m

    zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
    (grads, routing), per_piece = jax.lax.scan(
        accumulate, (zeros, state.routing), (pieces, jnp.arange(num_microbatches)))

    layers = jax.tree_util.tree_map(lambda a: jnp.mean(a, axis=0), per_piece["layers"])
    for name, layer in layers.items():
      # MaxVio of the whole step's load next to the mean of the micro-batches'.
      step_load = jnp.sum(per_piece["layers"][name]["load"], axis=0)
      layer["step_max_violation"] = load_metrics.max_violation(step_load)
    metrics = {"loss": jnp.sum(per_piece["nll_sum"]) / total_tokens,
               "aux_loss": jnp.mean(per_piece["aux_loss"]), "tokens": total_tokens,
               **({"consistency": jnp.mean(per_piece["consistency"])}
                  if consistency_weight > 0 else {}),
               "grad_norm": optax.tree.norm(grads), "layers": layers}

    # The optimizer update, then every router's update of its `routing` state.
    state = state.apply_gradients(grads, tx).replace(routing=routing)
    if routing:
      _, updated = model.apply({"params": state.params, "routing": routing},
                               method=TransformerLM.update_routing, mutable=["routing"])
      state = state.replace(routing=updated["routing"])
    return state, metrics

  return train_step


def make_eval_step(model: TransformerLM, num_domains: Optional[int] = None) -> Callable:
  """eval_step(state, batch) -> sums: nll, tokens, per-layer routing metrics, and,
  for labelled data, per-layer domain-expert counts (domain_mutual_information
  turns their sum over batches into I(domain; expert))."""

  def eval_step(state: TrainState, batch: dict[str, Array]) -> dict:
    rows = split_batch(batch)
    nll, aux, _, _ = _forward(model, state.params, state.routing, rows, None,
                              deterministic=True, step=state.step)
    layers = _layer_metrics(aux)
    if num_domains and "domain" in rows:
      for name, a in aux.items():
        joint = joint_counts(a.plan, rows["domain"], num_domains,
                             a.metrics["load"].shape[0], rows["segments"] > 0)
        layers[name]["domain_expert_counts"] = joint
    return {"nll_sum": jnp.sum(nll), "tokens": jnp.sum(rows["mask"]).astype(jnp.float32),
            "layers": layers}

  return eval_step


def domain_mutual_information(layers: dict[str, Any]) -> dict[str, float]:
  """I(domain; expert) per layer from summed `domain_expert_counts`."""
  return {name: float(mutual_information(m["domain_expert_counts"]))
          for name, m in layers.items() if "domain_expert_counts" in m}

"""Router-only fine-tuning with routing-manifold alignment (RoMA, 2025).

Everything but the routers is frozen. The routers are trained on a task's rows
with the next-token loss plus a term that pulls each sample's routing toward
that of its successful neighbours:

  loss = CE(batch) + lambda * (1/B) sum_i sum_l sum_{j in N(i)} w_ij ||r_l(x_i) - sg(r_l(x_j))||^2

  r_l(x)    the sample's mean routing distribution at MoE layer l: the router's
            probs [T, E'] averaged over the sample's tokens
  N(i)      the k nearest neighbours of sample i, in an embedding space, among
            the successful samples of a reference pool
  w_ij      1 / k

Choices where the paper is open, for a language model:
- embedding: the mean over tokens of the frozen model's final hidden state (the
  final RMSNorm's output), computed once before fine-tuning;
- successful: a pool sample whose mean nll under the frozen model is at most the
  pool's median (the LM analogue of a correct answer);
- distance: Euclidean between embeddings; a sample is never its own neighbour;
- the neighbours' routing is read with the current routers, without gradient
  (sg): they are the anchor the sample moves toward;
- lambda = 0 is plain router fine-tuning, the comparison RoMA is measured against.

Router parameters are those under a module named `router` or `router_<i>` (every
MoE layer's router, chain passes included); a model without any is refused.
The fine-tuned model is returned as a new Frozen; nothing is written over the
trained checkpoint.

  router_mask(params)                     bool pytree: the router parameters
  split_router_params(params)             (router leaves, the other leaves)
  embeddings(frozen, rows)                [N, D] mean-pooled final hidden states
  successful_neighbours(...)              int[N, k] neighbour indices into the pool
  finetune(frozen, rows, pool, settings)  (fine-tuned Frozen, per-step losses)
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from moejax import validation
from moejax.interventions.frozen import Frozen, token_nll

Array = jax.Array
_ROUTER = re.compile(r"router(_\d+)?$")


@dataclasses.dataclass(frozen=True)
class Settings:
  """steps, learning_rate (Adam), batch_size rows per step, weight lambda of the
  alignment term (0: plain router fine-tuning), neighbours k."""

  steps: int = 200
  learning_rate: float = 1e-3
  batch_size: int = 8
  weight: float = 1.0
  neighbours: int = 4
  seed: int = 0

  def __post_init__(self):
    validation.positive_int("steps", self.steps)
    validation.in_range("learning_rate", self.learning_rate, 0, float("inf"), low_open=True)
    validation.positive_int("batch_size", self.batch_size)
    validation.in_range("weight", self.weight, 0, float("inf"))
    validation.positive_int("neighbours", self.neighbours)


def router_mask(params: Any) -> Any:
  """A pytree of params' structure: True for the leaves under a router module."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  return flax.traverse_util.unflatten_dict(
      {path: any(_ROUTER.match(str(p)) for p in path[:-1]) for path in flat})


def split_router_params(params: Any) -> tuple[dict, dict]:
  """({path: leaf} of the router parameters, {path: leaf} of the others);
  ValueError when there are no router parameters."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  mask = flax.traverse_util.flatten_dict(router_mask(params))
  routers = {p: v for p, v in flat.items() if mask[p]}
  rest = {p: v for p, v in flat.items() if not mask[p]}
  if not routers:
    raise ValueError("fine-tuning: the model has no router parameters to train (no module "
                     "named router or router_<i> holds parameters)")
  return routers, rest


def _merge(routers: dict, rest: dict) -> dict:
  return flax.traverse_util.unflatten_dict({**rest, **routers})


@functools.partial(jax.jit, static_argnums=0)
def _pooled(model, step: Array, variables: Any, tokens: Array) -> Array:
  _, state = model.apply(
      variables, tokens, deterministic=True, step=step,
      capture_intermediates=lambda module, name: module.name == "final_norm",
      mutable=["intermediates"])
  (hidden,) = state["intermediates"]["final_norm"]["__call__"]
  return jnp.mean(hidden.astype(jnp.float32), axis=1)


def embeddings(frozen: Frozen, rows: np.ndarray, batch: int = 32) -> np.ndarray:
  """float32[N, D]: the mean over tokens of the final RMSNorm's output for each
  row of rows int[N, L + 1] (its first L tokens)."""
  rows = np.asarray(rows, np.int32)
  step = jnp.int32(frozen.step)
  return np.concatenate([np.asarray(_pooled(frozen.model, step, frozen.variables,
                                            rows[s:s + batch, :-1]))
                         for s in range(0, rows.shape[0], batch)])


def successful_neighbours(query: np.ndarray, pool: np.ndarray, pool_nll: np.ndarray, k: int,
                          exclude_self: bool = False) -> np.ndarray:
  """int[Nq, k]: for each query embedding [Nq, D], the indices into pool [Np, D]
  of its k nearest successful pool samples (pool_nll <= its median), by
  Euclidean distance; with exclude_self (query is pool) a sample is not its own."""
  successful = np.flatnonzero(pool_nll <= np.median(pool_nll))
  distance = np.linalg.norm(query[:, None, :] - pool[None, successful, :], axis=-1)
  if exclude_self:
    distance[successful[None, :] == np.arange(query.shape[0])[:, None]] = np.inf
  if k > successful.size - int(exclude_self):
    raise ValueError(f"neighbours ({k}) must be at most the successful pool samples "
                     f"({successful.size - int(exclude_self)})")
  return successful[np.argsort(distance, axis=1, kind="stable")[:, :k]]


def routing_profiles(aux: dict, batch: int) -> dict[str, Array]:
  """{layer: r_l [B, E']}: each sample's router probs averaged over its tokens."""
  return {layer: jnp.mean(a.probs.reshape(batch, -1, a.probs.shape[-1]), axis=1)
          for layer, a in aux.items()}


@functools.lru_cache(maxsize=16)
def _train_step(model, learning_rate: float, batch: int, k: int):
  """step(trainable, opt_state, tokens, rest, others, step, weight) -> (trainable,
  opt_state, [CE, alignment]) with Adam, jitted once per model, rate and shapes."""
  tx = optax.adam(learning_rate)

  def loss_fn(trainable, tokens, rest, others, step, weight):
    variables = {**others, "params": _merge(trainable, rest)}
    logits, aux = model.apply(variables, tokens[:, :-1], deterministic=True, step=step)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits[:batch], tokens[:batch, 1:])
    align = jnp.zeros((), jnp.float32)
    for r in routing_profiles(aux, tokens.shape[0]).values():
      own = r[:batch][:, None, :]                                   # [B, 1, E']
      anchor = jax.lax.stop_gradient(r[batch:]).reshape(batch, k, -1)
      align = align + jnp.sum((own - anchor) ** 2) / (k * batch)
    ce = jnp.mean(nll)
    return ce + weight * align, (ce, align)

  @jax.jit
  def train_step(trainable, opt_state, tokens, rest, others, step, weight):
    (_, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        trainable, tokens, rest, others, step, weight)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, jnp.stack(parts)

  return train_step


def finetune(frozen: Frozen, rows: np.ndarray, pool: np.ndarray,
             settings: Settings = Settings(), log=None) -> tuple[Frozen, np.ndarray]:
  """Trains the routers alone on rows int[N, L + 1], aligning each row's routing
  to its successful neighbours in pool int[Np, L + 1] (which may be rows; a row
  is then never its own neighbour).
  Returns the fine-tuned Frozen and the losses [steps, 2] (CE, alignment)."""
  rows, pool = np.asarray(rows, np.int32), np.asarray(pool, np.int32)
  if rows.shape[0] < settings.batch_size:
    raise ValueError(f"batch_size ({settings.batch_size}) exceeds the training rows "
                     f"({rows.shape[0]})")
  routers, rest = split_router_params(frozen.variables["params"])
  pool_nll = np.asarray(jnp.mean(token_nll(frozen, pool), axis=1))
  same = rows.shape == pool.shape and bool(np.array_equal(rows, pool))
  neighbours = successful_neighbours(embeddings(frozen, rows), embeddings(frozen, pool),
                                     pool_nll, settings.neighbours, exclude_self=same)
  others = {k: v for k, v in frozen.variables.items() if k != "params"}
  batch = settings.batch_size
  step = _train_step(frozen.model, settings.learning_rate, batch, settings.neighbours)
  fixed = (rest, others, jnp.int32(frozen.step), jnp.float32(settings.weight))

  rng = np.random.default_rng(settings.seed)
  opt_state, history = optax.adam(settings.learning_rate).init(routers), []
  order, position = rng.permutation(rows.shape[0]), 0
  for s in range(settings.steps):
    if position + batch > rows.shape[0]:                   # a new epoch, reshuffled
      order, position = rng.permutation(rows.shape[0]), 0
    picked = order[position:position + batch]
    position += batch
    tokens = np.concatenate([rows[picked], pool[neighbours[picked].reshape(-1)]])
    routers, opt_state, parts = step(routers, opt_state, tokens, *fixed)
    history.append(np.asarray(parts))
    if log and (s + 1) % max(1, settings.steps // 10) == 0:
      log(f"roma step {s + 1}/{settings.steps}: ce {history[-1][0]:.4f}, "
          f"alignment {history[-1][1]:.5f}")
  params = _merge(routers, rest)
  return frozen.with_variables({**frozen.variables, "params": params}), np.stack(history)

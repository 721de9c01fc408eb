"""Continuous test-time rerouting ("Rewiring Experts on the Fly", 2025).

With every weight frozen, per-layer biases delta_l on the router logits of the
chosen layers are fitted to the next-token loss of the context seen so far,

  delta* = argmin_delta  mean_{t < P - 1} nll(x_{t+1} | x_{<=t}; delta)

by `steps` Adam steps from zero, keeping for each sequence the deltas of the
step (the start included) with the lowest context loss; the continuation is then
scored, or generated, with delta* held. Generating, the biases are fitted again every `adapt_every`
new tokens on the whole sequence so far, starting from the previous delta*.

Choices where the paper is open:
- one delta per sequence: in a batch of B prompts delta_l is [B, E'] and the
  loss is the sum over sequences of each one's mean nll, so every prompt adapts
  to its own context alone, as it would run by itself;
- Adam's state starts afresh at each fitting (the paper's few steps per prefill);
- the best step is kept, not the last: top-K selection makes the loss piecewise
  smooth, and a step that crosses a selection boundary can raise it, so the fit
  never leaves a sequence worse on its own context than it found it;
- defaults: every MoE layer, 10 steps, learning rate 0.1 (logits are O(1), so a
  few steps move the routing of the context's tokens but not far).

  adapt(frozen, context, settings)               (deltas, context loss per step [S+1, B])
  reroute_rows(frozen, rows, prompt_len, ...)    scores of continuations, plain and rerouted
  generate(frozen, prompt, new_tokens, ...)      sampling with re-adaptation
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from moejax import validation
from moejax.interventions import bias as biases
from moejax.interventions.frozen import Frozen, token_nll

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Settings:
  """layers: the MoE layers to bias ("layer_<i>"; None: all); steps, learning_rate:
  the Adam fit; adapt_every: new tokens between fits when generating."""

  layers: Optional[tuple[str, ...]] = None
  steps: int = 10
  learning_rate: float = 0.1
  adapt_every: int = 16

  def __post_init__(self):
    validation.positive_int("steps", self.steps)
    validation.in_range("learning_rate", self.learning_rate, 0, float("inf"), low_open=True)
    validation.positive_int("adapt_every", self.adapt_every)


def chosen_layers(widths: Mapping[str, int], layers: Optional[tuple[str, ...]],
                  name: str = "layers") -> tuple[str, ...]:
  """The named MoE layers (all when None); ValueError naming `name` for others."""
  if layers is None:
    return tuple(widths)
  unknown = [l for l in layers if l not in widths]
  if unknown or not layers:
    raise ValueError(f"{name}: {', '.join(unknown) or 'none given'}; the model's MoE layers "
                     f"are {', '.join(widths)}")
  return tuple(layers)


@functools.lru_cache(maxsize=32)
def _fit(model, step: int, steps: int, learning_rate: float):
  """fit(deltas, variables, zero, tokens) -> (deltas, losses), jitted once per
  model and settings."""
  tx = optax.adam(learning_rate)

  def context_loss(deltas, variables, zero, tokens):
    nll = token_nll(Frozen(model, variables, step), tokens,
                    biases.to_collection(zero, deltas))
    per_sequence = jnp.mean(nll, axis=1)
    return jnp.sum(per_sequence), per_sequence

  def keep_best(best, best_loss, d, loss):
    better = loss < best_loss                                       # [B]
    best = jax.tree_util.tree_map(lambda b, n: jnp.where(better[:, None], n, b), best, d)
    return best, jnp.minimum(best_loss, loss)

  @jax.jit
  def fit(deltas, variables, zero, tokens):
    def one(carry, _):
      d, state, best, best_loss = carry
      (_, per_sequence), grads = jax.value_and_grad(context_loss, has_aux=True)(
          d, variables, zero, tokens)
      best, best_loss = keep_best(best, best_loss, d, per_sequence)
      updates, state = tx.update(grads, state, d)
      return (optax.apply_updates(d, updates), state, best, best_loss), per_sequence
    start = jnp.full((tokens.shape[0],), jnp.inf, jnp.float32)
    (deltas, _, best, best_loss), losses = jax.lax.scan(
        one, (deltas, tx.init(deltas), deltas, start), None, length=steps)
    _, last = context_loss(deltas, variables, zero, tokens)
    best, _ = keep_best(best, best_loss, deltas, last)
    return best, jnp.concatenate([losses, last[None]], axis=0)

  return fit


def adapt(frozen: Frozen, context: Array, settings: Settings = Settings(),
          init: Optional[Mapping[str, Array]] = None) -> tuple[dict[str, Array], Array]:
  """Fits the deltas to context int[B, P] (P >= 2). Returns ({layer: delta
  [B, E']}, each sequence's best step's), and the context's mean nll per
  sequence before each step and after the last, [steps + 1, B]: the kept deltas'
  loss is its minimum over steps."""
  context = jnp.asarray(context, jnp.int32)
  if context.ndim != 2 or context.shape[1] < 2:
    raise ValueError(f"context must be int[B, P] with P >= 2, got shape {context.shape}")
  batch, length = context.shape
  zero = frozen.zero_bias(batch, length - 1)
  widths = biases.widths(zero)
  layers = chosen_layers(widths, settings.layers)
  deltas = {l: jnp.zeros((batch, widths[l]), jnp.float32) for l in layers}
  if init is not None:
    deltas = {l: jnp.broadcast_to(jnp.asarray(init[l], jnp.float32), (batch, widths[l]))
              for l in layers}
  fit = _fit(frozen.model, frozen.step, settings.steps, settings.learning_rate)
  return fit(deltas, frozen.variables, zero, context)


def continuation_nll(frozen: Frozen, rows: Array, prompt_len: int,
                     deltas: Optional[Mapping[str, Array]] = None) -> Array:
  """Mean nll per row [B] of tokens prompt_len.. of rows int[B, L + 1], given the
  tokens before them, with the deltas (or none)."""
  collection = None
  if deltas:
    collection = biases.to_collection(frozen.zero_bias(rows.shape[0], rows.shape[1] - 1),
                                      deltas)
  nll = token_nll(frozen, jnp.asarray(rows, jnp.int32), collection)
  return jnp.mean(nll[:, prompt_len - 1:], axis=1)


def reroute_rows(frozen: Frozen, rows: Array, prompt_len: int,
                 settings: Settings = Settings()) -> dict[str, Any]:
  """Each row int[B, L + 1] split into a prompt of prompt_len tokens and the rest:
  the deltas fitted on the prompt, and the continuation's mean nll per row
  without them (`plain`) and with them (`rerouted`), with the prompt's loss per
  Adam step (`context_loss`, [steps + 1, B]) and the fitted deltas."""
  rows = jnp.asarray(rows, jnp.int32)
  if rows.ndim != 2:
    raise ValueError(f"rows must be int[B, L + 1], got shape {rows.shape}")
  if not 2 <= prompt_len < rows.shape[1]:
    raise ValueError(f"prompt_len must be in [2, {rows.shape[1] - 1}] for rows of "
                     f"{rows.shape[1]} tokens, got {prompt_len}")
  deltas, context_loss = adapt(frozen, rows[:, :prompt_len], settings)
  return {"plain": np.asarray(continuation_nll(frozen, rows, prompt_len)),
          "rerouted": np.asarray(continuation_nll(frozen, rows, prompt_len, deltas)),
          "context_loss": np.asarray(context_loss),
          "context_loss_kept": np.asarray(context_loss).min(axis=0),
          "deltas": {l: np.asarray(d) for l, d in deltas.items()}}


def generate(frozen: Frozen, prompt: Array, max_new_tokens: int,
             settings: Settings = Settings(), *, temperature: float = 0.0,
             rng: Optional[Array] = None) -> tuple[Array, dict[str, Array]]:
  """Samples max_new_tokens after prompt int[B, P] (P >= 2), fitting the deltas on
  the prompt and again every settings.adapt_every new tokens. Returns the tokens
  [B, P + N] and the last deltas."""
  from moejax.models import generate as sample  # pylint: disable=g-import-not-at-top
  validation.positive_int("max_new_tokens", max_new_tokens)
  tokens, deltas, done = jnp.asarray(prompt, jnp.int32), None, 0
  while done < max_new_tokens:
    deltas, _ = adapt(frozen, tokens, settings, init=deltas)
    count = min(settings.adapt_every, max_new_tokens - done)
    collection = biases.to_collection(frozen.zero_bias(tokens.shape[0], tokens.shape[1]),
                                      deltas)
    key = None if rng is None else jax.random.fold_in(rng, done)
    tokens = sample(frozen.model, biases.with_bias(frozen.variables, collection), tokens,
                    count, temperature=temperature, rng=key, step=frozen.step)
    done += count
  return tokens, deltas

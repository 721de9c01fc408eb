"""Train state and optimizer.

The state holds the step, the parameters, the optimizer state and the `routing`
collection (router state that is not a parameter, e.g. balancing biases); all of
it is checkpointed. The optimizer is AdamW with linear warmup and cosine decay
(optax), after global-norm gradient clipping; weight decay applies to matrices
only (not to norms' scales).
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax


class TrainState(flax.struct.PyTreeNode):
  """step, params, opt_state and the `routing` collection."""

  step: jax.Array
  params: Any
  opt_state: Any
  routing: Any

  def apply_gradients(self, grads: Any, tx: optax.GradientTransformation) -> "TrainState":
    updates, opt_state = tx.update(grads, self.opt_state, self.params)
    return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                        opt_state=opt_state)


def initializer(model: nn.Module, tx: optax.GradientTransformation, rows: int,
                seq_len: int) -> Callable[[jax.Array], TrainState]:
  """init(key) -> the initial TrainState of `model` for batches of [rows, seq_len]
  tokens; its parameters keep their logical-axis boxes (nn.get_partition_spec
  reads them; nn.meta.unbox removes them)."""
  tokens = jnp.zeros((rows, seq_len), jnp.int32)

  def init(key):
    variables = model.init({"params": key}, tokens, deterministic=True)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(nn.meta.unbox(params)),
                      routing=variables.get("routing", {}))
  return init


def learning_rate_schedule(peak: float, warmup_steps: int, total_steps: int,
                           final_fraction: float = 0.1) -> optax.Schedule:
  """Linear warmup to `peak`, then cosine decay to final_fraction * peak."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup_steps,
      decay_steps=max(total_steps, warmup_steps + 1), end_value=peak * final_fraction)


def make_optimizer(learning_rate: float, warmup_steps: int, total_steps: int,
                   weight_decay: float = 0.1, grad_clip: float = 1.0, b1: float = 0.9,
                   b2: float = 0.95) -> optax.GradientTransformation:
  """clip_by_global_norm -> AdamW(schedule), decay on parameters with ndim >= 2."""
  schedule = learning_rate_schedule(learning_rate, warmup_steps, total_steps)
  decay_mask = lambda params: jax.tree_util.tree_map(lambda p: jnp.ndim(p) >= 2, params)
  return optax.chain(
      optax.clip_by_global_norm(grad_clip),
      optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask))

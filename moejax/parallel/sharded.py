"""The MoE layer's experts run expert-parallel over the mesh in context.

  with jax.set_mesh(make_mesh(data=2, expert=4)):
    y, aux = jax.jit(layer.apply)(variables, x)     # layer.expert_parallel set

`sharded_experts` is what the layer calls in place of its engine: it shards the
tokens [T, D] and a token-major plan over ('data', 'expert'), the expert weights
over 'expert' (and their hidden axis F over 'model'), and runs
expert_parallel_apply under shard_map. Each data row of the mesh is one
expert-parallel group; a `model` axis splits F and sums the partial outputs.
"""
from __future__ import annotations

from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from moejax.core import RoutingPlan
from moejax.dispatch import gmm as gmm_backends
from moejax.experts import ExpertFFN, bias_name
from moejax.parallel.config import ExpertParallel
from moejax.parallel.expert_parallel import expert_parallel_apply

Array = jax.Array


def context_mesh(settings: ExpertParallel = ExpertParallel()):
  """The mesh set by jax.set_mesh, or None when there is none (init, eval_shape,
  one device); a mesh without the axes `settings` names is an error."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  wanted = settings.batch_axes + ((settings.model_axis,) if settings.model_axis else ())
  missing = [a for a in wanted if a not in mesh.axis_names]
  if missing:
    raise ValueError(f"MoE.expert_parallel names mesh axes {wanted} (batch_axes, "
                     f"model_axis), but the mesh in context has axes {mesh.axis_names}: "
                     f"{missing} missing; set ExpertParallel(batch_axes=..., "
                     "expert_axis=..., model_axis=...) to your mesh's names")
  return mesh


def check_sizes(axis_sizes: Mapping[str, int], num_tokens: int, num_experts: int,
                hidden_dim: int, settings: ExpertParallel = ExpertParallel()) -> None:
  """Experts divisible by the expert axis, tokens by the batch axes, F by the
  model axis (`axis_sizes`: mesh.shape, or the sizes a config asks for)."""
  n = axis_sizes[settings.expert_axis]
  model = axis_sizes[settings.model_axis] if settings.model_axis else 1
  shards = int(np.prod([axis_sizes[a] for a in settings.batch_axes]))
  batch = " * ".join(f"mesh.{a}" for a in settings.batch_axes)
  if num_experts % n:
    raise ValueError(f"num_experts ({num_experts} routed experts) must be divisible by "
                     f"mesh.{settings.expert_axis} ({n}) for expert parallelism")
  if num_tokens % shards:
    raise ValueError(f"tokens per call B*L = {num_tokens} must be divisible by {batch} = "
                     f"{shards} for expert parallelism")
  if hidden_dim % model:
    raise ValueError(f"expert hidden_dim ({hidden_dim}) must be divisible by "
                     f"mesh.{settings.model_axis} ({model})")


def _weight_spec(name: str, settings: ExpertParallel) -> P:
  """wi* [E, D, F], wo [E, F, D], b_wi* [E, F], b_wo [E, D]."""
  expert, model = settings.expert_axis, settings.model_axis
  if name == "wo":
    return P(expert, model, None)
  if name == bias_name("wo"):
    return P(expert, None)
  if name.startswith("b_"):
    return P(expert, model)
  return P(expert, None, model)


def checks_varying_axes(engine) -> bool:
  """Whether shard_map type-checks varying axes around `engine`: not for the
  `pallas` backend, whose kernels' interpret mode (CPU) cannot be typed under
  the checks. Without them the collectives here transpose as they did before
  the checks existed; the EP tests hold values and gradients to the one-device
  layer either way."""
  backend = getattr(engine, "backend", None)
  return backend is None or gmm_backends.resolve(backend) != "pallas"


def _per_device(ffn: ExpertFFN, batch_axes: tuple[str, ...],
                model_axis: Optional[str]) -> ExpertFFN:
  """Inside shard_map: the output bias added on one model shard only (the partial
  outputs are summed over the model axis), and a dropout key of each device's own."""
  weights = dict(ffn.weights)
  if bias_name("wo") in weights and model_axis is not None:
    first = jax.lax.axis_index(model_axis) == 0
    weights[bias_name("wo")] = jnp.where(first, weights[bias_name("wo")], 0)
  key = ffn.dropout_key
  if key is not None:
    for axis in batch_axes + ((model_axis,) if model_axis else ()):
      key = jax.random.fold_in(key, jax.lax.axis_index(axis))
  return ffn.replace(weights=weights, dropout_key=key)


def sharded_experts(tokens: Array, plan: RoutingPlan, ffn: ExpertFFN, engine,
                    settings: ExpertParallel, token_major: bool = True
                    ) -> tuple[Array, dict[str, Array]]:
  """tokens [T, D] and a plan over them -> (y [T, D], metrics).

  Args:
    tokens: the layer's tokens.
    plan: the routing plan (global token and expert ids).
    ffn: all experts, weights [E, ...] (sharded over 'expert' by the rules).
    engine: the engine each device runs its rows with.
    settings: ExpertParallel.
    token_major: whether slot a belongs to token a // (A / T); other plans
      (expert choice) are first laid out token-major, E slots per token.

  Without a mesh in context the engine runs the experts unsharded (metrics {}).

  Returns:
    y and metrics: `ep_dropped` (assignments that did not fit), `ep_device_rows`
    [n] (rows each expert device ran, summed over data rows), `ep_load_ratio`
    (max over mean of those), `ep_spilled` (rows LLEP moved).
  """
  mesh = context_mesh(settings)
  if mesh is None:            # init, eval_shape, one device: the engine alone
    return engine(tokens, plan, ffn), {}
  num_tokens = tokens.shape[0]
  num_experts = ffn.num_experts
  check_sizes(mesh.shape, num_tokens, num_experts, ffn.weights["wo"].shape[1], settings)
  if not token_major:
    plan = plan.to_token_major(num_tokens, num_experts)
  batch_axes, expert_axis, model_axis = (settings.batch_axes, settings.expert_axis,
                                         settings.model_axis)
  weight_specs = ffn.replace(weights={k: _weight_spec(k, settings) for k in ffn.weights},
                             dropout_key=None if ffn.dropout_key is None else P())

  def device(x, plan, ffn):
    local = plan.replace(token=plan.token % x.shape[0])
    ffn = _per_device(ffn, batch_axes, model_axis)
    y, stats = expert_parallel_apply(x, local, ffn, engine, settings, expert_axis)
    if model_axis is not None:
      y = jax.lax.psum(y.astype(jnp.float32), model_axis).astype(x.dtype)
    # One psum: rows at this device's place on the expert axis, then the counts.
    me = jax.nn.one_hot(jax.lax.axis_index(expert_axis), mesh.shape[expert_axis])
    totals = jnp.concatenate([me * stats.rows, jnp.stack([stats.dropped, stats.spilled])])
    return y, jax.lax.psum(totals, batch_axes)

  y, totals = jax.shard_map(
      device, mesh=mesh, in_specs=(P(batch_axes), P(batch_axes), weight_specs),
      out_specs=(P(batch_axes), P()), check_vma=checks_varying_axes(engine))(tokens, plan, ffn)
  rows = totals[:-2]
  return y, {"ep_device_rows": rows, "ep_dropped": totals[-2], "ep_spilled": totals[-1],
             "ep_load_ratio": jnp.max(rows) / jnp.maximum(jnp.mean(rows), 1e-9)}

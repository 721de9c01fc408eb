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

from typing import Mapping

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moejax.core import RoutingPlan
from moejax.dispatch import gmm as gmm_backends
from moejax.experts import ExpertFFN
from moejax.parallel.config import ExpertParallel
from moejax.parallel.expert_parallel import expert_parallel_apply
from moejax.parallel.mesh import BATCH_AXES

Array = jax.Array


def context_mesh():
  """The mesh set by jax.set_mesh, with axes checked; errors name the setting."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(BATCH_AXES + ("model",)) <= set(mesh.axis_names):
    raise ValueError("MoE.expert_parallel needs a mesh with axes ('data', 'expert', "
                     "'model') in context: run under jax.set_mesh(moejax.parallel."
                     f"make_mesh(...)); the mesh in context has axes {mesh.axis_names}")
  return mesh


def check_sizes(axis_sizes: Mapping[str, int], num_tokens: int, num_experts: int,
                hidden_dim: int) -> None:
  """Experts divisible by the expert axis, tokens by data * expert, F by model
  (`axis_sizes`: mesh.shape, or the sizes a config asks for)."""
  n, model = axis_sizes["expert"], axis_sizes["model"]
  shards = axis_sizes["data"] * n
  if num_experts % n:
    raise ValueError(f"num_experts ({num_experts} routed experts) must be divisible by "
                     f"mesh.expert ({n}) for expert parallelism")
  if num_tokens % shards:
    raise ValueError(f"tokens per call B*L = {num_tokens} must be divisible by mesh.data * "
                     f"mesh.expert = {shards} for expert parallelism")
  if hidden_dim % model:
    raise ValueError(f"expert hidden_dim ({hidden_dim}) must be divisible by mesh.model "
                     f"({model})")


def _weight_spec(name: str) -> P:
  return P("expert", "model", None) if name == "wo" else P("expert", None, "model")


def checks_varying_axes(engine) -> bool:
  """Whether shard_map type-checks varying axes around `engine`: not for the
  `pallas` backend, whose kernels' interpret mode (CPU) cannot be typed under
  the checks. Without them the collectives here transpose as they did before
  the checks existed; the EP tests hold values and gradients to the one-device
  layer either way."""
  backend = getattr(engine, "backend", None)
  return backend is None or gmm_backends.resolve(backend) != "pallas"


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

  Returns:
    y and metrics: `ep_dropped` (assignments that did not fit), `ep_device_rows`
    [n] (rows each expert device ran, summed over data rows), `ep_load_ratio`
    (max over mean of those), `ep_spilled` (rows LLEP moved).
  """
  mesh = context_mesh()
  num_tokens = tokens.shape[0]
  num_experts = ffn.num_experts
  check_sizes(mesh.shape, num_tokens, num_experts, ffn.weights["wo"].shape[1])
  if not token_major:
    plan = plan.to_token_major(num_tokens, num_experts)
  weight_specs = ffn.replace(weights={k: _weight_spec(k) for k in ffn.weights})

  def device(x, plan, ffn):
    local = plan.replace(token=plan.token % x.shape[0])
    y, stats = expert_parallel_apply(x, local, ffn, engine, settings)
    y = jax.lax.psum(y.astype(jnp.float32), "model").astype(x.dtype)
    # One psum: rows at this device's place on the expert axis, then the counts.
    me = jax.nn.one_hot(jax.lax.axis_index("expert"), mesh.shape["expert"])
    totals = jnp.concatenate([me * stats.rows, jnp.stack([stats.dropped, stats.spilled])])
    return y, jax.lax.psum(totals, BATCH_AXES)

  y, totals = jax.shard_map(
      device, mesh=mesh, in_specs=(P(BATCH_AXES), P(BATCH_AXES), weight_specs),
      out_specs=(P(BATCH_AXES), P()), check_vma=checks_varying_axes(engine))(tokens, plan, ffn)
  rows = totals[:-2]
  return y, {"ep_device_rows": rows, "ep_dropped": totals[-2], "ep_spilled": totals[-1],
             "ep_load_ratio": jnp.max(rows) / jnp.maximum(jnp.mean(rows), 1e-9)}

"""The MoE layer with expert parallelism over 8 simulated devices equals the layer
on one device, forward and backward, for top-k and expert-choice plans."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from moejax import MoE
from moejax.parallel import ExpertParallel, make_mesh
from tests.helpers import assert_trees_close, jit_init

B, L, D = 4, 8, 12


def _layer(router, **kwargs):
  return MoE(num_experts=8, top_k=2, hidden_dim=16, router=router, block_size=8,
             router_kwargs={"allow_noncausal": True} if router == "expert_choice" else {},
             deterministic=True, **kwargs)


def _loss_and_grads(layer, variables, x):
  def loss(params, x):
    y, aux = layer.apply({**variables, "params": params}, x)
    return jnp.sum(jnp.sin(y) * jnp.arange(1, D + 1)) + aux.loss, aux.metrics
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
      variables["params"], x)


# The pallas backend (interpret mode here) runs with shard_map's varying-axes
# checks off; (2, 2, 2) also sums the model axis.
PALLAS = pallas_kernels.KernelSettings(tiling=pallas_kernels.GmmTiling.uniform(8, 8, 8),
                                       combine_tiles=pallas_kernels.CombineTiles(8, 8, 8))


@pytest.mark.parametrize("router,shape,backend", [
    (router, shape, "xla") for router, shapes in (
        ("topk", [(8, 1, 1), (2, 4, 1), (1, 8, 1), (2, 2, 2)]),
        ("expert_choice", [(2, 4, 1), (2, 2, 2)])) for shape in shapes]
    + [("topk", (2, 2, 2), "pallas"), ("expert_choice", (1, 8, 1), "pallas")])
def test_layer_expert_parallel_equals_one_device(router, shape, backend):
  """With data sharded (shape[0] > 1) the router also takes a per-sequence logit
  bias [B, E] (moejax.interventions.bias), which expert parallelism must honour."""
  x = jax.random.normal(jax.random.PRNGKey(0), (B, L, D))
  reference = _layer(router, backend="xla")
  variables = jit_init(reference, jax.random.PRNGKey(1), x)
  if shape[0] > 1:
    delta = 2.0 * jax.random.normal(jax.random.PRNGKey(2), (B, 8))
    variables = {**variables, "logit_bias": {"router": {"delta": delta}}}
  (want_loss, want_metrics), want_grads = _loss_and_grads(reference, variables, x)
  layer = _layer(router, backend=backend, expert_parallel=ExpertParallel(),
                 kernel_settings=PALLAS if backend == "pallas" else None)
  with jax.set_mesh(make_mesh(*shape)):
    (loss, got_metrics), grads = _loss_and_grads(layer, variables, x)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  assert_trees_close(grads, want_grads, rtol=1e-4, atol=1e-5, what=f"{router} {shape}")
  assert float(got_metrics["ep_dropped"]) == 0
  np.testing.assert_array_equal(got_metrics["load"], want_metrics["load"])
  # Every valid assignment ran on exactly one device.
  assert float(jnp.sum(got_metrics["ep_device_rows"])) == float(jnp.sum(want_metrics["load"]))


def test_expert_major_plan_laid_out_token_major():
  from moejax.core import RoutingPlan  # pylint: disable=g-import-not-at-top
  # Expert choice over T = 3 tokens, E = 2, C = 2: expert 0 takes tokens 2, 0;
  # expert 1 takes tokens 2, 1. Token-major with 2 slots per token:
  #   token 0: (e0)      token 1: (e1)      token 2: (e0, e1)
  plan = RoutingPlan(token=jnp.array([2, 0, 2, 1]), expert=jnp.array([0, 0, 1, 1]),
                     weight=jnp.array([0.5, 0.25, 0.75, 1.0]),
                     valid=jnp.array([True, True, True, True]))
  out = plan.to_token_major(num_tokens=3, per_token=2)
  np.testing.assert_array_equal(out.token, [0, 0, 1, 1, 2, 2])
  np.testing.assert_array_equal(out.valid, [True, False, True, False, True, True])
  np.testing.assert_array_equal(out.expert[out.valid], [0, 1, 0, 1])
  np.testing.assert_allclose(out.weight, [0.25, 0, 1.0, 0, 0.5, 0.75])


def test_expert_parallel_without_a_mesh_runs_unsharded_and_checks_its_mesh():
  x = jax.random.normal(jax.random.PRNGKey(0), (B, L, D))
  layer = _layer("topk", expert_parallel=ExpertParallel())
  variables = _layer("topk").init(jax.random.PRNGKey(1), x)
  # No mesh in context (init, eval_shape, one device): the engine alone.
  y, aux = jax.jit(layer.apply)(variables, x)
  np.testing.assert_allclose(y, jax.jit(_layer("topk").apply)(variables, x)[0], rtol=1e-6)
  assert "ep_dropped" not in aux.metrics
  jax.eval_shape(layer.init, jax.random.PRNGKey(1), x)
  with jax.set_mesh(make_mesh(1, 8, 1)):
    with pytest.raises(ValueError, match=r"tokens per call B\*L = 12 must be divisible by "
                                         r"mesh\.data \* mesh\.expert = 8"):
      layer.apply(variables, x[:, :3])
  # A mesh with other names: the settings must name its axes.
  other = jax.make_mesh((2, 4), ("batch", "experts"), devices=jax.devices()[:8],
                        axis_types=(jax.sharding.AxisType.Auto,) * 2)
  with jax.set_mesh(other):
    with pytest.raises(ValueError, match=r"names mesh axes \('data', 'expert', 'model'\).*"
                                         r"\['data', 'expert', 'model'\] missing"):
      layer.apply(variables, x)
  # Explicit axes (jax.make_mesh's default): one line naming them.
  explicit = jax.make_mesh((2, 4), ("data", "expert"), devices=jax.devices()[:8],
                           axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  with jax.set_mesh(explicit):
    with pytest.raises(ValueError, match=r"Explicit axes \['data', 'expert'\]: build it"):
      layer.apply(variables, x)
  with pytest.raises(ValueError, match="batch_axes .* must include expert_axis 'experts'"):
    ExpertParallel(batch_axes=("batch",), expert_axis="experts")
  with pytest.raises(ValueError, match="rows mix tokens"):
    MoE(num_experts=8, hidden_dim=16, router="soft", expert_parallel=ExpertParallel())
  with pytest.raises(TypeError, match="ExpertParallel"):
    MoE(num_experts=8, hidden_dim=16, expert_parallel="all_to_all")


@pytest.mark.parametrize("settings", [
    dict(dispatch="all_to_all", llep=True, llep_threshold=1.0),
    dict(dispatch="all_gather")])
def test_expert_parallel_on_a_mesh_with_its_own_axis_names_and_biases(settings):
  """A model's own mesh ('batch', 'experts', 'tensor'), named in ExpertParallel;
  expert biases sharded with their experts (the output bias added once over the
  model axis): values and gradients equal one device."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.PRNGKey(0), (B, L, D))
  reference = _layer("topk", use_bias=True, bias_init=nn.initializers.normal(1.0))
  variables = jit_init(reference, jax.random.PRNGKey(1), x)
  (want_loss, _), want_grads = _loss_and_grads(reference, variables, x)
  named = ExpertParallel(batch_axes=("batch", "experts"), expert_axis="experts",
                         model_axis="tensor", **settings)
  layer = reference.clone(expert_parallel=named)
  mesh = jax.make_mesh((2, 2, 2), ("batch", "experts", "tensor"), devices=jax.devices()[:8],
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  with jax.set_mesh(mesh):
    (loss, metrics), grads = _loss_and_grads(layer, variables, x)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  assert_trees_close(grads, want_grads, rtol=1e-4, atol=1e-5, what=str(settings))
  assert float(metrics["ep_dropped"]) == 0

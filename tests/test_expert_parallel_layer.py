"""The MoE layer with expert parallelism over 8 simulated devices equals the layer
on one device, forward and backward, for top-k and expert-choice plans."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import MoE
from moejax.parallel import ExpertParallel, make_mesh
from tests.helpers import assert_trees_close

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


@pytest.mark.parametrize("router", ["topk", "expert_choice"])
@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (1, 8, 1), (2, 2, 2)])
def test_layer_expert_parallel_equals_one_device(router, shape):
  x = jax.random.normal(jax.random.PRNGKey(0), (B, L, D))
  reference = _layer(router)
  variables = reference.init(jax.random.PRNGKey(1), x)
  (want_loss, want_metrics), want_grads = _loss_and_grads(reference, variables, x)
  layer = _layer(router, expert_parallel=ExpertParallel())
  with jax.set_mesh(make_mesh(*shape)):
    (loss, got_metrics), grads = _loss_and_grads(layer, variables, x)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  assert_trees_close(grads, want_grads, rtol=1e-4, atol=1e-5, what=f"{router} {shape}")
  assert float(got_metrics["ep_dropped"]) == 0
  np.testing.assert_array_equal(got_metrics["global_load"], want_metrics["load"])
  # Every valid assignment ran on exactly one device.
  assert float(jnp.sum(got_metrics["ep_device_rows"])) == float(jnp.sum(want_metrics["load"]))

"""The MoE layer jitted with experts sharded over an `expert` mesh axis on 8
simulated CPU devices gives the 1-device output."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from moejax import MoE
from moejax.parallel import make_mesh, param_shardings


@pytest.mark.parametrize("mesh_shape", [(1, 8, 1), (2, 4, 1)])
@pytest.mark.parametrize("engine", ["sorted", "einsum"])
def test_expert_sharded_layer_matches_one_device(mesh_shape, engine):
  assert jax.device_count() == 8, "tests/conftest.py sets 8 simulated devices"
  layer = MoE(num_experts=8, top_k=2, hidden_dim=16, engine=engine, block_size=8)
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 12))
  variables = layer.init(jax.random.PRNGKey(1), x)

  def forward(variables, x):
    y, aux = layer.apply(variables, x)
    return y, aux.metrics["load"]

  want_y, want_load = jax.jit(forward)(variables, x)

  mesh = make_mesh(*mesh_shape)
  shardings = param_shardings(jax.eval_shape(layer.init, jax.random.PRNGKey(1), x), mesh)
  sharded = jax.device_put(variables, shardings)
  wi = sharded["params"]["experts"]["wi_gate"].value
  assert wi.sharding.spec[0] == "expert"
  assert wi.addressable_shards[0].data.shape[0] == 8 // mesh_shape[1]
  x_sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
  got_y, got_load = jax.jit(forward)(sharded, x_sharded)
  np.testing.assert_allclose(got_y, want_y, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(got_load, want_load)

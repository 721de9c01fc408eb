"""A training step with experts sharded over (2, 4, 1) and all_to_all expert
parallelism equals the (8, 1, 1) data-parallel step; bad meshes fail at start-up
with the field named."""
from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from moejax.data import make_dataset
from moejax.parallel import make_mesh
from moejax.train import setup
from moejax.train.trainer import _global_batch, compiled_steps, init_state
from tests.helpers import tiny_config


def _one_step(config, shape):
  setup.check(config)
  model = setup.build_model(config)
  tx = optax.sgd(1.0)        # updates compare gradients (see test_train)
  batch = next(iter(make_dataset(setup.pipeline_spec(config, "train", training=True))))
  mesh = make_mesh(*shape)
  with jax.set_mesh(mesh):
    state, shardings = init_state(model, tx, config, mesh)
    before = jax.device_get(state.params)
    train_step, _, batch_sharding = compiled_steps(model, tx, config, mesh, shardings, 1)
    state, metrics = train_step(state, _global_batch(batch, batch_sharding),
                                jax.random.PRNGKey(3))
    return before, jax.device_get(state.params), jax.device_get(metrics)


@pytest.mark.parametrize("dispatch", ["all_to_all", "all_gather"])
def test_expert_parallel_step_matches_data_parallel(tfds_dir, dispatch):
  overrides = {"moe.num_experts": 8}
  config = tiny_config(tfds_dir, **overrides)
  before, want, want_metrics = _one_step(config, (8, 1, 1))
  config = tiny_config(tfds_dir, **overrides, **{"mesh.data": 2, "mesh.expert": 4,
                                                 "moe.expert_parallel.dispatch": dispatch})
  before_ep, got, metrics = _one_step(config, (2, 4, 1))
  jax.tree.map(np.testing.assert_array_equal, before_ep, before)   # same initial state
  np.testing.assert_allclose(metrics["loss"], want_metrics["loss"], rtol=1e-5)
  np.testing.assert_allclose(metrics["grad_norm"], want_metrics["grad_norm"], rtol=1e-4)
  jax.tree.map(lambda a, b, p: np.testing.assert_allclose(a - p, b - p, rtol=1e-3, atol=1e-6),
               got, want, before)
  layer = metrics["layers"]["layer_1"]
  assert float(layer["ep_dropped"]) == 0
  assert float(np.sum(layer["ep_device_rows"])) == 8 * 32 * 2       # B * L * K rows


@pytest.mark.parametrize("overrides,message", [
    ({"mesh.data": 3, "mesh.expert": 2}, r"mesh\.data\*expert\*model = 6, but there are 8"),
    ({"mesh.data": 1, "mesh.expert": 8, "moe.num_experts": 4,
      "moe.expert_parallel.dispatch": "all_to_all"},
     r"moe\.num_experts \(4 routed experts\) must be divisible by mesh\.expert \(8\)"),
    ({"mesh.data": 1, "mesh.expert": 8, "train.batch_size": 4},
     r"mesh\.data \* mesh\.expert = 8"),
    ({"moe.expert_parallel.dispatch": "broadcast"}, r"moe\.expert_parallel\.dispatch"),
    ({"moe.expert_parallel.dispatch": "all_gather", "moe.expert_parallel.llep": True},
     r"all_gather"),
])
def test_bad_mesh_or_expert_parallel_fails_at_start_up(overrides, message):
  with pytest.raises(ValueError, match=message):
    setup.check(tiny_config("/nonexistent", **overrides), num_devices=8)


def test_distributed_flags_pass_only_what_is_set():
  from absl import app  # pylint: disable=g-import-not-at-top
  from moejax.main import distributed_arguments  # pylint: disable=g-import-not-at-top
  assert distributed_arguments(None, None, None) == {}          # TPU / SLURM detection
  assert distributed_arguments("10.0.0.1:1234", 4, 3) == {
      "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
  with pytest.raises(app.UsageError, match="--process_id"):
    distributed_arguments("10.0.0.1:1234", 4, 4)
  with pytest.raises(app.UsageError, match="--num_processes"):
    distributed_arguments(None, 0, None)

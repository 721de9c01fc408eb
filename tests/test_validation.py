"""Bad settings fail early, with a ValueError whose message names the field.

Settings are checked when a module is constructed (MoE(...) or
routers.create(...)), before any init, apply or tracing; only facts that need
the input (its shape) are checked when the layer is called.
"""
import jax
import jax.numpy as jnp
import pytest

from moejax import MoE, routers
from moejax.parallel import make_mesh

BASE = {"num_experts": 4, "hidden_dim": 8, "top_k": 2}


def _moe(**overrides):
  return MoE(**{**BASE, **overrides})


def test_valid_settings_construct():
  # The baseline the failing cases below modify constructs without error.
  assert _moe().top_k == 2
  assert routers.create("topk", num_experts=8, top_k=3, num_groups=4,
                        groups_selected=2).groups_selected == 2


@pytest.mark.parametrize("overrides,field", [
    ({"top_k": 5}, "top_k"),                       # top_k > num_experts
    ({"top_k": 0}, "top_k"),
    ({"top_k": -1}, "top_k"),
    ({"top_k": 1.5}, "top_k"),
    ({"top_k": True}, "top_k"),                    # a bool is not a count
    ({"num_experts": 0}, "num_experts"),
    ({"num_experts": -2, "top_k": 1}, "num_experts"),
    ({"hidden_dim": 0}, "hidden_dim"),
    ({"capacity_factor": 0.0}, "capacity_factor"),
    ({"capacity_factor": -1.25}, "capacity_factor"),
    ({"drop_policy": "random"}, "drop_policy"),
    ({"router": "no_such_router"}, "router"),
    ({"engine": "no_such_engine"}, "engine"),
    ({"backend": "no_such_backend"}, "backend"),
    ({"block_size": 0}, "block_size"),
    ({"granularity": 3}, "granularity"),           # 3 does not divide hidden_dim 8
    ({"granularity": 0}, "granularity"),
    ({"num_shared_experts": -1}, "num_shared_experts"),
    ({"model_dim": 0}, "model_dim"),
    ({"expert_type": "moe"}, "expert_type"),
    ({"activation": "tanh"}, "activation"),
    ({"router_kwargs": {"temperature": 2.0}}, "temperature"),  # unknown setting
    ({"router_kwargs": {"score": "relu"}}, "score"),
    ({"router_kwargs": {"order": "sideways"}}, "order"),
    ({"router_kwargs": {"scale": 0.0}}, "scale"),
    ({"router_kwargs": {"scale": -2.5}}, "scale"),
    ({"router_kwargs": {"jitter": 1.0}}, "jitter"),
    ({"router_kwargs": {"jitter": -0.1}}, "jitter"),
    ({"router_kwargs": {"num_groups": 3}}, "num_groups"),       # 3 does not divide 4
    ({"router_kwargs": {"num_groups": 0}}, "num_groups"),
    ({"router_kwargs": {"num_groups": 2, "groups_selected": 3}}, "groups_selected"),
    ({"router_kwargs": {"num_groups": 2, "groups_selected": 0}}, "groups_selected"),
    ({"loss_weights": {"switch": -1e-2}}, "loss_weights.switch"),
    ({"loss_weights": {"z": float("nan")}}, "loss_weights.z"),
    ({"loss_weights": {"entropy": 1e-2}}, "loss_weights"),      # not a topk loss
    ({"router_kwargs": {"num_experts": 2}}, "router_kwargs.num_experts"),  # layer's field
    ({"router_kwargs": {"top_k": 1}}, "router_kwargs.top_k"),
    ({"engine": "loop", "backend": "no_such_backend"}, "backend"),  # checked for any engine
])
def test_moe_rejects_bad_settings_at_construction(overrides, field):
  with pytest.raises(ValueError, match=field):
    _moe(**overrides)


def test_unknown_loss_weight_names_the_loss():
  with pytest.raises(ValueError, match="'entropy'"):
    _moe(loss_weights={"switch": 1e-2, "entropy": 1e-2})


def test_granularity_that_divides_hidden_dim_is_accepted():
  moe = _moe(granularity=2)
  assert (moe.routed_experts, moe.experts_per_token, moe.expert_hidden_dim) == (8, 4, 4)


@pytest.mark.parametrize("kwargs,field", [
    ({"num_experts": 4, "top_k": 5}, "top_k"),
    ({"num_experts": 4, "top_k": 0}, "top_k"),
    ({"num_experts": 0, "top_k": 1}, "num_experts"),
    ({"num_experts": 4, "no_such_setting": 1}, "no_such_setting"),
    ({"num_experts": 4, "score": "tanh"}, "score"),
    ({"num_experts": 4, "order": "random"}, "order"),
    ({"num_experts": 4, "score": "sigmoid", "order": "topk_softmax"}, "order"),
    ({"num_experts": 4, "scale": 0}, "scale"),
    ({"num_experts": 4, "jitter": 1.5}, "jitter"),
    ({"num_experts": 6, "num_groups": 4}, "num_groups"),
    ({"num_experts": 8, "num_groups": 4, "groups_selected": 5}, "groups_selected"),
    # K = 3 > the 2 experts of one selected group of 2.
    ({"num_experts": 8, "top_k": 3, "num_groups": 4, "groups_selected": 1}, "groups_selected"),
])
def test_create_rejects_bad_router_settings(kwargs, field):
  with pytest.raises(ValueError, match=field):
    routers.create("topk", **kwargs)


def test_create_rejects_unknown_router():
  with pytest.raises(ValueError, match="router must be one of"):
    routers.create("no_such_router", num_experts=4)
  with pytest.raises(ValueError, match="router"):
    routers.get("no_such_router")


def test_model_dim_mismatch_raises_on_call():
  moe = _moe(model_dim=16)
  x = jnp.zeros((2, 3, 8))
  with pytest.raises(ValueError, match="model_dim"):
    moe.init(jax.random.key(0), x)


@pytest.mark.parametrize("shape", [(8,), ()])
def test_x_must_have_a_token_and_a_feature_axis(shape):
  with pytest.raises(ValueError, match=r"x must be \[B, L, D\] or \[T, D\]"):
    _moe().init(jax.random.key(0), jnp.zeros(shape))


@pytest.mark.parametrize("router_kwargs", [{"noisy": True}, {"jitter": 0.05}])
def test_noisy_router_needs_deterministic(router_kwargs):
  moe = _moe(router_kwargs=router_kwargs)
  with pytest.raises(ValueError, match="deterministic"):
    moe.init(jax.random.key(0), jnp.zeros((1, 2, 8)))


def test_make_mesh_needs_the_device_count():
  # conftest.py simulates 8 CPU devices.
  assert jax.device_count() == 8
  assert make_mesh(data=2, expert=2, model=2).devices.shape == (2, 2, 2)
  with pytest.raises(ValueError, match=r"data\*expert\*model = 3\*1\*1 = 3"):
    make_mesh(data=3)
  with pytest.raises(ValueError, match="8 devices"):
    make_mesh(data=2, expert=2)
  with pytest.raises(ValueError, match="mesh.expert"):
    make_mesh(data=8, expert=0)

"""Every ```python block of README.md runs as written, and does what its comments say.

Each block runs in a fresh namespace; the check for a block is chosen by a marker
the block contains, and a block without a check fails the suite.
"""
import os
import re

import numpy as np
import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_blocks() -> list[str]:
  """The ```python blocks of README.md, in order."""
  with open(README, encoding="utf-8") as f:
    return re.findall(r"```python\n(.*?)```", f.read(), re.S)


def run_block(block: str) -> dict:
  """The namespace left by running `block` in a fresh one."""
  namespace = {"__name__": "readme_example"}
  exec(compile(block, README, "exec"), namespace)  # pylint: disable=exec-used
  return namespace


def gate_sums(plan, num_tokens: int) -> np.ndarray:
  """Sum of the valid combine weights of each token."""
  weight = np.where(np.asarray(plan.valid), np.asarray(plan.weight, np.float64), 0.0)
  return np.bincount(np.asarray(plan.token), weights=weight, minlength=num_tokens)


def check_layer_example(ns: dict) -> None:
  """The MoE layer in your own model: y has x's shape, each token's 2 gates sum to
  1, nothing is dropped, aux.loss is the weighted sum of the two losses, and aux
  holds the metrics the paragraph below the block lists."""
  x, y, aux = ns["x"], ns["y"], ns["aux"]
  assert x.shape == y.shape == (2, 16, 256)
  np.testing.assert_allclose(gate_sums(aux.plan, 32), np.ones(32), rtol=1e-6)
  assert float(aux.metrics["dropped"]) == 0.0
  assert float(aux.metrics["experts_per_token"]) == 2.0
  assert float(aux.metrics["load"].sum()) == 64.0              # 32 tokens x K = 2
  expected = 1e-2 * float(aux.losses["switch"]) + 1e-3 * float(aux.losses["z"])
  np.testing.assert_allclose(float(aux.loss), expected, rtol=1e-6)
  task = float(np.mean((np.asarray(y) - np.asarray(x)) ** 2))
  np.testing.assert_allclose(float(ns["loss"]), task + expected, rtol=1e-6)
  for name in ("load", "max_violation", "load_cv", "experts_per_token", "router_entropy",
               "router_marginal_entropy", "dropped", "dropped_share"):
    assert name in aux.metrics, name


def check_aux_free_example(ns: dict) -> None:
  """Aux-free bias: bias and counts start at zero, aux.loss is the z-loss alone
  (weight 1e-3), the step selects 64 times, and update_routing moves the bias by
  1e-3 * sign(mean count - count) and zeroes the counts."""
  start = ns["variables"]["routing"]["router"]
  np.testing.assert_array_equal(start["bias"], np.zeros(8))
  np.testing.assert_array_equal(start["counts"], np.zeros(8))
  aux = ns["aux"]
  assert float(aux.losses["switch"]) > 0                        # computed, weighted 0
  np.testing.assert_allclose(float(aux.loss), 1e-3 * float(aux.losses["z"]), rtol=1e-6)
  counts = np.asarray(aux.metrics["selected"])
  assert counts.sum() == 64.0                                   # 2 * 16 tokens * K = 2
  routing = ns["routing"]["router"]
  np.testing.assert_allclose(routing["bias"], 1e-3 * np.sign(counts.mean() - counts),
                             atol=1e-9)
  np.testing.assert_array_equal(routing["counts"], 0)


def check_kernels_example(ns: dict) -> None:
  """pallas_kernels on their own: gmm, combine and tgmm equal their float64
  formulas in the block's comments."""
  x, w = np.asarray(ns["x"], np.float64), np.asarray(ns["w"], np.float64)
  rows, weights = np.asarray(ns["rows"]), np.asarray(ns["weights"], np.float64)
  grad = np.asarray(ns["grad"], np.float64)
  group = np.repeat(np.arange(len(ns["group_sizes"])), np.asarray(ns["group_sizes"]))
  assert len(group) == len(rows) == 12
  out = np.einsum("rd,rdf->rf", x[rows], w[group])              # x[rows[r]] @ w[g(r)]
  np.testing.assert_allclose(ns["out"], out, rtol=1e-5, atol=1e-5)
  y = np.zeros((ns["num_tokens"], out.shape[1]))
  np.add.at(y, rows, weights[:, None] * out)                    # sum_{r -> t} weights[r] out[r]
  np.testing.assert_allclose(ns["y"], y, rtol=1e-5, atol=1e-5)
  dw = np.stack([x[rows[group == g]].T @ grad[group == g] for g in range(3)])
  np.testing.assert_allclose(ns["dw"], dw, rtol=1e-5, atol=1e-5)
  # each token reaches 2 experts with weight 0.5: y is the mean of its two outputs
  assert np.all(np.bincount(rows, minlength=6) == 2)


def check_router_example(ns: dict) -> None:
  """Writing a router: the one-file router is registered and runs in the layer; the
  layer weighs its z-loss by the router's default 1e-3; each token gets 2 experts;
  the carry is the [T, E] probabilities."""
  from moejax import routers
  try:
    assert routers.get("carry_topk") is ns["CarryTopK"]
    y, aux = ns["y"], ns["aux"]
    assert y.shape == (2, 8, 16)
    np.testing.assert_allclose(float(aux.loss), 1e-3 * float(aux.losses["z"]), rtol=1e-6)
    assert float(aux.metrics["experts_per_token"]) == 2.0
    assert aux.carry.shape == (16, 4)
    np.testing.assert_allclose(np.asarray(aux.carry).sum(-1), np.ones(16), rtol=1e-6)
  finally:
    routers.unregister("carry_topk")


def check_drop_in_example(ns: dict) -> None:
  """In place of an MLP block: y stays bfloat16, the sown loss is the weighted
  switch and z losses of the one MoE layer, and the bias moved by the aux-free rule
  (1e-3 * sign(mean count - count)) with the counts reset."""
  aux, variables = ns["aux"], ns["variables"]
  assert set(aux.metrics) == {"MoE_0"}
  metrics = aux.metrics["MoE_0"]
  assert float(metrics["experts_per_token"]) <= 2.0
  assert np.isfinite(float(ns["loss"])) and float(aux.loss) > 0
  counts = np.asarray(aux.state["routing"]["MoE_0"]["router"]["counts"])
  bias = np.asarray(variables["routing"]["MoE_0"]["router"]["bias"])
  np.testing.assert_allclose(bias, 1e-3 * np.sign(counts.mean() - counts), atol=1e-9)
  np.testing.assert_array_equal(variables["routing"]["MoE_0"]["router"]["counts"], 0)
  y, _ = ns["block"].apply(variables, ns["x"], ns["tokens"], rngs={"dropout": ns["jax"]
                           .random.PRNGKey(0)}, mutable=["routing"])
  assert y.dtype == ns["jnp"].bfloat16
  assert "b_wo" in variables["params"]["MoE_0"]["experts"]


CHECKS = {
    "class Block(nn.Module)": check_layer_example,
    '"aux_free": True': check_aux_free_example,
    "import pallas_kernels": check_kernels_example,
    "(routers.Router)": check_router_example,
    "class MlpBlock": check_drop_in_example,
}


def check_of(block: str):
  """The one check whose marker the block contains."""
  found = [check for marker, check in CHECKS.items() if marker in block]
  assert len(found) == 1, f"README block needs exactly one check in CHECKS:\n{block[:300]}"
  return found[0]


def test_every_python_block_has_one_check():
  blocks = python_blocks()
  assert len(blocks) == len(CHECKS) == 5
  assert sorted(check_of(b).__name__ for b in blocks) == sorted(c.__name__ for c in CHECKS.values())


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_python_block_runs_and_does_what_it_says(index):
  block = python_blocks()[index]
  check_of(block)(run_block(block))

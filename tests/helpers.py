"""Shared test helpers: random plans, expert FFNs and tree comparisons."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from moejax.core import RoutingPlan
from moejax.experts import ExpertFFN


def jit_init(module, rngs, *args, **kwargs):
  """module.init(rngs, *args, **kwargs) traced once under jit, the arguments but
  `rngs` held as constants. An eager init runs the forward op by op (about 9 s for
  the loop oracle, against 1 s traced); it pays only where the test's own applies
  are jitted too, since eager applies reuse the ops an eager init compiled."""
  return jax.jit(lambda r: module.init(r, *args, **kwargs))(rngs)


def random_plan(rng: np.random.Generator, num_tokens: int, top_k: int, num_experts: int,
                active_experts: int, invalid_share: float = 0.0) -> RoutingPlan:
  """A tokens-choose plan whose experts come from `active_experts` of E, Zipf-skewed.

  Each token gets top_k distinct experts, so groups are uneven and, when
  active_experts < E, some are empty.
  """
  active = rng.permutation(num_experts)[:max(active_experts, top_k)]
  popularity = 1.0 / np.arange(1, len(active) + 1)
  popularity /= popularity.sum()
  expert = np.stack([rng.choice(active, size=top_k, replace=False, p=popularity)
                     for _ in range(num_tokens)])
  weight = rng.uniform(0.05, 1.0, size=(num_tokens, top_k)).astype(np.float32)
  valid = rng.uniform(size=(num_tokens, top_k)) >= invalid_share
  return RoutingPlan.from_topk(jnp.asarray(expert, jnp.int32), jnp.asarray(weight),
                               jnp.asarray(valid))


def random_ffn(rng: np.random.Generator, num_experts: int, model_dim: int, hidden_dim: int,
               glu: bool, activation: str = "silu", dtype=jnp.float32) -> ExpertFFN:
  names = ("wi_gate", "wi_up") if glu else ("wi",)
  weights = {n: rng.normal(size=(num_experts, model_dim, hidden_dim)) / np.sqrt(model_dim)
             for n in names}
  weights["wo"] = rng.normal(size=(num_experts, hidden_dim, model_dim)) / np.sqrt(hidden_dim)
  weights = {k: jnp.asarray(v, dtype) for k, v in weights.items()}
  return ExpertFFN(weights=weights, activation=activation, glu=glu)


def assert_trees_close(actual, expected, rtol=1e-5, atol=1e-5, what=""):
  """Every leaf of `actual` equals the matching leaf of `expected` within tolerance."""
  flat_a, tree_a = jax.tree_util.tree_flatten_with_path(actual)
  flat_e, tree_e = jax.tree_util.tree_flatten(expected)
  assert len(flat_a) == len(flat_e), f"{what}: trees differ: {tree_a} vs {tree_e}"
  for (path, a), e in zip(flat_a, flat_e):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(e, np.float32),
                               rtol=rtol, atol=atol,
                               err_msg=f"{what} {jax.tree_util.keystr(path)}")


# ----------------------------------------------------------------------------
# Training runs at test size.

TINY_OVERRIDES = {
    "data.seq_len": 32,
    "model.num_layers": 2,
    "model.model_dim": 32,
    "model.num_heads": 2,
    "model.mlp_dim": 64,
    "moe.num_experts": 4,
    "moe.top_k": 2,
    "moe.hidden_dim": 32,
    "moe.block_size": 16,
    "train.batch_size": 8,
    "train.eval_batch_size": 8,
    "train.steps": 20,
    "train.warmup_steps": 2,
    "train.learning_rate": 1e-2,
    "train.log_every": 1,
    "train.eval_every": 10,
    "train.eval_batches": 2,
    "train.checkpoint_every": 10,
    "train.probe_every": 0,
}


def tiny_config(data_dir: str, name: str = "synthetic_domains", **overrides):
  """configs/lm_tiny.py shrunk to test size; overrides use dotted keys."""
  import configs.lm_tiny  # pylint: disable=g-import-not-at-top
  config = configs.lm_tiny.get_config()
  values = {**TINY_OVERRIDES, "data.name": name, "data.data_dir": data_dir, **overrides}
  for key, value in values.items():
    node = config
    *parents, leaf = key.split(".")
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def import_blocker(blocked: tuple[str, ...], why: str) -> str:
  """Python source that makes every later import of the packages `blocked` (and
  their submodules) fail with `<name> <why>`: the preamble of a `python -c` run
  that must work without them."""
  return f"""
import importlib.abc, sys
class Blocked(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path, target=None):
    if name.split(".")[0] in {tuple(blocked)!r}:
      raise ImportError(f"{{name}} {why}")
sys.meta_path.insert(0, Blocked())
"""


def subprocess_env(devices: int = 1) -> dict[str, str]:
  """The environment of a run a test starts: `devices` simulated CPU devices, this
  repository importable, and the suite's other XLA flags and compilation cache."""
  import os  # pylint: disable=g-import-not-at-top
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
  env["JAX_PLATFORMS"] = "cpu"
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
  return env


def main_command(workdir: str, data_dir: str, name: str = "synthetic_domains",
                 **overrides) -> list[str]:
  """The `python -m moejax.main` command line of tiny_config."""
  import sys  # pylint: disable=g-import-not-at-top
  values = {**TINY_OVERRIDES, "data.name": name, "data.data_dir": data_dir, **overrides}
  return [sys.executable, "-m", "moejax.main", "--config=configs/lm_tiny.py",
          f"--workdir={workdir}", "--noprogress",
          *[f"--config.{k}={v}" for k, v in values.items()]]


def train_losses(workdir: str) -> dict[int, float]:
  """Train loss by step from metrics.jsonl; a step logged twice keeps the last."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  losses = {}
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    for line in f:
      record = json.loads(line)
      if record["split"] == "train":
        losses[record["step"]] = record["loss"]
  return losses

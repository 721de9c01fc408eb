"""Training: state, steps, checkpoints, metric writers, the loop and the report.

`train` and `evaluate` need the `data` extra (grain, tensorflow-datasets,
orbax-checkpoint, tensorboardX, matplotlib, ml-collections) and import it when
first used; `moejax.train.state` and `moejax.train.step` need only the core
(jax, flax, optax), so a bare accelerator machine can run a train step.
"""
import importlib

__all__ = ["evaluate", "train"]


def __getattr__(name):
  if name in __all__:
    return getattr(importlib.import_module("moejax.train.trainer"), name)
  raise AttributeError(f"module 'moejax.train' has no attribute {name!r}")

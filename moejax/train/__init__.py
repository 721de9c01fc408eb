"""Training: state, steps, checkpoints, metric writers, the loop and the report.

Needs the `data` extra (grain, tensorflow-datasets, orbax-checkpoint, tensorboardX,
matplotlib, ml-collections); the core of moejax does not import this package.
"""
from moejax.train.trainer import evaluate, train

__all__ = ["evaluate", "train"]

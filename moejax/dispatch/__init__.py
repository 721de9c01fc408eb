"""Engines: execute a RoutingPlan with stacked experts.

  engine(x [T, D], plan, ffn, capacity=None) -> y [T, D]

  loop     per-expert loop, the oracle
  einsum   GShard one-hot dispatch/combine [T, E, C]
  sorted   argsort by expert + grouped matmul (backends: auto, xla, pallas, ragged_dot)
"""
from __future__ import annotations

from moejax import validation
from moejax.dispatch.einsum import EinsumEngine
from moejax.dispatch import gmm as gmm_backends
from moejax.dispatch.gmm import BACKENDS
from moejax.dispatch.loop import LoopEngine
from moejax.dispatch.sorted import SortedEngine

ENGINES = {
    "loop": LoopEngine,
    "einsum": EinsumEngine,
    "sorted": SortedEngine,
}


def names() -> list[str]:
  return list(ENGINES)


def create(name: str, /, **kwargs):
  """Builds engine `name`; kwargs are its settings (sorted: backend, block_size,
  kernel_settings)."""
  validation.one_of("engine", name, tuple(ENGINES))
  try:
    return ENGINES[name](**kwargs)
  except TypeError as e:
    raise ValueError(f"engine {name!r} does not take settings {sorted(kwargs)}: {e}") from None


__all__ = ["BACKENDS", "gmm_backends", "EinsumEngine", "LoopEngine", "SortedEngine", "create", "names"]

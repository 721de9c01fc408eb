"""Grouped-matmul backends for the sorted engine.

Every backend computes gmm(lhs [R, D], rhs [E, D, F], group_sizes [E]) -> [R, F]
with rows ordered by group and rows at or beyond sum(group_sizes) set to zero,
and is differentiable in lhs and rhs.

  xla         block-tiled, static shapes, pure XLA, grouped backward (gmm_xla.py)
  ragged_dot  jax.lax.ragged_dot; on some backends it runs densely: measure.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from moejax import validation
from moejax.dispatch import gmm_xla

Array = jax.Array
GroupedMatmul = Callable[[Array, Array, Array], Array]


def ragged_dot(lhs: Array, rhs: Array, group_sizes: Array, block_size: int = 0) -> Array:
  """jax.lax.ragged_dot with float32 accumulation; block_size is unused."""
  del block_size
  out = jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32),
                           preferred_element_type=jnp.float32)
  return out.astype(lhs.dtype)


BACKENDS: dict[str, Callable[..., Array]] = {
    "xla": gmm_xla.gmm,
    "ragged_dot": ragged_dot,
}


def get(backend: str, block_size: int = 128) -> GroupedMatmul:
  """The grouped matmul of `backend` as gmm(lhs, rhs, group_sizes)."""
  validation.one_of("backend", backend, tuple(BACKENDS))
  validation.positive_int("block_size", block_size)
  fn = BACKENDS[backend]
  return lambda lhs, rhs, group_sizes: fn(lhs, rhs, group_sizes, block_size)

"""Row helpers of grouped layouts: group starts from group sizes, and a gather
that reads a zero row for an index outside the array."""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def exclusive_cumsum(a: Array, axis: int = 0) -> Array:
  """Sum of the entries before each one along `axis`: group sizes -> group starts."""
  return jnp.cumsum(a, axis=axis) - a


def read_rows(x: Array, index: Array) -> Array:
  """x[index] along the first axis; an index outside x reads a zero row."""
  return x.at[index].get(mode="fill", fill_value=0)

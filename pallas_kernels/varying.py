"""Varying mesh axes under shard_map's type checks (check_vma).

Inside shard_map every value's type says which mesh axes it varies over. A loop
carry must keep its type, and a custom VJP's cotangent must have its primal's:
these helpers build loop carries that vary like their operands, and sum
cotangents over the axes their primal does not vary over. Outside shard_map
they do nothing.
"""
from __future__ import annotations

import jax

Array = jax.Array


def varying_axes(a: Array) -> frozenset:
  """Mesh axes `a` varies over inside shard_map (empty outside)."""
  aval = jax.typeof(a)
  manual = getattr(aval, "manual_axis_type", None)
  return frozenset(manual.varying if manual is not None else getattr(aval, "vma", ()))


def vary_like(value, *refs: Array):
  """`value` (a pytree) made to vary over every axis any of `refs` varies over."""
  axes = frozenset().union(*(varying_axes(r) for r in refs))

  def cast(a):
    missing = tuple(sorted(axes - varying_axes(a)))
    return jax.lax.pcast(a, missing, to="varying") if missing else a
  return jax.tree.map(cast, value) if axes else value


def cotangent(ct: Array, primal: Array) -> Array:
  """ct summed over the mesh axes it varies over and `primal` does not: the
  transpose of the implicit broadcast of an unvarying operand."""
  extra = varying_axes(ct) - varying_axes(primal)
  return jax.lax.psum(ct, tuple(sorted(extra))) if extra else ct


def shape_like(shape, dtype, like: Array) -> jax.ShapeDtypeStruct:
  """ShapeDtypeStruct of a kernel output that varies as `like` does (pallas_call
  under shard_map needs the output's varying axes spelled out)."""
  manual = getattr(jax.typeof(like), "manual_axis_type", None)
  if manual is None:
    return jax.ShapeDtypeStruct(shape, dtype)
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=manual)

"""Grouped-matmul backends of the sorted engine.

A backend runs the two kinds of products of an expert FFN over rows grouped by
expert, in a grouped layout where group e owns a run of `padded_sizes[e]` rows
(its assignments, then padding up to a multiple of `row_multiple`):

  gather_gmm(x [N, D], row_index [R], W [E, D, F], padded_sizes [E]) -> [R, F]
      out[r] = x[row_index[r]] @ W[e(r)]; an index outside x reads a zero row.
  gmm_scatter(h [R, F], W [E, F, D], padded_sizes, row_index [R], weight [R], N)
      -> y [N, D],  y[row_index[r]] += weight[r] * (h[r] @ W[e(r)]); an index
      outside y is dropped.

Rows beyond sum(padded_sizes) are outside every group: gather_gmm writes them as
zeros and gmm_scatter ignores them.

  xla         block-tiled loops in pure XLA, dispatch and combine fused into the
              matmuls, grouped backward (gmm_xla.py); groups padded to the tile.
  ragged_dot  jax.lax.ragged_dot on a gathered copy, combine by segment sum;
              contiguous groups. On some backends it runs densely: measure.
  pallas      our kernels (pallas_kernels): grouped matmul reading rows by index,
              atomic-free weighted combine, grouped backward; contiguous groups.
              Triton on GPU, Mosaic on TPU, interpret mode on CPU (slow: tests).
  auto        per platform, AUTO_BACKEND: a backend that passed
              experiments/device_check.py on that platform (the fastest where
              timings exist); until a platform has such results, `xla`, whose
              correctness rests on XLA alone, not on a kernel compiler that has
              not run our kernels.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

from moejax import validation
from moejax.dispatch import gmm_xla

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class RaggedDotBackend:
  """jax.lax.ragged_dot with float32 accumulation."""

  row_multiple: int = dataclasses.field(default=1, init=False)

  def gmm(self, lhs: Array, rhs: Array, group_sizes: Array) -> Array:
    out = jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32),
                             preferred_element_type=jnp.float32)
    return out.astype(lhs.dtype)

  def gather_gmm(self, x, row_index, rhs, padded_sizes):
    return self.gmm(x.at[row_index].get(mode="fill", fill_value=0), rhs, padded_sizes)

  def gmm_scatter(self, h, rhs, padded_sizes, row_index, weight, num_out):
    out = self.gmm(h, rhs, padded_sizes).astype(jnp.float32)
    y = jax.ops.segment_sum(out * weight[:, None].astype(jnp.float32), row_index,
                            num_segments=num_out)
    return y.astype(h.dtype)


@dataclasses.dataclass(frozen=True)
class XlaBackend:
  """Tiled loops with fused dispatch and combine; groups padded to block_size."""

  block_size: int = 128

  def __post_init__(self):
    validation.positive_int("block_size", self.block_size)

  @property
  def row_multiple(self) -> int:
    return self.block_size

  def gather_gmm(self, x, row_index, rhs, padded_sizes):
    return gmm_xla.gather_gmm(x, row_index, rhs, padded_sizes, self.block_size)

  def gmm_scatter(self, h, rhs, padded_sizes, row_index, weight, num_out):
    return gmm_xla.gmm_scatter(h, rhs, padded_sizes, row_index, weight, num_out,
                               self.block_size)


@dataclasses.dataclass(frozen=True)
class PallasBackend:
  """pallas_kernels.gmm with fused dispatch, then pallas_kernels.combine.

  Attributes:
    settings: pallas_kernels.KernelSettings (target, tiles per pass, interpret);
      None for the defaults of the running platform.
  """

  settings: Optional[Any] = None
  row_multiple: int = dataclasses.field(default=1, init=False)

  def gather_gmm(self, x, row_index, rhs, padded_sizes):
    import pallas_kernels
    return pallas_kernels.gmm(x, rhs, padded_sizes, row_index=row_index,
                              settings=self.settings)

  def gmm_scatter(self, h, rhs, padded_sizes, row_index, weight, num_out):
    import pallas_kernels
    out = pallas_kernels.gmm(h, rhs, padded_sizes, settings=self.settings)
    return pallas_kernels.combine(out, row_index, weight, num_out, settings=self.settings)


BACKENDS = {"xla": XlaBackend, "ragged_dot": RaggedDotBackend, "pallas": PallasBackend,
            "auto": None}


# What `auto` stands for on each JAX platform. An entry other than `xla` needs a
# committed experiments/results/device_*.jsonl of that platform in which the
# backend passed every correctness line (tests/test_device_check.py holds this
# table to those files); the README's backend table names the device and date.
AUTO_BACKEND = {"cpu": "xla", "gpu": "xla", "tpu": "xla"}


def resolve(backend: str) -> str:
  """The backend `auto` stands for on the running platform; others unchanged."""
  if backend != "auto":
    return backend
  return AUTO_BACKEND.get(jax.default_backend(), "xla")


def create(backend: str, block_size: int = 128, kernel_settings: Optional[Any] = None):
  """Backend `backend`; block_size is the row tile of `xla`, kernel_settings
  (pallas_kernels.KernelSettings) configure `pallas`."""
  validation.one_of("backend", backend, tuple(BACKENDS))
  validation.positive_int("block_size", block_size)
  backend = resolve(backend)
  if backend == "xla":
    return XlaBackend(block_size)
  if backend == "pallas":
    return PallasBackend(kernel_settings)
  return BACKENDS[backend]()

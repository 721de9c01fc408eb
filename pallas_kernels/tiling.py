"""Tile sizes of the grouped-matmul kernels, one set per pass.

A grouped matmul out[M, N] = lhs[M, K] @ rhs[g][K, N] runs in tiles of
(block_m, block_k, block_n). The three passes of a layer's training step have
different shapes, so each gets its own tiles:

  forward   out = lhs @ W[g]                     (M, K, N) = (R, D, F)
  lhs_grad  d lhs = d out @ W[g]^T               (M, K, N) = (R, F, D)
  rhs_grad  d W[g] = lhs_g^T @ d out_g           (M, K, N) = (R, D, F), M summed

A tile larger than its (padded) dimension is shrunk to that dimension, rounded
up to `align`, so tiny test shapes run with tiny tiles. Triton needs every dot
operand dimension to be a power of two of at least 16; Mosaic TPU wants rows in
multiples of 8 and lanes in multiples of 128.
"""
from __future__ import annotations

import dataclasses

from pallas_kernels import checks


@dataclasses.dataclass(frozen=True)
class Tiles:
  """(block_m, block_k, block_n) of one pass."""

  block_m: int = 128
  block_k: int = 64
  block_n: int = 128

  def __post_init__(self):
    checks.positive_fields(self, ("block_m", "block_k", "block_n"))

  def fit(self, m: int, k: int, n: int, align: int = 1) -> "Tiles":
    """These tiles shrunk to the problem: no tile exceeds its dimension (rounded
    up to a power of two no less than `align`)."""
    return Tiles(*(min(block, fit_dim(dim, align))
                   for block, dim in ((self.block_m, m), (self.block_k, k), (self.block_n, n))))


@dataclasses.dataclass(frozen=True)
class GmmTiling:
  """Tiles per pass: forward, lhs gradient, rhs (weight) gradient."""

  forward: Tiles = Tiles()
  lhs_grad: Tiles = Tiles()
  rhs_grad: Tiles = Tiles()

  def __post_init__(self):
    for name in ("forward", "lhs_grad", "rhs_grad"):
      if not isinstance(getattr(self, name), Tiles):
        raise TypeError(f"tiling.{name} must be Tiles, got {getattr(self, name)!r}")

  @classmethod
  def uniform(cls, block_m: int, block_k: int, block_n: int) -> "GmmTiling":
    tiles = Tiles(block_m, block_k, block_n)
    return cls(tiles, tiles, tiles)


# Defaults per target. Triton (GPU): 64 x 64 x 128 bf16 tiles keep registers and
# shared memory within an SM's budget at num_stages 3; the weight-gradient pass
# walks M, so it takes taller row tiles. Mosaic (TPU): lane-dense 128-multiples,
# a larger K tile to cut accumulator round trips.
DEFAULT_TILING = {
    "triton": GmmTiling(forward=Tiles(64, 64, 128), lhs_grad=Tiles(64, 64, 128),
                        rhs_grad=Tiles(128, 64, 64)),
    "mosaic": GmmTiling(forward=Tiles(128, 512, 128), lhs_grad=Tiles(128, 512, 128),
                        rhs_grad=Tiles(512, 128, 128)),
}
ALIGN = {"triton": 16, "mosaic": 8}


def fit_dim(dim: int, align: int) -> int:
  """The smallest power of two that is at least dim and at least align."""
  size = max(align, 1)
  while size < dim:
    size *= 2
  return size


def round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple

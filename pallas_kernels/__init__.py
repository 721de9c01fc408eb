"""Pallas kernels for the dropless path: grouped matmul, fused dispatch and combine.

  gmm       out[r] = lhs[r or row_index[r]] @ W[g(r)]   grouped matmul, fused gather
  tgmm      d W[g] = lhs_g^T grad_g                      the grouped weight gradient
  combine   y[t] = sum_{r -> t} weight[r] rows[r]        weighted gather-sum, no atomics

`gmm` and `combine` are differentiable with grouped backward passes. Kernels
target GPU (Triton) and TPU (Mosaic) and run in interpret mode on CPU; tiles are
set per pass (GmmTiling). moejax's `sorted` engine uses them as backend `pallas`.

The package imports only jax. Its small helpers (checks: field checks; rows:
group starts and zero-filling gathers; varying: shard_map's varying mesh axes)
serve moejax too, which imports them from here.
"""
from pallas_kernels.ops import KernelSettings, TARGETS, combine, default_target, gmm, tgmm
from pallas_kernels.tiling import DEFAULT_TILING, GmmTiling, Tiles
from pallas_kernels.triton_combine import CombineTiles

__all__ = ["CombineTiles", "DEFAULT_TILING", "GmmTiling", "KernelSettings", "TARGETS",
           "Tiles", "combine", "default_target", "gmm", "tgmm"]

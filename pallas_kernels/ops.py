"""Differentiable grouped matmuls and combine, on the kernels of the target.

  gmm(lhs [M, K], rhs [G, K, N], group_sizes [E]) -> [M, N]
      out[r] = lhs[r] @ rhs[g(r) - offset] for rows of the local groups
      [offset, offset + G); every other row (other groups, past sum(group_sizes))
      is zero. With row_index [R], row r reads lhs[row_index[r]] instead (fused
      dispatch; an index outside lhs reads a zero row) and out is [R, N].
  tgmm(lhs [M, K], grad [M, N], group_sizes [E]) -> [G, K, N]
      d W[g] = lhs_g^T grad_g over the rows of local group g (zeros if empty).
  combine(rows [R, D], row_index [R], weight [R], T) -> [T, D]
      y[t] = sum_{r: row_index[r] = t} weight[r] rows[r] (fused combine; an index
      outside [0, T) is dropped).

`gmm` and `combine` carry custom VJPs, so the backward pass is grouped too:

  d lhs   = gmm(grad, rhs^T)            (the kernel reads rhs transposed in place)
  d x     = combine(d lhs, row_index, 1) (with fused dispatch: summed per token)
  d rhs   = tgmm(lhs, grad)             (rows gathered by row_index in the kernel)
  d rows  = weight * dy[row_index],  d weight = <dy[row_index], rows>   (combine)

Targets: `triton` (GPU; also the interpret-mode path on CPU) fuses the gathers
into the kernels; `mosaic` (TPU) runs the group schedule with scalar prefetch and
gathers rows in XLA (Mosaic has no in-register row gather). Shapes are padded
to tile multiples here, so kernels see whole tiles only.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels import checks, metadata, mosaic_gmm, triton_combine, triton_gmm
from pallas_kernels.rows import read_rows
from pallas_kernels.tiling import ALIGN, DEFAULT_TILING, GmmTiling, Tiles, fit_dim, round_up
from pallas_kernels.triton_combine import CombineTiles
from pallas_kernels.varying import cotangent, vary_like

Array = jax.Array
TARGETS = ("triton", "mosaic")


def default_target() -> str:
  """`mosaic` on TPU, `triton` elsewhere (GPU, and CPU in interpret mode)."""
  return "mosaic" if jax.default_backend() == "tpu" else "triton"


@dataclasses.dataclass(frozen=True)
class KernelSettings:
  """How the kernels run.

  Attributes:
    target: `triton` or `mosaic`; None picks by the default JAX backend.
    tiling: tiles per pass; None takes the target's defaults.
    combine_tiles: tiles of the combine kernel (triton).
    interpret: run in Pallas interpret mode; None: only when the default
      backend is neither GPU nor TPU.
    num_warps, num_stages: Triton compiler parameters.
  """

  target: Optional[str] = None
  tiling: Optional[GmmTiling] = None
  combine_tiles: CombineTiles = CombineTiles()
  interpret: Optional[bool] = None
  num_warps: int = 4
  num_stages: int = 3

  def __post_init__(self):
    if self.target is not None:
      checks.one_of("target", self.target, TARGETS)
    if self.tiling is not None and not isinstance(self.tiling, GmmTiling):
      raise TypeError(f"tiling must be a GmmTiling, got {self.tiling!r}")
    checks.positive_int("num_warps", self.num_warps)
    checks.positive_int("num_stages", self.num_stages)

  def resolved(self) -> "KernelSettings":
    target = self.target or default_target()
    interpret = self.interpret
    if interpret is None:
      interpret = jax.default_backend() not in ("gpu", "tpu")
    settings = dataclasses.replace(self, target=target, interpret=interpret,
                                   tiling=self.tiling or DEFAULT_TILING[target])
    if target == "triton" and not interpret:
      settings.check_powers_of_two()
    return settings

  def check_powers_of_two(self):
    """Triton loads and dots take power-of-two shapes: every tile must be one."""
    tiles = {f"tiling.{p}.{f.name}": getattr(getattr(self.tiling, p), f.name)
             for p in ("forward", "lhs_grad", "rhs_grad") for f in dataclasses.fields(Tiles)}
    tiles.update({f"combine_tiles.{f.name}": getattr(self.combine_tiles, f.name)
                  for f in dataclasses.fields(CombineTiles)})
    for name, size in tiles.items():
      if size & (size - 1):
        raise ValueError(f"{name} must be a power of two for the triton target, got {size}")

  def compiler_params(self):
    if self.interpret or self.target != "triton":
      return None
    from jax.experimental.pallas import triton as pltr
    return pltr.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)


def _settings(settings: Optional[KernelSettings]) -> KernelSettings:
  return (settings or KernelSettings()).resolved()


def _pad_axis(a: Array, axis: int, size: int, value=0) -> Array:
  if a.shape[axis] == size:
    return a
  widths = [(0, 0)] * a.ndim
  widths[axis] = (0, size - a.shape[axis])
  return jnp.pad(a, widths, constant_values=value)


def _outside_as(index: Array, size: int) -> Array:
  """int32 index with every value outside [0, size) set to size (negative
  indices would otherwise wrap around in XLA gathers)."""
  index = index.astype(jnp.int32)
  return jnp.where((index >= 0) & (index < size), index, size)



def _vary_together(*operands):
  """Operands made to vary over the same mesh axes (inside shard_map a kernel's
  operands and outputs share one type; outside it this does nothing)."""
  present = [a for a in operands if a is not None]
  return vary_like(operands, *present)


# ----------------------------------------------------------------------------
# Undifferentiated calls: pad, schedule, run the target's kernel.


def _padded(num_rows: int, k: int, n: int, t: Tiles) -> tuple[int, int, int]:
  return round_up(num_rows, t.block_m), round_up(k, t.block_k), round_up(n, t.block_n)


def _pad_rows(lhs, row_index, rows_p: int, k_p: int):
  """lhs padded to k_p columns, and its rows (or row_index, with -1: no row) to rows_p."""
  lhs = _pad_axis(lhs, 1, k_p)
  if row_index is None:
    return _pad_axis(lhs, 0, rows_p), None
  return lhs, _pad_axis(row_index.astype(jnp.int32), 0, rows_p, -1)


def _gmm_call(lhs, rhs, group_sizes, group_offset, row_index, transpose_rhs: bool,
              tiles: Tiles, s: KernelSettings) -> Array:
  lhs, rhs, group_sizes, group_offset, row_index = _vary_together(
      lhs, rhs, group_sizes, group_offset, row_index)
  num_rows = lhs.shape[0] if row_index is None else row_index.shape[0]
  k = lhs.shape[1]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  if s.target == "mosaic" and row_index is not None:
    lhs, row_index = read_rows(lhs, row_index), None
  t = tiles.fit(num_rows, k, n, ALIGN[s.target])
  rows_p, k_p, n_p = _padded(num_rows, k, n, t)
  lhs, row_index = _pad_rows(lhs, row_index, rows_p, k_p)
  rhs = _pad_axis(_pad_axis(rhs, 1, n_p if transpose_rhs else k_p), 2,
                  k_p if transpose_rhs else n_p)
  schedule = metadata.group_tiles(group_sizes, rows_p, t.block_m, group_offset, rhs.shape[0])
  kernels = triton_gmm if s.target == "triton" else mosaic_gmm
  out = kernels.gmm(lhs, rhs, schedule, row_index, rows_p, t, transpose_rhs, lhs.dtype,
                    s.interpret, s.compiler_params())
  return out[:num_rows, :n]


def _tgmm_call(lhs, grad, group_sizes, group_offset, num_local: int, row_index,
               tiles: Tiles, out_dtype, s: KernelSettings) -> Array:
  lhs, grad, group_sizes, group_offset, row_index = _vary_together(
      lhs, grad, group_sizes, group_offset, row_index)
  num_rows, n = grad.shape
  k = lhs.shape[1]
  if s.target == "mosaic" and row_index is not None:
    lhs, row_index = read_rows(lhs, row_index), None
  t = tiles.fit(num_rows, k, n, ALIGN[s.target])
  rows_p, k_p, n_p = _padded(num_rows, k, n, t)
  lhs, row_index = _pad_rows(lhs, row_index, rows_p, k_p)
  grad = _pad_axis(_pad_axis(grad, 0, rows_p), 1, n_p)
  schedule = metadata.group_tiles(group_sizes, rows_p, t.block_m, group_offset, num_local)
  kernels = triton_gmm if s.target == "triton" else mosaic_gmm
  out = kernels.tgmm(lhs, grad, schedule, row_index, t, out_dtype, s.interpret,
                     s.compiler_params())
  return out[:, :k, :n]


def _combine_call(rows, row_index, weight, num_tokens: int, s: KernelSettings) -> Array:
  rows, row_index, weight = _vary_together(rows, row_index, weight)
  if s.target != "triton":
    y = jax.ops.segment_sum(rows.astype(jnp.float32) * weight[:, None].astype(jnp.float32),
                            row_index, num_segments=num_tokens)
    return y.astype(rows.dtype)
  num_rows, dim = rows.shape
  align = ALIGN["triton"]
  ct = s.combine_tiles
  t = CombineTiles(min(ct.block_t, fit_dim(num_tokens, align)),
                   min(ct.block_s, fit_dim(num_rows, align)),
                   min(ct.block_d, fit_dim(dim, align)))
  tokens_p, dim_p = round_up(num_tokens, t.block_t), round_up(dim, t.block_d)
  index = row_index.astype(jnp.int32)
  token = jnp.where((index >= 0) & (index < num_tokens), index, tokens_p)
  order = jnp.argsort(token, stable=True).astype(jnp.int32)
  sorted_token = token[order]
  bounds = jnp.searchsorted(sorted_token, jnp.arange(tokens_p // t.block_t + 1) * t.block_t,
                            side="left").astype(jnp.int32)
  pad = lambda a, value: _pad_axis(a, 0, num_rows + t.block_s, value)
  y = triton_combine.combine(
      _pad_axis(rows, 1, dim_p), bounds, pad(order, 0), pad(sorted_token, tokens_p),
      pad(weight.astype(jnp.float32)[order], 0.0), tokens_p, t, s.interpret,
      s.compiler_params())
  return y[:num_tokens, :dim]


# ----------------------------------------------------------------------------
# gmm with a grouped backward.


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _gmm(lhs, rhs, group_sizes, group_offset, row_index, transpose_rhs, s):
  return _gmm_call(lhs, rhs, group_sizes, group_offset, row_index, transpose_rhs,
                   s.tiling.forward, s)


def _gmm_fwd(lhs, rhs, group_sizes, group_offset, row_index, transpose_rhs, s):
  out = _gmm(lhs, rhs, group_sizes, group_offset, row_index, transpose_rhs, s)
  return out, (lhs, rhs, group_sizes, group_offset, row_index)


def _gmm_bwd(transpose_rhs, s, residuals, grad):
  lhs, rhs, group_sizes, group_offset, row_index = residuals
  grad = grad.astype(lhs.dtype)
  d_rows = _gmm_call(grad, rhs, group_sizes, group_offset, None, not transpose_rhs,
                     s.tiling.lhs_grad, s)
  if row_index is None:
    d_lhs = d_rows
  else:
    ones = jnp.ones(row_index.shape, jnp.float32)
    d_lhs = _combine_call(d_rows, row_index, ones, lhs.shape[0], s)
  num_local = rhs.shape[0]
  if transpose_rhs:   # d W^T[g] = grad_g^T rows_g
    rows = lhs if row_index is None else read_rows(lhs, row_index)
    d_rhs = _tgmm_call(grad, rows, group_sizes, group_offset, num_local, None,
                       s.tiling.rhs_grad, rhs.dtype, s)
  else:
    d_rhs = _tgmm_call(lhs, grad, group_sizes, group_offset, num_local, row_index,
                       s.tiling.rhs_grad, rhs.dtype, s)
  return cotangent(d_lhs.astype(lhs.dtype), lhs), cotangent(d_rhs, rhs), None, None, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm(lhs: Array, rhs: Array, group_sizes: Array, group_offset=0, *,
        row_index: Optional[Array] = None, transpose_rhs: bool = False,
        settings: Optional[KernelSettings] = None) -> Array:
  """Grouped matmul (module docstring); rhs [G, K, N], or [G, N, K] transposed."""
  _check_gmm(lhs, rhs, group_sizes, row_index, transpose_rhs)
  if row_index is not None:
    row_index = _outside_as(row_index, lhs.shape[0])
  return _gmm(lhs, rhs, group_sizes.astype(jnp.int32), jnp.asarray(group_offset, jnp.int32),
              row_index, transpose_rhs, _settings(settings))


def tgmm(lhs: Array, grad: Array, group_sizes: Array, group_offset=0, *,
         num_local: Optional[int] = None, row_index: Optional[Array] = None,
         settings: Optional[KernelSettings] = None) -> Array:
  """Per-group lhs^T grad: [num_local (default E), K, N] (module docstring)."""
  num_local = group_sizes.shape[0] if num_local is None else num_local
  checks.positive_int("num_local", num_local)
  rows = grad.shape[0]
  if (lhs.shape[0] if row_index is None else row_index.shape[0]) != rows:
    raise ValueError(f"lhs rows (or row_index) and grad rows differ: {lhs.shape}, "
                     f"{None if row_index is None else row_index.shape}, {grad.shape}")
  s = _settings(settings)
  if row_index is not None:
    row_index = _outside_as(row_index, lhs.shape[0])
  return _tgmm_call(lhs, grad, group_sizes.astype(jnp.int32),
                    jnp.asarray(group_offset, jnp.int32), num_local, row_index,
                    s.tiling.rhs_grad, lhs.dtype, s)


def _check_gmm(lhs, rhs, group_sizes, row_index, transpose_rhs):
  if lhs.ndim != 2 or rhs.ndim != 3 or group_sizes.ndim != 1:
    raise ValueError(f"gmm takes lhs [M, K], rhs [G, K, N], group_sizes [E]; got "
                     f"{lhs.shape}, {rhs.shape}, {group_sizes.shape}")
  k = rhs.shape[2] if transpose_rhs else rhs.shape[1]
  if lhs.shape[1] != k:
    raise ValueError(f"lhs has K = {lhs.shape[1]} but rhs {rhs.shape} "
                     f"({'transposed' if transpose_rhs else 'not transposed'}) has K = {k}")
  if rhs.shape[0] > group_sizes.shape[0]:
    raise ValueError(f"rhs has {rhs.shape[0]} groups but group_sizes only "
                     f"{group_sizes.shape[0]}")
  if row_index is not None and row_index.ndim != 1:
    raise ValueError(f"row_index must be [R], got shape {row_index.shape}")


# ----------------------------------------------------------------------------
# combine with a gather backward.


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _combine(rows, row_index, weight, num_tokens, s):
  return _combine_call(rows, row_index, weight, num_tokens, s)


def _combine_fwd(rows, row_index, weight, num_tokens, s):
  return _combine(rows, row_index, weight, num_tokens, s), (rows, row_index, weight)


def _combine_bwd(num_tokens, s, residuals, grad):
  del num_tokens, s
  rows, row_index, weight = residuals
  dy = read_rows(grad, row_index).astype(jnp.float32)                  # [R, D]
  d_rows = dy * weight.astype(jnp.float32)[:, None]
  d_weight = jnp.sum(dy * rows.astype(jnp.float32), axis=-1)
  return (cotangent(d_rows.astype(rows.dtype), rows), None,
          cotangent(d_weight.astype(weight.dtype), weight))


_combine.defvjp(_combine_fwd, _combine_bwd)


def combine(rows: Array, row_index: Array, weight: Array, num_tokens: int, *,
            settings: Optional[KernelSettings] = None) -> Array:
  """Weighted gather-sum of rows [R, D] into [num_tokens, D] (module docstring)."""
  if rows.ndim != 2 or row_index.shape != rows.shape[:1] or weight.shape != rows.shape[:1]:
    raise ValueError(f"combine takes rows [R, D], row_index [R], weight [R]; got "
                     f"{rows.shape}, {row_index.shape}, {weight.shape}")
  checks.positive_int("num_tokens", num_tokens)
  return _combine(rows, _outside_as(row_index, num_tokens), weight, num_tokens,
                  _settings(settings))

"""Causal multi-head self-attention with rotary position embeddings.

  q, k, v = x W_q, x W_k, x W_v                         [B, L, H, Dh]
  q, k    = RoPE(q, positions), RoPE(k, positions)      (Su et al. 2021, RoFormer)
  p       = softmax(q k^T / sqrt(Dh) + mask)            [B, H, L, L], float32
  y       = (p v) W_o                                   [B, L, D]

The mask is causal and, for packed rows, keeps each token inside its own segment.
On request the layer also returns p averaged over heads, [B, L, L], for routers
that read the attention of the preceding block.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def rotary(x: Array, positions: Array, base: float = 10000.0) -> Array:
  """RoPE on x [B, L, H, Dh] at integer positions [B, L]; Dh must be even."""
  half = x.shape[-1] // 2
  inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq          # [B, L, Dh/2]
  sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def attention_mask(segment_ids: Optional[Array], length: int, causal: bool = True) -> Array:
  """bool [B or 1, 1, L, L]: causal (unless `causal` is False), and within one segment
  when segments are given."""
  allowed = (jnp.tril(jnp.ones((length, length), dtype=bool)) if causal
             else jnp.ones((length, length), dtype=bool))[None, None]
  if segment_ids is None:
    return allowed
  same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
  return allowed & same


class CausalSelfAttention(nn.Module):
  """Multi-head causal self-attention. See the module docstring.

  Attributes:
    num_heads: H.
    head_dim: Dh (even).
    rope_base: RoPE wavelength base.
    dtype: activation dtype; softmax is float32.
    param_dtype: parameter dtype.
    causal: False for a bidirectional encoder (every token sees its whole segment).
  """

  num_heads: int
  head_dim: int
  rope_base: float = 10000.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  causal: bool = True

  @nn.compact
  def __call__(self, x: Array, positions: Array, segment_ids: Optional[Array] = None,
               return_probs: bool = False) -> tuple[Array, Optional[Array]]:
    """x [B, L, D] -> (y [B, L, D], head-averaged probabilities [B, L, L] or None)."""
    init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")

    def projection(name):
      return nn.DenseGeneral(
          (self.num_heads, self.head_dim), use_bias=False, dtype=self.dtype,
          param_dtype=self.param_dtype, name=name,
          kernel_init=nn.with_logical_partitioning(init, ("embed", "heads", "kv")))

    q = rotary(projection("query")(x), positions, self.rope_base)
    k = rotary(projection("key")(x), positions, self.rope_base)
    v = projection("value")(x)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = logits / jnp.sqrt(jnp.float32(self.head_dim))
    mask = attention_mask(segment_ids, x.shape[1], self.causal)
    probs = jax.nn.softmax(jnp.where(mask, logits, jnp.finfo(jnp.float32).min), axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(self.dtype), v)
    y = nn.DenseGeneral(
        x.shape[-1], axis=(-2, -1), use_bias=False, dtype=self.dtype,
        param_dtype=self.param_dtype, name="out",
        kernel_init=nn.with_logical_partitioning(init, ("heads", "kv", "embed")))(out)
    return y, (jnp.mean(probs, axis=1) if return_probs else None)

"""Causal multi-head self-attention with rotary position embeddings.

  q, k, v = x W_q, x W_k, x W_v                         [B, L, H, Dh]
  q, k    = RoPE(q, positions), RoPE(k, positions)      (Su et al. 2021, RoFormer)
  p       = softmax(q k^T / sqrt(Dh) + mask)            [B, H, L, L], float32
  y       = (p v) W_o                                   [B, L, D]

The mask is causal and, for packed rows, keeps each token inside its own segment.
On request the layer also returns p averaged over heads, [B, L, L], for routers
that read the attention of the preceding block.

Cached decoding (decode=True) keeps the keys and values of earlier calls in the
collection `cache`: cached_key, cached_value [B, L_max, H, Dh] (activation dtype)
and cache_index i (int32 scalar). Following Flax, a call that finds no cache
creates it as zeros with L_max = L, the length of x (model.init, or an apply with
mutable=['cache'] on a full-length input), and returns as without decode. Once the
cache exists, a call with n = L >= 1 new tokens (n = 1: one step; n = P: a prompt)

  K[:, i:i+n], V[:, i:i+n] = k, v                       [B, L_max, H, Dh]
  p = softmax(q K^T / sqrt(Dh) + mask), mask[a, j] = j <= i + a   [B, H, n, L_max]
  y = (p V) W_o,  i <- i + n

where `positions` must be those of the new tokens (i + arange(n)) and i + n <=
L_max (past the end, dynamic_update_slice clamps the write: not checked under jit).
The head-averaged p of a decode call is [B, n, L_max], over the cache. Segments are
not supported in decode.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

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
    causal: False for a bidirectional encoder (every token sees its whole segment);
      decode needs True.
  """

  num_heads: int
  head_dim: int
  rope_base: float = 10000.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  causal: bool = True

  @nn.compact
  def __call__(self, x: Array, positions: Array, segment_ids: Optional[Array] = None,
               return_probs: bool = False, *, decode: bool = False
               ) -> tuple[Array, Optional[Array]]:
    """x [B, L, D] -> (y [B, L, D], head-averaged probabilities [B, L, L] or None);
    with decode and a cache, the probabilities are [B, L, L_max], over the cache."""
    if decode:
      self._check_decode(segment_ids)
    init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")

    def projection(name):
      return nn.DenseGeneral(
          (self.num_heads, self.head_dim), use_bias=False, dtype=self.dtype,
          param_dtype=self.param_dtype, name=name,
          kernel_init=nn.with_logical_partitioning(init, ("embed", "heads", "kv")))

    q = rotary(projection("query")(x), positions, self.rope_base)
    k = rotary(projection("key")(x), positions, self.rope_base)
    v = projection("value")(x)
    if decode and self.has_variable("cache", "cached_key"):
      k, v, mask = self._update_cache(k, v)
    else:
      if decode:
        self._create_cache(k, v)
      mask = attention_mask(segment_ids, x.shape[1], self.causal)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = logits / jnp.sqrt(jnp.float32(self.head_dim))
    probs = jax.nn.softmax(jnp.where(mask, logits, jnp.finfo(jnp.float32).min), axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(self.dtype), v)
    y = nn.DenseGeneral(
        x.shape[-1], axis=(-2, -1), use_bias=False, dtype=self.dtype,
        param_dtype=self.param_dtype, name="out",
        kernel_init=nn.with_logical_partitioning(init, ("heads", "kv", "embed")))(out)
    return y, (jnp.mean(probs, axis=1) if return_probs else None)

  def _check_decode(self, segment_ids: Optional[Array]) -> None:
    if segment_ids is not None:
      raise ValueError("segment_ids are not supported with decode=True (cached decoding "
                       "runs one unpacked sequence per row)")
    if not self.causal:
      raise ValueError("decode=True needs a causal attention (causal is False)")

  def _create_cache(self, k: Array, v: Array) -> None:
    """The zero cache: keys and values [B, L_max, H, Dh] with L_max the length of
    k, and the index 0."""
    self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
    self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
    self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))

  def _update_cache(self, k: Array, v: Array) -> tuple[Array, Array, Array]:
    """Writes the n new keys and values k, v [B, n, H, Dh] at [i, i+n) and advances
    the index i by n -> (keys [B, L_max, H, Dh], values [B, L_max, H, Dh], mask
    bool [1, 1, n, L_max]: new token a sees cached position j <= i + a)."""
    cached_key = self.variable("cache", "cached_key")
    cached_value = self.variable("cache", "cached_value")
    index = self.variable("cache", "cache_index")
    i, n = index.value, k.shape[1]
    cached_key.value = lax.dynamic_update_slice(
        cached_key.value, k.astype(cached_key.value.dtype), (0, i, 0, 0))
    cached_value.value = lax.dynamic_update_slice(
        cached_value.value, v.astype(cached_value.value.dtype), (0, i, 0, 0))
    index.value = i + n
    length = cached_key.value.shape[1]
    mask = jnp.arange(length)[None, :] <= i + jnp.arange(n)[:, None]
    return cached_key.value, cached_value.value, mask[None, None]

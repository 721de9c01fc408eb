"""Balance losses and the aux-loss-free bias rule.

switch_loss  Switch Transformer (Fedus et al. 2021), load-balancing loss, as stated
             in "Demons in the Detail" (2025):

                 L = E * sum_e f_e P_e,
                 f_e = 1/(T K) sum_t sum_k 1[expert_tk = e]   (no gradient)
                 P_e = 1/T sum_t p_te

             Perfect balance gives exactly 1; all tokens on one expert with K = 1
             gives E. `scoped_switch_loss` takes f and P over a scope:
               sequence    per sequence, averaged over sequences (DeepSeek-V2/V3's
                           sequence-wise loss when p is the normalised score)
               microbatch  per data-parallel shard of the micro-batch, averaged:
                           what one device sees (the common implementation)
               global      f from the counts of the whole optimizer step (all
                           devices, all micro-batches); P over this micro-batch.
                           Averaged over equal micro-batches (as the train step
                           weighs them) it is the loss of the global batch, and
                           so is its gradient.
z_loss       ST-MoE (Zoph et al. 2022), router z-loss: mean_t (logsumexp_e z_te)^2.
tsallis      DynMoLE (2025): S_q(p) = (1 - sum_e p_e^q) / (q - 1), mean over tokens;
             q -> 1 is the Shannon entropy.
bias_update  Auxiliary-loss-free balancing (DeepSeek, Wang et al. 2024): after each
             optimizer step, with c_e the step's count of expert e,
               sign          b_e += u * sign(mean(c) - c_e)
               proportional  b_e += u * (mean(c) - c_e) / mean(c)
             optionally re-centred to zero mean.
Padding: every loss over tokens takes an optional token mask, bool[T] (or [B, L]),
True for real tokens (RoutingContext.token_mask): means over tokens are means over
the real ones, and padding is counted in no f. A batch gives the losses of its real
tokens alone; where a scope averages over groups (sequences, shards), groups with
no real token are left out; with no real token at all every loss is 0 (never NaN).
erc_loss     Expert-router coupling (Lv et al., "Coupling Experts and Routers in
             MoE via an Auxiliary Loss", 2025) on M [E, E], M_ij = ||act_i(proxy_j)||:
             each expert should activate most on its own proxy (rows) and each
             proxy activate its own expert most (columns). The paper's form is the
             hinge (`margin`); the default `ce` is a softmax cross-entropy toward
             the diagonal, which needs no margin to tune. Neither is invariant to
             the scale of M, so larger expert weights can lower both: watch
             diagonal_dominance, which is.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from moejax import grouping, metrics, validation

Array = jax.Array

SCOPES = ("sequence", "microbatch", "global")
BIAS_UPDATES = ("sign", "proportional")
ERC_FORMS = ("ce", "margin")


def token_mean(values: Array, token_mask: Optional[Array] = None) -> Array:
  """Mean of values [T] over the real tokens (token_mask bool[T], any shape of T
  entries; None: all tokens); 0 when no token is real. float32."""
  values = values.reshape(-1).astype(jnp.float32)
  if token_mask is None:
    return jnp.mean(values)
  real = token_mask.reshape(-1)
  total = jnp.sum(jnp.where(real, values, 0.0))
  return total / jnp.maximum(jnp.sum(real.astype(jnp.float32)), 1.0)


def _token_mean_rows(probs: Array, token_mask: Optional[Array]) -> Array:
  """P [E]: the mean of the rows of probs [T, E] over the real tokens (0 if none)."""
  probs = probs.astype(jnp.float32)
  if token_mask is None:
    return jnp.mean(probs, axis=0)
  real = token_mask.reshape(-1, 1)
  total = jnp.sum(jnp.where(real, probs, 0.0), axis=0)
  return total / jnp.maximum(jnp.sum(real.astype(jnp.float32)), 1.0)


def _counted(expert_index: Array, mask: Optional[Array],
             token_mask: Optional[Array]) -> Optional[Array]:
  """bool[T, K]: the selections that count, slot mask and token mask combined."""
  if token_mask is None:
    return mask
  per_token = expert_index.size // token_mask.size
  real = jnp.broadcast_to(token_mask.reshape(-1, 1), (token_mask.size, per_token))
  real = real.reshape(expert_index.shape)
  return real if mask is None else (mask & real)


def selection_counts(expert_index: Array, num_experts: int,
                     mask: Optional[Array] = None) -> Array:
  """float32[E]: how often each expert is selected in expert_index [..., K]
  (where mask [..., K], if given, is True)."""
  expert = expert_index.reshape(-1)
  valid = jnp.ones(expert.shape, bool) if mask is None else mask.reshape(-1)
  return grouping.expert_counts(expert, valid, num_experts).astype(jnp.float32)


def psum_counts(counts: Array, axis_names: Sequence[str] = ()) -> Array:
  """Per-expert counts summed over the named data-parallel mesh axes (one psum).

  Inside shard_map, a device's counts become the counts of the global batch;
  with no axis names (plain jit, where the batch axis is already global) the
  counts are returned unchanged. Counts stay float32: exact below 2^24 per expert.
  """
  counts = counts.astype(jnp.float32)
  return jax.lax.psum(counts, tuple(axis_names)) if axis_names else counts


def switch_loss(probs: Array, expert_index: Array, num_experts: int,
                mask: Optional[Array] = None, token_mask: Optional[Array] = None) -> Array:
  """Switch load-balancing loss over one group of tokens.

  Args:
    probs: float[T, E], router distribution.
    expert_index: int[T, K], selected experts.
    num_experts: E; probs.shape[-1] must equal it.
    mask: optional bool[T, K]; False slots are not counted in f (variable-K
      routers). f is normalised by the number of counted slots.
    token_mask: optional bool[T], the real tokens: padding counts in neither f
      nor P (P is the mean over the real tokens).

  Returns:
    float32 scalar; 0 when nothing is counted.
  """
  if probs.shape[-1] != num_experts:
    raise ValueError(f"probs has {probs.shape[-1]} experts, num_experts is {num_experts}")
  counts = selection_counts(expert_index, num_experts, _counted(expert_index, mask, token_mask))
  return _switch_from_counts(probs.reshape(-1, num_experts), counts, token_mask)


def _switch_from_counts(probs: Array, counts: Array,
                        token_mask: Optional[Array] = None) -> Array:
  """E * sum_e f_e P_e with f = counts / sum(counts) (no gradient), P = mean probs
  over the real tokens."""
  f = jax.lax.stop_gradient(counts / jnp.maximum(jnp.sum(counts), 1.0))
  return probs.shape[-1] * jnp.sum(f * _token_mean_rows(probs, token_mask))


def scoped_switch_loss(probs: Array, expert_index: Array, num_experts: int,
                       mask: Optional[Array] = None, scope: str = "microbatch",
                       groups: int = 1, global_counts: Optional[Array] = None,
                       token_mask: Optional[Array] = None) -> Array:
  """Switch loss at a scope (see the module docstring).

  Args:
    probs: float[B, L, E].
    expert_index: int[B, L, K].
    num_experts: E.
    mask: optional bool[B, L, K] of counted selections.
    scope: `sequence`, `microbatch` or `global`.
    groups: data-parallel shards of the batch (scope `microbatch`); divides B.
    global_counts: float[E], the selection counts of the whole step (scope
      `global`); without them, the counts of this call.
    token_mask: optional bool[B, L], the real tokens. Padding counts in no f
      and no P; the `sequence` and `microbatch` scopes average over the
      sequences (shards) that hold a real token.
  """
  validation.one_of("balance_scope", scope, SCOPES)
  batch = probs.shape[0]
  if mask is None:
    mask = jnp.ones(expert_index.shape, bool)
  if token_mask is None:
    token_mask = jnp.ones(expert_index.shape[:2], bool)
  mask = mask & token_mask[..., None]
  if scope == "global":
    counts = (selection_counts(expert_index, num_experts, mask) if global_counts is None
              else global_counts.astype(jnp.float32))
    return _switch_from_counts(probs.reshape(-1, num_experts), counts, token_mask)
  if scope == "microbatch":
    if batch % groups:
      raise ValueError(f"{groups} data shards do not divide the batch of {batch}")
    split = lambda a: a.reshape(groups, -1, *a.shape[2:])
    probs, expert_index, mask, token_mask = (split(probs), split(expert_index), split(mask),
                                             split(token_mask))
  per_group = jax.vmap(lambda p, i, m, r: switch_loss(p, i, num_experts, m, r))
  losses = per_group(probs, expert_index, mask, token_mask)
  holds = jnp.any(token_mask.reshape(token_mask.shape[0], -1), axis=1)
  return jnp.sum(jnp.where(holds, losses, 0.0)) / jnp.maximum(
      jnp.sum(holds.astype(jnp.float32)), 1.0)


def router_switch_loss(probs: Array, expert_index: Array, batch: int, scope: str, ctx,
                       mask: Optional[Array] = None) -> tuple[Array, Array]:
  """A router's switch loss at `scope` over its selections, and its counts.

  Args:
    probs: float[T, E], the router distribution of a call over `batch` rows.
    expert_index: int[T, K], the selections.
    batch: B, rows of the call (T = B * L).
    scope: `sequence`, `microbatch` or `global`.
    ctx: the RoutingContext: `data_shards` groups the `microbatch` scope,
      `global_counts` (float[E]) holds the step's counts for `global` (without
      them, this call's counts are the step's: one micro-batch), and
      `token_mask` says which tokens are real.
    mask: optional bool[T, K], the selections that count (variable-K routers).
      Padding (ctx.token_mask) never counts, in the loss or the counts.

  Returns:
    (switch loss, float32[E] selection counts of the real tokens of this call).
  """
  num_experts = probs.shape[-1]
  real = ctx.token_mask(probs.shape[0])
  mask = _counted(expert_index, mask, real)
  counts = selection_counts(expert_index, num_experts, mask)
  step_counts = ctx.global_counts
  rows = lambda a: a.reshape(batch, -1, *a.shape[1:])
  switch = scoped_switch_loss(
      rows(probs), rows(expert_index), num_experts, mask=rows(mask), scope=scope,
      groups=ctx.data_shards, global_counts=counts if step_counts is None else step_counts,
      token_mask=rows(real))
  return switch, counts


def z_loss(logits: Array, token_mask: Optional[Array] = None) -> Array:
  """Router z-loss, mean_t (logsumexp_e z_te)^2 over the real tokens (token_mask
  bool[T]; None: all), float32 scalar."""
  lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
  return token_mean(jnp.square(lse), token_mask)


def tsallis_entropy(probs: Array, q: float) -> Array:
  """S_q of each row of probs [..., E]; q = 1 gives the Shannon entropy (nats).

  Zero entries contribute nothing, with a finite gradient also for q < 1.
  """
  if q == 1:
    return metrics.row_entropy(probs)
  probs = probs.astype(jnp.float32)
  positive = probs > 0
  safe = jnp.where(positive, probs, 1.0)
  return (1.0 - jnp.sum(jnp.where(positive, safe ** q, 0.0), axis=-1)) / (q - 1.0)


def tsallis_loss(probs: Array, q: float, token_mask: Optional[Array] = None) -> Array:
  """Mean Tsallis entropy of the router distribution over the real tokens
  (token_mask bool[T]; None: all): low when routing is confident."""
  return token_mean(tsallis_entropy(probs, q), token_mask)


def bias_update(bias: Array, counts: Array, rate: float, mode: str = "sign",
                recenter: bool = False) -> Array:
  """One aux-loss-free update of the selection bias b [E] from step counts c [E]."""
  validation.one_of("bias_update", mode, BIAS_UPDATES)
  counts = counts.astype(jnp.float32)
  mean = jnp.mean(counts)
  if mode == "sign":
    step = jnp.sign(mean - counts)
  else:
    step = (mean - counts) / jnp.maximum(mean, 1e-9)
  bias = bias + rate * step
  if recenter:
    bias = bias - jnp.mean(bias)
  return bias


def erc_loss(norms: Array, form: str = "ce", margin: float = 0.5) -> Array:
  """Expert-router coupling loss on M [E, E] (rows: experts, columns: proxies).

  `ce`: cross-entropy of each row and each column of M (as logits) with the
  diagonal as the target, averaged. `margin`: mean of relu(M_ij - margin * M_ii)
  and relu(M_ji - margin * M_ii) over j != i, i.e. off-diagonal activations held
  below `margin` times the expert's activation on its own proxy.
  """
  validation.one_of("erc_form", form, ERC_FORMS)
  norms = norms.astype(jnp.float32)
  num = norms.shape[0]
  eye = jnp.eye(num, dtype=bool)
  if form == "ce":
    target = jnp.arange(num)
    rows = -jnp.take_along_axis(jax.nn.log_softmax(norms, axis=1), target[:, None], 1)
    cols = -jnp.take_along_axis(jax.nn.log_softmax(norms, axis=0), target[None, :], 0)
    return 0.5 * (jnp.mean(rows) + jnp.mean(cols))
  diag = jnp.diag(norms)
  over_rows = jax.nn.relu(norms - margin * diag[:, None])
  over_cols = jax.nn.relu(norms - margin * diag[None, :])
  off = (~eye).astype(jnp.float32)
  return jnp.sum((over_rows + over_cols) * off) / jnp.maximum(2.0 * jnp.sum(off), 1.0)


def diagonal_dominance(norms: Array) -> dict[str, Array]:
  """Specialisation of M [E, E] (rows: experts, columns: proxies).

  `erc_diagonal_share`: the share of the 2E constraints of the ERC loss that
  hold, i.e. rows and columns of M whose diagonal entry is strictly the largest
  (1: every expert prefers its own proxy and every proxy its own expert).
  `erc_diagonal_ratio`: mean of the diagonal over mean of the off-diagonal
  entries (1: no preference for the own proxy).
  """
  num = norms.shape[0]
  eye = jnp.eye(num, dtype=bool)
  diag = jnp.diag(norms)
  off_rows = jnp.max(jnp.where(eye, -jnp.inf, norms), axis=1)
  off_cols = jnp.max(jnp.where(eye, -jnp.inf, norms), axis=0)
  holds = jnp.concatenate([diag > off_rows, diag > off_cols]).astype(jnp.float32)
  off_mean = jnp.sum(jnp.where(eye, 0.0, norms)) / max(num * (num - 1), 1)
  return {"erc_diagonal_share": jnp.mean(holds),
          "erc_diagonal_ratio": jnp.mean(diag) / jnp.maximum(off_mean, 1e-9)}

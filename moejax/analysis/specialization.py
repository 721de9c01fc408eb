"""Expert specialisation: how much routing tells about a token label.

  joint_counts        C [N, E]: valid assignments of tokens with label n to expert e
  mutual_information  I(label; expert) = sum_ne p_ne log(p_ne / (p_n p_e)) in nats,
                      from C with p = C / sum(C)

With the domain as the label this is the expert-domain mutual information of
"Demons in the Detail" (2025); with the token id, OpenMoE's (2024) finding that
routing is mostly by token id. Plug-in estimate: biased upwards when C is sparse,
so compare values measured on the same data.

On a RoutingTrace (numpy, over the router's selected assignments of one layer,
each (token, k) assignment counted once):

  token_expert_mutual_information   I(token id; expert)
  domain_expert_mutual_information  I(domain; expert) over tokens with a domain
  majority_expert_share             OpenMoE's context-independent specialisation
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from moejax.analysis.consistency import check_layer, check_positive_int
from moejax.analysis.trace import RoutingTrace
from moejax.core import RoutingPlan

Array = jax.Array


def joint_counts(plan: RoutingPlan, labels: Array, num_labels: int, num_experts: int,
                 token_mask: Optional[Array] = None) -> Array:
  """float32[N, E] counts of valid assignments by (label of the token, expert).

  Args:
    plan: the executed plan over T tokens.
    labels: int[T] (or [B, L]) label of each token, in [0, num_labels).
    num_labels: N.
    num_experts: E.
    token_mask: optional bool[T] (or [B, L]); tokens to leave out (padding).
  """
  labels = labels.reshape(-1)
  keep = plan.valid
  if token_mask is not None:
    keep = keep & token_mask.reshape(-1)[plan.token]
  return jnp.zeros((num_labels, num_experts), jnp.float32).at[
      labels[plan.token], plan.expert].add(keep.astype(jnp.float32))


def mutual_information(joint: Array) -> Array:
  """I(label; expert) in nats from joint counts [N, E]; 0 for an empty table."""
  joint = joint.astype(jnp.float32)
  total = jnp.maximum(jnp.sum(joint), 1e-9)
  p = joint / total
  p_label = jnp.sum(p, axis=1, keepdims=True)
  p_expert = jnp.sum(p, axis=0, keepdims=True)
  ratio = jnp.where(p > 0, p / jnp.maximum(p_label * p_expert, 1e-30), 1.0)
  return jnp.sum(jnp.where(p > 0, p * jnp.log(ratio), 0.0))


def _plug_in_mi(joint: np.ndarray) -> float:
  """I(label; expert) in nats from counts float[N, E]; 0 for an empty table."""
  joint = np.asarray(joint, np.float64)
  total = joint.sum()
  if total <= 0:
    return 0.0
  p = joint / total
  outer = p.sum(axis=1, keepdims=True) * p.sum(axis=0, keepdims=True)
  nz = p > 0
  return float(max(np.sum(p[nz] * np.log(p[nz] / outer[nz])), 0.0))


def _assignment_counts(trace: RoutingTrace, layer: int, labels: np.ndarray,
                       tokens: Optional[np.ndarray] = None) -> np.ndarray:
  """int64[N, E]: selected assignments at `layer` by (label of the token, expert).

  labels: int[T] in [0, N); tokens: optional bool[T], the tokens to count.
  """
  experts = trace.experts[layer]
  t, k = np.nonzero(experts >= 0)
  if tokens is not None:
    keep = tokens[t]
    t, k = t[keep], k[keep]
  num_labels = int(labels.max(initial=-1)) + 1
  flat = labels[t].astype(np.int64) * trace.num_experts + experts[t, k]
  return np.bincount(flat, minlength=num_labels * trace.num_experts).reshape(
      num_labels, trace.num_experts)


def token_expert_mutual_information(trace: RoutingTrace, layer: int) -> float:
  """I(token id; expert) in nats at `layer`, plug-in, over selected assignments.

  OpenMoE ("OpenMoE: An Early Effort on Open Mixture-of-Experts Language Models",
  2024) finds routing mostly decided by the token id. Plug-in estimate with
  p(v, e) = C[v, e] / sum C, C[v, e] the (token, k) assignments of tokens with id v
  to expert e; 0 <= I <= min(H(id), H(expert)) of that table.
  """
  layer = check_layer(trace, layer)
  _, ids = np.unique(trace.token_ids, return_inverse=True)
  return _plug_in_mi(_assignment_counts(trace, layer, ids.reshape(-1)))


def domain_expert_mutual_information(trace: RoutingTrace, layer: int) -> float:
  """I(domain; expert) in nats at `layer` over the tokens with a domain (>= 0).

  The expert-domain mutual information of "Demons in the Detail: On Implementing
  Load Balancing Loss for Training Specialized Mixture-of-Expert Models" (2025),
  plug-in over the selected (token, k) assignments. ValueError if the trace has
  no domain labels.
  """
  layer = check_layer(trace, layer)
  if not trace.has_domains:
    raise ValueError("trace has no domain labels (every domain is -1): domain mutual "
                     "information needs a dataset with domains")
  labelled = trace.domains >= 0
  labels = np.where(labelled, trace.domains, 0)
  return _plug_in_mi(_assignment_counts(trace, layer, labels, labelled))


class MajorityShare(NamedTuple):
  """Share of assignments to their token id's K most frequent experts, the same
  share for the K most frequent experts overall (label-free baseline), and K."""
  share: float
  baseline: float
  k: int


def majority_expert_share(trace: RoutingTrace, layer: int, k: Optional[int] = None,
                          min_occurrences: int = 1) -> MajorityShare:
  """OpenMoE's (2024) context-independent specialisation, for top-K routing.

  With C[v, e] the selected (token, k) assignments of tokens with id v to expert e:

    share    = sum_v (sum of the K largest C[v, e] over e) / sum_ve C[v, e]
               assignments that go to one of the K most frequent experts of their
               token id (for K = 1: to the id's majority expert);
    baseline = (sum of the K largest sum_v C[v, e]) / sum_ve C[v, e]
               the same with one expert set for every id (the K most used experts
               overall): what the share would be if the expert did not depend on
               the token id and each id used the globally popular experts.

  share >= baseline always; share near 1 means routing is fixed by the token id.
  An id seen once scores 1 by construction (its K assignments fill K experts), so
  `min_occurrences` leaves out ids occurring fewer times (as tokens) from both.

  Args:
    k: K; default the trace's width (top_k for tokens-choose routers).
    min_occurrences: count only token ids with at least this many tokens.
  """
  layer = check_layer(trace, layer)
  k = check_positive_int("k", trace.experts.shape[2] if k is None else k, trace.num_experts)
  min_occurrences = check_positive_int("min_occurrences", min_occurrences)
  _, ids, occurrences = np.unique(trace.token_ids, return_inverse=True, return_counts=True)
  ids = ids.reshape(-1)
  counts = _assignment_counts(trace, layer, ids)[occurrences >= min_occurrences]
  total = counts.sum()
  if total == 0:
    raise ValueError(f"layer {layer} has no selected assignment of a token id occurring "
                     f">= {min_occurrences} times")
  top_per_id = np.sort(counts, axis=1)[:, ::-1][:, :k].sum()
  top_overall = np.sort(counts.sum(axis=0))[::-1][:k].sum()
  return MajorityShare(float(top_per_id / total), float(top_overall / total), k)


def expert_specialisation(trace: RoutingTrace, layer: int, by: str = "token") -> np.ndarray:
  """float[E]: how far each expert's label distribution is from the overall one,
  KL(P(label | e) || P(label)) in nats, over selected assignments; NaN for an
  expert never selected.

  With `by` = "token" the label is the token id (vocabulary specialisation), with
  "domain" the domain (tokens without one left out). Their mean weighted by
  P(e) is I(label; expert). "Not All Models Suit Expert Offloading" (2025)
  relates such per-expert specialisation to each expert's local routing
  consistency (consistency.segment_routing_best_performance_per_expert): it finds
  domain-specialised experts more consistent than vocabulary-specialised ones.
  """
  layer = check_layer(trace, layer)
  if by == "token":
    _, labels = np.unique(trace.token_ids, return_inverse=True)
    counts = _assignment_counts(trace, layer, labels.reshape(-1))
  elif by == "domain":
    if not trace.has_domains:
      raise ValueError("by='domain': the trace has no domain labels (every domain is -1)")
    labelled = trace.domains >= 0
    counts = _assignment_counts(trace, layer, np.where(labelled, trace.domains, 0), labelled)
  else:
    raise ValueError(f"by must be 'token' or 'domain', got {by!r}")
  counts = counts.astype(np.float64)
  overall = counts.sum(axis=1) / max(counts.sum(), 1.0)          # P(label) [N]
  per_expert = counts.sum(axis=0)                                 # [E]
  out = np.full(trace.num_experts, np.nan)
  for e in np.flatnonzero(per_expert > 0):
    p = counts[:, e] / per_expert[e]
    nz = p > 0
    out[e] = float(np.sum(p[nz] * np.log(p[nz] / overall[nz])))
  return out

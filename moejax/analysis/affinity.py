"""Inter-layer expert affinity and co-activation.

ExFlow ("Exploiting Inter-Layer Expert Affinity for Accelerating
Mixture-of-Experts Model Inference", 2024): the expert a token uses at layer l
predicts the one it uses at layer l + 1. From each token's selected experts
(before capacity), with A_l bool[T, E] the one-hot sets of layer l:

  N[e, e']        = sum_t A_l[t, e] A_{l+1}[t, e']   (each pair once per token)
  P(e' | e)       = N[e, e'] / sum_e'' N[e, e'']     (rows of unused experts: 0)
  H(E_{l+1} | E_l) = H(E_l, E_{l+1}) - H(E_l),  from p = N / sum N, in nats
  H(E_{l+1})       the entropy of the marginal of p over e': the independent
                   baseline; their difference is I(E_l; E_{l+1}) >= 0.

Co-activation within one layer: share of tokens selecting both i and j,
A_l^T A_l / T (its diagonal: share of tokens selecting i).
Shapes: T tokens, E experts, Y layers.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from moejax.analysis.consistency import check_layer, selected_one_hot
from moejax.analysis.trace import RoutingTrace


def _pair_counts(trace: RoutingTrace, layer: int) -> np.ndarray:
  """float64[E, E] N: tokens selecting e at `layer` and e' at `layer + 1`."""
  if trace.num_layers < 2:
    raise ValueError(f"inter-layer affinity needs a trace of 2 or more layers, got "
                     f"{trace.num_layers}")
  layer = check_layer(trace, layer, last=trace.num_layers - 1)
  here = selected_one_hot(trace, layer).astype(np.float64)
  there = selected_one_hot(trace, layer + 1).astype(np.float64)
  return here.T @ there


def layer_affinity(trace: RoutingTrace, layer: int) -> np.ndarray:
  """float64[E, E] P(expert e' at layer+1 | expert e at layer); each row sums to 1,
  or is 0 for an expert no token selected at `layer` (layer in [0, Y-1))."""
  counts = _pair_counts(trace, layer)
  rows = counts.sum(axis=1, keepdims=True)
  return counts / np.where(rows > 0, rows, 1.0)


def _entropy(p: np.ndarray) -> float:
  p = p[p > 0]
  return float(-np.sum(p * np.log(p)))


class AffinityEntropy(NamedTuple):
  """H(E_{l+1} | E_l), the baseline H(E_{l+1}), conditional / baseline (NaN when the
  baseline is 0) and baseline - conditional = I(E_l; E_{l+1}), all in nats."""
  conditional: float
  baseline: float
  ratio: float
  information: float


def conditional_entropy(trace: RoutingTrace, layer: int) -> AffinityEntropy:
  """How much the experts of `layer` tell about those of `layer + 1` (see module).

  A ratio well below 1 is ExFlow's strong affinity; 1 means independence. All NaN
  if no token selected experts at both layers.
  """
  counts = _pair_counts(trace, layer)
  total = counts.sum()
  if total == 0:
    nan = float("nan")
    return AffinityEntropy(nan, nan, nan, nan)
  p = counts / total
  conditional = max(_entropy(p.ravel()) - _entropy(p.sum(axis=1)), 0.0)
  baseline = _entropy(p.sum(axis=0))
  ratio = conditional / baseline if baseline > 0 else float("nan")
  return AffinityEntropy(conditional, baseline, ratio, max(baseline - conditional, 0.0))


def coactivation(trace: RoutingTrace, layer: int) -> np.ndarray:
  """float64[E, E]: share of the T tokens that selected both i and j at `layer`;
  the diagonal is the share selecting i. NaN for a trace without tokens."""
  layer = check_layer(trace, layer)
  hot = selected_one_hot(trace, layer).astype(np.float64)
  if trace.num_tokens == 0:
    return np.full((trace.num_experts,) * 2, np.nan)
  return hot.T @ hot / trace.num_tokens


def shuffled_information(trace: RoutingTrace, layer: int, repeats: int = 5,
                         seed: int = 0) -> float:
  """I(E_l; E_{l+1}) with layer l + 1's routing permuted over tokens: the plug-in
  estimate's value under independence (its bias at this T and E), the mean over
  `repeats` permutations. conditional_entropy(...).information well above it is
  affinity beyond chance."""
  layer = check_layer(trace, layer, trace.num_layers - 1)
  rng = np.random.default_rng(seed)
  values = []
  for _ in range(repeats):
    experts = trace.experts.copy()
    experts[layer + 1] = experts[layer + 1][rng.permutation(trace.num_tokens)]
    shuffled = dataclasses.replace(trace, experts=experts)
    values.append(conditional_entropy(shuffled, layer).information)
  return float(np.mean(values))

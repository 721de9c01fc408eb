"""Expert load on a trace, and balance over training checkpoints.

With c_e the kept (executed) assignments of expert e at one layer:

  MaxVio = (max_e c_e - mean_e c_e) / mean_e c_e     ("Auxiliary-Loss-Free Load
           Balancing Strategy for Mixture-of-Experts", 2024)
  CV     = std_e c_e / mean_e c_e                    (population std)

Both NaN for a layer with no kept assignment. "Three Phases of Expert Routing"
(2025) follows them, with router entropy, over checkpoints: a surge (the router
learns to balance), stabilisation, then relaxation (balance traded for quality).
Router entropy needs the full distribution, which a trace does not hold, so
`balance_over_checkpoints` gives MaxVio and CV per step and layer.
Shapes: Y layers, E experts, N checkpoints, Q sequences.

Note: `moejax.analysis.balance` the attribute is the trace file reader
(`moejax.analysis.trace.load`), exported by the package; import this module's
functions by name (`from moejax.analysis.balance import max_violation`).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from moejax.analysis.consistency import Interval, Seed, bootstrap_interval, check_layer
from moejax.analysis.trace import RoutingTrace, same_tokens


def expert_load(trace: RoutingTrace, layer: int) -> np.ndarray:
  """int64[E]: kept (executed) assignments of each expert at `layer`."""
  layer = check_layer(trace, layer)
  experts = trace.experts[layer]
  kept = trace.kept[layer] & (experts >= 0)
  return np.bincount(experts[kept], minlength=trace.num_experts).astype(np.int64)


def _max_violation(counts: np.ndarray) -> np.ndarray:
  """MaxVio over the last axis (E) of counts; NaN where the mean is 0."""
  counts = np.asarray(counts, np.float64)
  mean = counts.mean(axis=-1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(mean > 0, (counts.max(axis=-1) - mean) / mean, np.nan)


def _cv(counts: np.ndarray) -> np.ndarray:
  counts = np.asarray(counts, np.float64)
  mean = counts.mean(axis=-1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(mean > 0, counts.std(axis=-1) / mean, np.nan)


def max_violation(trace: RoutingTrace, layer: int) -> float:
  """(max_e c_e - mean c) / mean c of the kept load at `layer`; 0 when balanced."""
  return float(_max_violation(expert_load(trace, layer)))


def load_cv(trace: RoutingTrace, layer: int) -> float:
  """Coefficient of variation std_e c_e / mean c (population std) at `layer`."""
  return float(_cv(expert_load(trace, layer)))


def max_violation_interval(trace: RoutingTrace, layer: int, num_resamples: int = 1000,
                           level: float = 0.95, seed: Seed = 0) -> Interval:
  """MaxVio at `layer` and its percentile bootstrap interval over sequences (the
  load of the drawn sequences summed per expert, then MaxVio).

  MaxVio is a maximum, so sampling noise in the counts raises it: near balance
  the resampled values, and the plug-in value itself, sit above the true
  imbalance (uniform random top-2 routing of 16k tokens in 64 sequences, E = 64:
  value 0.08, interval [0.10, 0.21]). Read the interval as spread, and compare
  MaxVio only between traces of the same number of tokens.
  """
  layer = check_layer(trace, layer)
  seqs = trace.sequences()
  seq_of_token = np.empty(trace.num_tokens, np.int64)
  seq_of_token[np.concatenate(seqs).astype(np.int64)] = np.repeat(
      np.arange(len(seqs)), [len(q) for q in seqs])
  experts = trace.experts[layer]
  t, k = np.nonzero(trace.kept[layer] & (experts >= 0))
  parts = np.bincount(seq_of_token[t] * trace.num_experts + experts[t, k],
                      minlength=len(seqs) * trace.num_experts).reshape(len(seqs), -1)
  return bootstrap_interval(parts, _max_violation, num_resamples, level, seed)


class BalanceHistory(NamedTuple):
  """Per checkpoint (sorted by step): steps int[N], MaxVio, CV and the mean
  router entropy (nats; NaN where the traces did not record it) float[N, Y]."""
  steps: np.ndarray
  max_violation: np.ndarray
  load_cv: np.ndarray
  router_entropy: np.ndarray


def balance_over_checkpoints(traces: Sequence[RoutingTrace]) -> BalanceHistory:
  """MaxVio, CV and router entropy of every layer at every checkpoint, ordered by
  meta["step"].

  ValueError if a trace has no int meta["step"], two share a step, or they
  traced different tokens or models (`trace.same_tokens`).
  """
  traces = list(traces)
  if not traces:
    raise ValueError("traces must hold at least one trace")
  steps = []
  for i, trace in enumerate(traces):
    step = trace.meta.get("step")
    if not isinstance(step, (int, np.integer)) or isinstance(step, bool):
      raise ValueError(f"traces[{i}] has no int meta['step'], got {step!r}")
    same_tokens(traces[0], trace, f"traces[0] and traces[{i}]")
    steps.append(int(step))
  if len(set(steps)) != len(steps):
    raise ValueError(f"traces must come from distinct steps, got {sorted(steps)}")
  order = np.argsort(steps)
  loads = np.array([[expert_load(traces[i], y) for y in range(traces[i].num_layers)]
                    for i in order], np.int64).reshape(len(traces), traces[0].num_layers, -1)
  entropy = np.array([_nanmean_rows(traces[i].router_entropy) for i in order], np.float64)
  return BalanceHistory(np.array(steps, np.int64)[order], _max_violation(loads), _cv(loads),
                        entropy.reshape(len(traces), traces[0].num_layers))


def _nanmean_rows(values: np.ndarray) -> np.ndarray:
  """Mean of each row over its finite entries; NaN for a row without any."""
  finite = np.isfinite(values)
  counts = finite.sum(axis=1)
  sums = np.where(finite, values, 0.0).sum(axis=1)
  return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)

"""Local routing consistency: how well a small expert cache serves a run of tokens.

"Not All Models Suit Expert Offloading: On Local Routing Consistency of
Mixture-of-Expert Models" (2025; public code ljcleo/moe-lrc). The windows of a
layer are all runs of s consecutive tokens inside one sequence (stride 1), and

  n_we = number of tokens of window w that selected expert e     (0..s)

counts the router's choices before capacity (`trace.selected`, not `kept`).

  SCH(s, m) = mean_w  (sum of the m largest n_we) / (sum_e n_we)
              the hit rate of the best fixed cache of m experts for the window
              (not an LRU). The paper divides by K*s; sum_e n_we is K*s for
              fixed-K routers and the actual count for variable-K ones.
  SRP(s)    = max over theta in 1..s of F1(theta) = 2 M / (s P + N), where
              P = #{(w, e): n_we >= theta}   ("e serves the whole window"),
              M = sum of n_we over those pairs, N = sum of all n_we.

Axis letters: T tokens, E experts, W windows, S = s, M cache sizes, Q sequences,
B bootstrap resamples.

Also here, shared by the other measures of `moejax.analysis`: `check_layer`,
`selected_one_hot` and `bootstrap_interval` (a percentile bootstrap over
sequences).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence, Union

import numpy as np

from moejax.analysis.trace import RoutingTrace

Seed = Union[int, np.random.Generator]


class Interval(NamedTuple):
  """A measure on the whole trace and its bootstrap interval over sequences."""
  value: float
  low: float
  high: float


class BestPerformance(NamedTuple):
  """SRP (float, or float[E] per expert) and the threshold theta that attains it
  (int, or int[E]; -1 where no window selected the expert)."""
  value: Union[float, np.ndarray]
  theta: Union[int, np.ndarray]


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_layer(trace: RoutingTrace, layer, last: Optional[int] = None) -> int:
  """`layer` as an int; ValueError unless it indexes one of the trace's Y layers
  (or layers [0, last) where given)."""
  end = trace.num_layers if last is None else last
  if not _is_int(layer) or not 0 <= layer < end:
    raise ValueError(f"layer must be an int in [0, {end}), got {layer!r}")
  return int(layer)


def check_positive_int(name: str, value, high: Optional[int] = None) -> int:
  """`value` as an int; ValueError naming `name` unless 1 <= value (<= high)."""
  if not _is_int(value) or value < 1 or (high is not None and value > high):
    bound = "" if high is None else f" and <= {high}"
    raise ValueError(f"{name} must be an int >= 1{bound}, got {value!r}")
  return int(value)


def selected_one_hot(trace: RoutingTrace, layer: int) -> np.ndarray:
  """bool[T, E]: token t selected expert e at `layer` (before capacity)."""
  experts = trace.experts[layer]
  t, k = np.nonzero(experts >= 0)
  out = np.zeros((trace.num_tokens, trace.num_experts), bool)
  out[t, experts[t, k]] = True
  return out


def bootstrap_interval(parts: np.ndarray, statistic: Callable[[np.ndarray], np.ndarray],
                       num_resamples: int = 1000, level: float = 0.95,
                       seed: Seed = 0) -> Interval:
  """Percentile bootstrap over sequences of a statistic of summed parts.

  Args:
    parts: float[Q, ...], additive parts of each sequence (for a mean over
      windows: the sum over the sequence's windows and their number).
    statistic: maps summed parts float[B, ...] to the measure float[B].
    num_resamples: B resamples of the Q sequences, drawn with replacement.
    level: coverage of the interval (0.95: the 2.5% and 97.5% percentiles).
    seed: an int or a numpy Generator.

  Returns:
    Interval(value on all sequences, low, high); resamples where the statistic is
    NaN (no data drawn) are left out of the percentiles.
  """
  parts = np.asarray(parts, np.float64)
  if parts.ndim < 1 or parts.shape[0] < 1:
    raise ValueError(f"parts must hold at least one sequence, got shape {parts.shape}")
  check_positive_int("num_resamples", num_resamples)
  if not isinstance(level, float) or not 0.0 < level < 1.0:
    raise ValueError(f"level must be a float in (0, 1), got {level!r}")
  num = parts.shape[0]
  rng = np.random.default_rng(seed)
  draws = rng.multinomial(num, np.full(num, 1.0 / num), size=num_resamples)   # [B, Q]
  sums = (draws @ parts.reshape(num, -1)).reshape((num_resamples,) + parts.shape[1:])
  stats = np.asarray(statistic(sums), np.float64).reshape(num_resamples)
  value = float(np.asarray(statistic(parts.sum(axis=0)[None]), np.float64).reshape(()))
  if np.all(np.isnan(stats)):
    return Interval(value, float("nan"), float("nan"))
  low, high = np.nanquantile(stats, [(1.0 - level) / 2, (1.0 + level) / 2])
  return Interval(value, float(low), float(high))


def window_counts(trace: RoutingTrace, layer: int, s: int
                  ) -> tuple[np.ndarray, np.ndarray, int]:
  """n_we of every window of s tokens: (int32[W, E], int[W] the sequence of each
  window, numbered as `trace.sequences()`, and Q). Windows come in sequence order.

  Cumulative sums over each sequence's tokens: n_we = c[start + s] - c[start].
  ValueError if no sequence has s tokens.
  """
  layer = check_layer(trace, layer)
  s = check_positive_int("s", s)
  hot = selected_one_hot(trace, layer)
  seqs = trace.sequences()
  lengths = np.array([len(q) for q in seqs], np.int64)
  order = np.concatenate(seqs).astype(np.int64)
  cum = np.zeros((order.size + 1, trace.num_experts), np.int32)
  np.cumsum(hot[order], axis=0, dtype=np.int32, out=cum[1:])
  per_seq = np.maximum(lengths - s + 1, 0)
  if per_seq.sum() == 0:
    raise ValueError(f"s={s} is longer than every sequence of the trace (longest "
                     f"{int(lengths.max(initial=0))} tokens)")
  seq_of_window = np.repeat(np.arange(len(seqs)), per_seq)
  first_window = np.cumsum(per_seq) - per_seq
  seq_start = np.cumsum(lengths) - lengths
  start = seq_start[seq_of_window] + np.arange(seq_of_window.size) - first_window[seq_of_window]
  return cum[start + s] - cum[start], seq_of_window, len(seqs)


def _check_ms(trace: RoutingTrace, ms) -> np.ndarray:
  ms_arr = np.asarray(ms)
  if ms_arr.ndim != 1 or ms_arr.size == 0 or not np.issubdtype(ms_arr.dtype, np.integer):
    raise ValueError(f"ms must be a non-empty 1-d sequence of ints, got {ms!r}")
  for m in ms_arr:
    check_positive_int("m", int(m), trace.num_experts)
  return ms_arr.astype(np.int64)


def _window_hits(trace: RoutingTrace, layer: int, s: int, ms: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, int]:
  """(float[W', M] hit rate of each window for each m, int[W'] its sequence, Q),
  over the W' windows where some token selected an expert."""
  counts, seq, num_seqs = window_counts(trace, layer, s)
  total = counts.sum(axis=1)
  keep = total > 0
  if not keep.any():
    raise ValueError(f"no window of s={s} tokens at layer {layer} selected any expert")
  counts, seq, total = counts[keep], seq[keep], total[keep]
  top = np.cumsum(-np.sort(-counts, axis=1), axis=1)                     # [W', E]
  return top[:, ms - 1] / total[:, None], seq, num_seqs


def segment_cache_hit_rate(trace: RoutingTrace, layer: int, s: int, m: int) -> float:
  """SCH(s, m): mean over windows of s tokens of the share of their selected
  assignments that the best fixed cache of m experts would serve (see module).

  Windows in which no token selected an expert are left out. ValueError for s < 1,
  m outside [1, E], a layer out of range, or s longer than every sequence.
  """
  return float(sch_curve(trace, layer, s, [m])[0])


def sch_curve(trace: RoutingTrace, layer: int, s: int, ms: Sequence[int]) -> np.ndarray:
  """float64[M]: SCH(s, m) for each m of `ms` (each in [1, E]); non-decreasing in
  m, and 1 at m = E."""
  ms_arr = _check_ms(trace, ms)
  hits, _, _ = _window_hits(trace, layer, s, ms_arr)
  return hits.mean(axis=0)


def sch_knee(ms: Sequence[int], values: Sequence[float], fraction: float = 0.9
             ) -> Optional[int]:
  """The cache size at which SCH(s, m) stops paying: the smallest m of `ms` with

      SCH(m) >= SCH(m_0) + fraction * (1 - SCH(m_0)),   m_0 = ms[0],

  i.e. the cache that closes `fraction` of the gap between the smallest cache
  measured and a perfect hit rate. None if no m of `ms` reaches it.

  Why this and not Kneedle (largest distance to the chord): SCH reaches 1 at
  m = E for every router, so the gap to 1 is a fixed, comparable scale across E,
  K and layers; Kneedle's point moves with the range of m sampled and is
  unstable on the step-like curves of small E. The paper's reading ("about 2x
  the active experts suffice") is a knee of this kind; `fraction` makes the
  threshold explicit.

  Args:
    ms: int[M] cache sizes, strictly increasing.
    values: float[M] SCH at those sizes (`sch_curve`).
    fraction: in (0, 1].
  """
  ms_arr, vals = np.asarray(ms), np.asarray(values, np.float64)
  if ms_arr.ndim != 1 or ms_arr.size == 0 or np.any(np.diff(ms_arr) <= 0):
    raise ValueError(f"ms must be a non-empty, strictly increasing 1-d sequence, got {ms!r}")
  if vals.shape != ms_arr.shape:
    raise ValueError(f"values must have the shape of ms {ms_arr.shape}, got {vals.shape}")
  if not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
    raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
  target = vals[0] + fraction * (1.0 - vals[0])
  reached = np.flatnonzero(vals >= target - 1e-12)
  return int(ms_arr[reached[0]]) if reached.size else None


def _f1_by_theta(hist: np.ndarray, s: int) -> np.ndarray:
  """float[..., S]: F1(theta) for theta = 1..s from hist[..., n] = #{(w, e): n_we = n}
  (n = 0..s); NaN where no assignment was selected."""
  hist = np.asarray(hist, np.float64)
  mass = hist * np.arange(s + 1)
  predicted = np.cumsum(hist[..., ::-1], axis=-1)[..., ::-1][..., 1:]   # P(theta)
  matches = np.cumsum(mass[..., ::-1], axis=-1)[..., ::-1][..., 1:]    # M(theta)
  actual = mass.sum(axis=-1, keepdims=True)                             # N
  denom = s * predicted + actual
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(denom > 0, 2.0 * matches / np.where(denom > 0, denom, 1.0), np.nan)


def _best(f1: np.ndarray) -> BestPerformance:
  """Max over the last axis (theta = 1..s) and the smallest theta attaining it."""
  empty = np.all(np.isnan(f1), axis=-1)
  filled = np.where(np.isnan(f1), -1.0, f1)
  theta = np.where(empty, -1, np.argmax(filled, axis=-1) + 1)
  value = np.where(empty, np.nan, filled.max(axis=-1))
  if value.ndim == 0:
    return BestPerformance(float(value), int(theta))
  return BestPerformance(value, theta.astype(np.int64))


def _histograms(trace: RoutingTrace, layer: int, s: int) -> tuple[np.ndarray, np.ndarray]:
  """(int[Q, S+1] per sequence, int[E, S+1] per expert) histograms of n_we."""
  counts, seq, num_seqs = window_counts(trace, layer, s)
  width = s + 1
  per_seq = np.bincount((seq[:, None] * width + counts).ravel(),
                        minlength=num_seqs * width).reshape(num_seqs, width)
  experts = np.arange(trace.num_experts)[None, :]
  per_expert = np.bincount((experts * width + counts).ravel(),
                           minlength=trace.num_experts * width).reshape(-1, width)
  return per_seq, per_expert


def segment_routing_best_performance(trace: RoutingTrace, layer: int, s: int
                                     ) -> BestPerformance:
  """SRP(s), pooled over the layer's experts, and its theta (see module).

  Ties between thresholds go to the smallest theta. Value NaN and theta -1 if no
  window selected any expert.
  """
  per_seq, _ = _histograms(trace, layer, s)
  return _best(_f1_by_theta(per_seq.sum(axis=0), s))


def segment_routing_best_performance_per_expert(trace: RoutingTrace, layer: int, s: int
                                                ) -> BestPerformance:
  """SRP(s) of each expert on its own: float[E] and its theta int[E], F1 pooled
  over windows for each expert; NaN and -1 for experts no window selected."""
  _, per_expert = _histograms(trace, layer, s)
  return _best(_f1_by_theta(per_expert, s))


def sch_interval(trace: RoutingTrace, layer: int, s: int, m: int, num_resamples: int = 1000,
                 level: float = 0.95, seed: Seed = 0) -> Interval:
  """SCH(s, m) and its percentile bootstrap interval over sequences.

  The resampled statistic is the mean over all windows of the drawn sequences
  (sum of hit rates / number of windows); sequences without a window of s tokens
  carry no information and are not drawn.
  """
  check_positive_int("m", m, trace.num_experts)
  hits, seq, num_seqs = _window_hits(trace, layer, s, np.array([m]))
  parts = np.stack([np.bincount(seq, weights=hits[:, 0], minlength=num_seqs),
                    np.bincount(seq, minlength=num_seqs)], axis=1)
  parts = parts[parts[:, 1] > 0]
  with np.errstate(invalid="ignore", divide="ignore"):
    return bootstrap_interval(parts, lambda x: x[:, 0] / x[:, 1], num_resamples, level, seed)


def srp_interval(trace: RoutingTrace, layer: int, s: int, num_resamples: int = 1000,
                 level: float = 0.95, seed: Seed = 0) -> Interval:
  """SRP(s) and its percentile bootstrap interval over sequences (F1 pooled over
  the windows of the drawn sequences, maximised over theta in each resample)."""
  per_seq, _ = _histograms(trace, layer, s)
  per_seq = per_seq[per_seq.sum(axis=1) > 0]   # sequences with at least one window
  return bootstrap_interval(per_seq, lambda x: _best(_f1_by_theta(x, s)).value,
                            num_resamples, level, seed)

"""Routing traces: what every MoE layer did to a fixed set of tokens.

A trace is the input of every measure in `moejax.analysis`; the measures read
numpy arrays and never a model, so they run again without one.

Shapes, with Y the number of MoE layers, T the traced tokens and K the most
experts any token selected in the trace (tokens-choose routers: top_k; routers
with a variable count: the largest count seen):

  experts        int32[Y, T, K]   each token's selected experts, by weight
                                  (largest first); -1 pads a row
  weights        float32[Y, T, K] their routing weights (0 on padding)
  kept           bool[Y, T, K]    True where the assignment was executed;
                                  False where capacity dropped it, and on padding
  token_ids      int32[T]         the id fed at each position
  positions      int32[T]         position in the sequence
  sequence_ids   int32[T]         which sequence of the evaluation set
  domains        int32[T]         the domain label, -1 where the data has none
  router_entropy float32[Y, T]    entropy of each token's router distribution
                                  in nats (NaN where not recorded)
  num_experts    E                routed experts per layer
  meta           step, dataset, split, router, top_k, layer names, model digest

`selected = experts >= 0` marks the router's choices before capacity. The
tokens are ordered by sequence, then position, with the padding of the
evaluation batches left out.

Files: `save` writes one compressed npz (arrays plus the meta as JSON);
`load` reads it back and checks its version.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np

FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class RoutingTrace:
  """Per-layer routing of T tokens (see the module docstring for shapes)."""

  experts: np.ndarray
  weights: np.ndarray
  kept: np.ndarray
  token_ids: np.ndarray
  positions: np.ndarray
  sequence_ids: np.ndarray
  domains: np.ndarray
  num_experts: int
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  router_entropy: Optional[np.ndarray] = None

  def __post_init__(self):
    y, t, k = self.experts.shape
    if self.router_entropy is None:
      object.__setattr__(self, "router_entropy", np.full((y, t), np.nan, np.float32))
    if self.router_entropy.shape != (y, t):
      raise ValueError(f"trace router_entropy has shape {self.router_entropy.shape}, "
                       f"expected {(y, t)}")
    for name in ("weights", "kept"):
      if getattr(self, name).shape != (y, t, k):
        raise ValueError(f"trace {name} has shape {getattr(self, name).shape}, "
                         f"experts has {(y, t, k)}")
    for name in ("token_ids", "positions", "sequence_ids", "domains"):
      if getattr(self, name).shape != (t,):
        raise ValueError(f"trace {name} has shape {getattr(self, name).shape}, expected ({t},)")
    if self.experts.max(initial=-1) >= self.num_experts:
      raise ValueError(f"trace names expert {int(self.experts.max())} but num_experts is "
                       f"{self.num_experts}")

  @property
  def num_layers(self) -> int:
    return self.experts.shape[0]

  @property
  def num_tokens(self) -> int:
    return self.experts.shape[1]

  @property
  def selected(self) -> np.ndarray:
    """bool[Y, T, K]: the router's choices before capacity (padding False)."""
    return self.experts >= 0

  @property
  def has_domains(self) -> bool:
    return bool(np.any(self.domains >= 0))

  @property
  def layer_names(self) -> list[str]:
    return list(self.meta.get("layers", [f"layer_{i}" for i in range(self.num_layers)]))

  def layer(self, index: int) -> "RoutingTrace":
    """The trace of one layer (Y = 1)."""
    names = self.layer_names
    return dataclasses.replace(
        self, experts=self.experts[index:index + 1], weights=self.weights[index:index + 1],
        kept=self.kept[index:index + 1], router_entropy=self.router_entropy[index:index + 1],
        meta={**self.meta, "layers": [names[index]]})

  def sequences(self) -> list[np.ndarray]:
    """Indices into T of each sequence's tokens, in position order."""
    order = np.lexsort((self.positions, self.sequence_ids))
    ids = self.sequence_ids[order]
    cuts = np.flatnonzero(np.diff(ids)) + 1
    return np.split(order, cuts)


def from_plans(plans: Sequence[Mapping[str, np.ndarray]], num_tokens: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(experts, weights, kept) [Y, T, K] from each layer's flat plan.

  Each plan holds `token`, `expert`, `weight` [A] (the router's weights before
  capacity), `selected` [A] (the router's valid slots before capacity) and `kept`
  [A] (valid after capacity, the same slots), as numpy.
  A token's assignments are ordered by weight, largest first; K is the largest
  count of selected assignments of any token in any layer.
  """
  rows = []
  for plan in plans:
    token = np.asarray(plan["token"]).astype(np.int64)
    sel = np.asarray(plan["selected"]).astype(bool)
    token, expert = token[sel], np.asarray(plan["expert"])[sel]
    weight = np.asarray(plan["weight"])[sel]
    kept = np.asarray(plan["kept"]).astype(bool)[sel]
    order = np.lexsort((-weight, token))
    token, expert, weight, kept = token[order], expert[order], weight[order], kept[order]
    counts = np.bincount(token, minlength=num_tokens)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(token.size) - starts[token]
    rows.append((token, rank, expert, weight, kept, int(counts.max(initial=0))))
  width = max([r[-1] for r in rows] + [1])
  shape = (len(plans), num_tokens, width)
  experts = np.full(shape, -1, np.int32)
  weights = np.zeros(shape, np.float32)
  kept_all = np.zeros(shape, bool)
  for layer, (token, rank, expert, weight, kept, _) in enumerate(rows):
    experts[layer, token, rank] = expert
    weights[layer, token, rank] = weight
    kept_all[layer, token, rank] = kept
  return experts, weights, kept_all


def save(trace: RoutingTrace, path: str) -> str:
  """Writes the trace to `path` (.npz), atomically; returns the path."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez_compressed(
      tmp, experts=trace.experts, weights=trace.weights, kept=trace.kept,
      token_ids=trace.token_ids, positions=trace.positions,
      sequence_ids=trace.sequence_ids, domains=trace.domains,
      router_entropy=trace.router_entropy, num_experts=np.int64(trace.num_experts),
      meta=np.frombuffer(json.dumps({"version": FORMAT_VERSION, **trace.meta},
                                    sort_keys=True).encode(), np.uint8))
  os.replace(tmp, path)
  return path


def load(path: str) -> RoutingTrace:
  """Reads a trace written by `save`; ValueError naming the file if it is not one."""
  try:
    with np.load(path) as data:
      arrays = {k: data[k] for k in data.files}
  except (OSError, ValueError) as e:
    raise ValueError(f"{path} is not a routing trace: {e}") from None
  missing = {"experts", "weights", "kept", "token_ids", "positions", "sequence_ids",
             "domains", "num_experts", "meta"} - set(arrays)
  if missing:
    raise ValueError(f"{path} is not a routing trace: missing {sorted(missing)}")
  meta = json.loads(arrays["meta"].tobytes().decode())
  version = meta.pop("version", None)
  if version != FORMAT_VERSION:
    raise ValueError(f"{path} is a routing trace of format {version}, this reads "
                     f"{FORMAT_VERSION}")
  return RoutingTrace(
      experts=arrays["experts"], weights=arrays["weights"], kept=arrays["kept"],
      token_ids=arrays["token_ids"], positions=arrays["positions"],
      sequence_ids=arrays["sequence_ids"], domains=arrays["domains"],
      num_experts=int(arrays["num_experts"]), meta=meta,
      router_entropy=arrays.get("router_entropy"))


def same_tokens(a: RoutingTrace, b: RoutingTrace, what: Optional[str] = None) -> None:
  """ValueError unless a and b traced the same tokens of the same model shape
  (two checkpoints of one run, or two runs on one evaluation set)."""
  what = what or "the two traces"
  if a.meta.get("dataset") != b.meta.get("dataset") or a.meta.get("split") != b.meta.get("split"):
    raise ValueError(f"{what} come from different data: {a.meta.get('dataset')}/"
                     f"{a.meta.get('split')} and {b.meta.get('dataset')}/{b.meta.get('split')}")
  if not (np.array_equal(a.token_ids, b.token_ids) and np.array_equal(a.positions, b.positions)
          and np.array_equal(a.sequence_ids, b.sequence_ids)):
    raise ValueError(f"{what} traced different tokens")
  if a.num_layers != b.num_layers or a.num_experts != b.num_experts:
    raise ValueError(f"{what} come from different models: {a.num_layers} and {b.num_layers} "
                     f"MoE layers, {a.num_experts} and {b.num_experts} experts")

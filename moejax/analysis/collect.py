"""Tracing a model: route a fixed set of tokens and keep what every MoE layer did.

  layer_plans(aux)                       the flat plans a trace is built from
  trace_batches(route, batches, ...)     RoutingTrace over the real tokens of batches

`route(rows)` is any function that returns the model's per-layer MoEAux for the
rows of `moejax.train.step.split_batch` (the trainer's probe and
`python -m moejax.analyze` pass a jitted forward pass in evaluation mode). Only
real input tokens are traced (segment id > 0); each (row, segment) pair is one
sequence, numbered in the order the batches give them.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Optional

import jax
import numpy as np

from moejax import metrics
from moejax.analysis.trace import RoutingTrace, from_plans


def layer_plans(aux: Mapping[str, Any]) -> dict[str, dict[str, jax.Array]]:
  """Per MoE layer: token, expert, weight (the router's, before capacity),
  selected (valid before capacity) and kept (valid after), each [A], and
  `entropy` [T], each token's router entropy in nats (NaN without probs)."""
  out = {}
  for name, a in aux.items():
    routed = a.plan if a.routed_plan is None else a.routed_plan
    out[name] = {"token": routed.token, "expert": routed.expert, "weight": routed.weight,
                 "selected": routed.valid, "kept": a.plan.valid}
    if a.probs is not None:
      out[name]["entropy"] = metrics.row_entropy(a.probs)
  return out


def model_plans(model, state, rows: Mapping[str, Any]) -> dict[str, dict[str, jax.Array]]:
  """layer_plans of `model` (a TransformerLM) with the TrainState `state` on the
  rows of split_batch, in evaluation mode (jit it)."""
  variables = {"params": state.params, **({"routing": state.routing} if state.routing else {})}
  _, aux = model.apply(variables, rows["inputs"], rows["positions"], rows["segments"],
                       deterministic=True, step=state.step)
  return layer_plans(aux)


def trace_batches(route: Callable[[dict[str, np.ndarray]], Mapping[str, Any]],
                  batches: Iterable[dict[str, np.ndarray]], num_experts: int,
                  max_tokens: Optional[int] = None, meta: Optional[Mapping[str, Any]] = None,
                  ) -> RoutingTrace:
  """The routing of the real tokens of `batches` (rows of split_batch), up to
  `max_tokens` of them (whole batches are routed; the trace keeps the first).

  `route(rows)` returns layer_plans of the model on those rows.
  """
  layers: dict[str, list] = {}
  columns = {"token_ids": [], "positions": [], "sequence_keys": [], "domains": []}
  seen, row_offset = 0, 0
  for rows in batches:
    if max_tokens is not None and seen >= max_tokens:
      break
    plans = jax.device_get(route(rows))
    segments = np.asarray(rows["segments"])
    batch, length = segments.shape
    real = (segments > 0).reshape(-1)
    index = np.full(batch * length, -1, np.int64)
    index[real] = np.arange(seen, seen + int(real.sum()))
    for name, plan in plans.items():
      token = index[np.asarray(plan["token"])]
      keep = token >= 0
      entropy = (np.asarray(plan["entropy"], np.float32).reshape(-1)[real] if "entropy" in plan
                 else np.full(int(real.sum()), np.nan, np.float32))
      layers.setdefault(name, []).append({
          "token": token[keep], "expert": np.asarray(plan["expert"])[keep],
          "weight": np.asarray(plan["weight"])[keep],
          "selected": np.asarray(plan["selected"])[keep],
          "kept": np.asarray(plan["kept"])[keep], "entropy": entropy})
    row_of = np.repeat(np.arange(batch) + row_offset, length)[real]
    columns["token_ids"].append(np.asarray(rows["inputs"]).reshape(-1)[real])
    columns["positions"].append(np.asarray(rows["positions"]).reshape(-1)[real])
    columns["sequence_keys"].append(np.stack([row_of, segments.reshape(-1)[real]], axis=1))
    domain = rows.get("domain")
    columns["domains"].append(np.full(int(real.sum()), -1, np.int64) if domain is None
                              else np.asarray(domain).reshape(-1)[real])
    seen += int(real.sum())
    row_offset += batch
  if not seen:
    raise ValueError("no tokens to trace: the evaluation data gave no real tokens")
  total = seen if max_tokens is None else min(seen, max_tokens)
  names = sorted(layers, key=_layer_order)
  plans, entropies = [], []
  for name in names:
    parts = layers[name]
    entropies.append(np.concatenate([p.pop("entropy") for p in parts])[:total])
    merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    keep = merged["token"] < total
    plans.append({k: v[keep] for k, v in merged.items()})
  experts, weights, kept = from_plans(plans, total)
  keys = np.concatenate(columns["sequence_keys"])[:total]
  _, first = np.unique(keys, axis=0, return_index=True)
  order = np.argsort(first)      # sequences numbered in the order they came
  rank = np.empty_like(order)
  rank[order] = np.arange(order.size)
  _, inverse = np.unique(keys, axis=0, return_inverse=True)
  return RoutingTrace(
      experts=experts, weights=weights, kept=kept,
      token_ids=np.concatenate(columns["token_ids"])[:total].astype(np.int32),
      positions=np.concatenate(columns["positions"])[:total].astype(np.int32),
      sequence_ids=rank[inverse.reshape(-1)].astype(np.int32),
      domains=np.concatenate(columns["domains"])[:total].astype(np.int32),
      num_experts=num_experts, meta={**(meta or {}), "layers": names, "tokens": total},
      router_entropy=np.stack(entropies).astype(np.float32))


def _layer_order(name: str) -> tuple[int, str]:
  """layer_<i> names in numeric order."""
  tail = name.rsplit("_", 1)[-1]
  return (int(tail), name) if tail.isdigit() else (1 << 30, name)

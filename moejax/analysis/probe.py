"""The trainer's routing probe: what changed on one fixed batch since the last probe.

  summary(trace, previous) -> {"layer_<i>": {...}, "mean_top1_changed": ..., ...}

Per MoE layer: `top1_changed` and `jaccard` against the previous probe's trace
(moejax.analysis.fluctuation; absent at the first probe), `token_expert_mi`
(I(token id; expert), OpenMoE's context-independent specialisation) and, on
labelled data, `domain_expert_mi`, in nats. OpenMoE (2024) finds the token-to-
expert assignment fixed early in pre-training: top1_changed falling towards 0
while token_expert_mi levels off is that settling.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from moejax.analysis.fluctuation import routing_fluctuation
from moejax.analysis.specialization import (domain_expert_mutual_information,
                                            token_expert_mutual_information)
from moejax.analysis.trace import RoutingTrace


def summary(trace: RoutingTrace, previous: Optional[RoutingTrace] = None) -> dict[str, Any]:
  """The probe's record: per-layer figures and their means over layers."""
  layers: dict[str, dict[str, float]] = {
      name: {"token_expert_mi": token_expert_mutual_information(trace, i)}
      for i, name in enumerate(trace.layer_names)}
  if trace.has_domains:
    for i, name in enumerate(trace.layer_names):
      layers[name]["domain_expert_mi"] = domain_expert_mutual_information(trace, i)
  if previous is not None:
    moved = routing_fluctuation(previous, trace)
    for i, name in enumerate(trace.layer_names):
      layers[name]["top1_changed"] = float(moved.top1_changed[i])
      layers[name]["jaccard"] = float(moved.jaccard[i])
  record: dict[str, Any] = {"layers": layers}
  for key in next(iter(layers.values())):
    record[f"mean_{key}"] = float(np.mean([m[key] for m in layers.values()]))
  return record

"""Metric writers: a JSONL file (one object per record) and TensorBoard events.

  <workdir>/metrics.jsonl   {"step": 20, "split": "train", "loss": 3.1, ...}
  <workdir>/tensorboard/    event files (tensorboardX; no TensorFlow needed)

Per-layer routing metrics are flattened to `layer_0/max_violation` and so on;
vectors go to the JSONL file and to TensorBoard histograms. A per-expert load
`.../load` [E] becomes the histogram of the expert index over assignments: one
bucket per expert, holding its count.
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np


def flatten(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in metrics.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(flatten(value, f"{name}/"))
    else:
      value = np.asarray(value)
      out[name] = value.item() if value.ndim == 0 else value.tolist()
  return out


def expert_histogram(load: list[float]) -> dict[str, Any]:
  """add_histogram_raw arguments for the expert index weighted by load [E]."""
  counts = np.asarray(load, np.float64)
  index = np.arange(len(counts), dtype=np.float64)
  return {"min": 0.0, "max": float(len(counts) - 1), "num": float(counts.sum()),
          "sum": float(np.dot(index, counts)), "sum_squares": float(np.dot(index ** 2, counts)),
          "bucket_limits": (index + 0.5).tolist(), "bucket_counts": counts.tolist()}


class MetricWriter:
  """Appends to metrics.jsonl and writes TensorBoard scalars."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, split: str, metrics: dict[str, Any]) -> dict[str, Any]:
    flat = flatten(metrics)
    if self.enabled:
      self._jsonl.write(json.dumps({"step": step, "split": split, **flat}) + "\n")
      self._jsonl.flush()
      for name, value in flat.items():
        if isinstance(value, (int, float)):
          self._tensorboard.add_scalar(f"{split}/{name}", value, step)
        elif isinstance(value, list) and value and not isinstance(value[0], list):
          if name.endswith("/load"):
            self._tensorboard.add_histogram_raw(f"{split}/{name}", global_step=step,
                                                **expert_histogram(value))
          else:
            self._tensorboard.add_histogram(f"{split}/{name}", np.asarray(value), step)
    return flat

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tensorboard.close()

"""Metric writers: a JSONL file (one object per record) and TensorBoard events.

  <workdir>/metrics.jsonl   {"step": 20, "split": "train", "loss": 3.1, ...}
  <workdir>/tensorboard/    event files (tensorboardX; no TensorFlow needed)

Per-layer routing metrics are flattened to `layer_0/max_violation` and so on;
vectors go to the JSONL file and to TensorBoard histograms. A per-expert load
`.../load` [E] becomes the histogram of the expert index over assignments: one
bucket per expert, holding its count.

A resumed run logs each step once, in order: records after the restored step
(logged by a run killed past its last checkpoint) are dropped from the JSONL file
and purged from TensorBoard's view, and `flush()` before each checkpoint puts every
record up to it on disk.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any, Callable, Optional

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


def keep_records(path: str, keep: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
  """The records of the JSONL file `path` for which keep(record) holds, and the
  file cut down to them. A line cut short (a kill mid-write) is dropped, one cut
  just before its newline completed. Only when that changes the file is it
  rewritten, atomically: a temporary file in the same directory, fsync,
  os.replace, fsync of the directory."""
  if not os.path.exists(path):
    return []
  kept_lines, kept, changed = [], [], False
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        changed = True
        continue
      if not keep(record):
        changed = True
        continue
      if not line.endswith("\n"):
        line, changed = line + "\n", True
      kept_lines.append(line)
      kept.append(record)
  if changed:
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=".metrics-", suffix=".tmp")
    try:
      with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.writelines(kept_lines)
        f.flush()
        os.fsync(f.fileno())
      os.replace(temporary, path)
    except BaseException:
      if os.path.exists(temporary):
        os.unlink(temporary)
      raise
    directory_fd = os.open(directory, os.O_RDONLY)
    try:
      os.fsync(directory_fd)
    finally:
      os.close(directory_fd)
  return kept


class MetricWriter:
  """Appends to metrics.jsonl and writes TensorBoard scalars and histograms.

  resume_step: the step of the checkpoint a run resumed from (None: a fresh run,
  which appends to what is there, but for a line cut short). Records with a later
  step are dropped from metrics.jsonl, and TensorBoard purges them: the first
  event file of this writer starts with a SessionLog START at resume_step + 1
  (tensorboardX's purge_step), which makes TensorBoard discard the events of
  every tag from that step on that it read before, from older files.
  """

  def __init__(self, workdir: str, enabled: bool = True, resume_step: Optional[int] = None):
    self.enabled = enabled
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._path = os.path.join(workdir, "metrics.jsonl")
    self._tensorboard_dir = os.path.join(workdir, "tensorboard")
    purge_step = None if resume_step is None else resume_step + 1
    keep_records(self._path, lambda record: resume_step is None or record["step"] <= resume_step)
    self._jsonl = open(self._path, "a", encoding="utf-8")
    self._tensorboard = None
    self._open_tensorboard(purge_step)

  def _open_tensorboard(self, purge_step: Optional[int] = None) -> None:
    """A new event file; its name sorts after every earlier one (TensorBoard reads
    a directory's files in name order), also within one second, which the
    timestamp in tensorboardX's names does not resolve."""
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._tensorboard = SummaryWriter(self._tensorboard_dir, purge_step=purge_step,
                                      filename_suffix=f".{time.time_ns()}")

  def _close_tensorboard(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()
      self._tensorboard = None

  def write(self, step: int, split: str, metrics: dict[str, Any],
            replace: bool = False) -> dict[str, Any]:
    """Logs one record; returns it flattened. replace: drop what was logged for
    (step, split) first (an evaluation repeated at the last step)."""
    flat = flatten(metrics)
    if self.enabled:
      if replace:
        self._drop(step, split)
      self._jsonl.write(json.dumps({"step": step, "split": split, **flat}) + "\n")
      self._jsonl.flush()
      self._add_to_tensorboard(step, split, flat)
    return flat

  def _drop(self, step: int, split: str) -> None:
    """Removes the records of (step, split): from metrics.jsonl, and from
    TensorBoard by a purge from `step` on, after which the records kept at `step`
    and later (other splits) are written to TensorBoard again."""
    self._jsonl.close()
    kept = keep_records(self._path,
                        lambda record: (record["step"], record["split"]) != (step, split))
    self._jsonl = open(self._path, "a", encoding="utf-8")
    self._close_tensorboard()
    self._open_tensorboard(purge_step=step)
    for record in kept:
      if record["step"] >= step:
        self._add_to_tensorboard(record["step"], record["split"], {
            k: v for k, v in record.items() if k not in ("step", "split")})

  def _add_to_tensorboard(self, step: int, split: str, flat: dict[str, Any]) -> None:
    if self._tensorboard is None:
      self._open_tensorboard()
    for name, value in flat.items():
      if isinstance(value, (int, float)):
        self._tensorboard.add_scalar(f"{split}/{name}", value, step)
      elif isinstance(value, list) and value and not isinstance(value[0], list):
        if name.endswith("/load"):
          self._tensorboard.add_histogram_raw(f"{split}/{name}", global_step=step,
                                              **expert_histogram(value))
        else:
          self._tensorboard.add_histogram(f"{split}/{name}", np.asarray(value), step)

  def flush(self) -> None:
    """Puts every record written so far on disk, as a checkpoint about to be saved
    needs: metrics.jsonl is flushed and fsynced, and the TensorBoard event file
    closed (tensorboardX writes from a queue that its flush does not drain); the
    next record opens a new event file."""
    if self.enabled:
      self._jsonl.flush()
      os.fsync(self._jsonl.fileno())
      self._close_tensorboard()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._close_tensorboard()

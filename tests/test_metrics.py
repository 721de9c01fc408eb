"""Load and routing metrics (moejax/metrics.py, moejax/analysis), and how the
writers log them, on hand-computed cases."""
from __future__ import annotations

import glob
import math
import struct

import jax.numpy as jnp
import numpy as np
import pytest

from moejax import metrics
from moejax.analysis import joint_counts, mutual_information
from moejax.core import RoutingPlan
from moejax.train.writers import MetricWriter, expert_histogram


@pytest.mark.parametrize("counts,max_violation,cv", [
    ([2, 2, 2, 2], 0.0, 0.0),                       # balanced
    ([8, 0, 0, 0], 3.0, math.sqrt(3)),              # collapsed: (8 - 2) / 2; std 2 sqrt 3 / 2
    ([4, 2, 1, 1], 1.0, math.sqrt(1.5) / 2),        # (4 - 2) / 2; var (4 + 0 + 1 + 1) / 4
    ([0, 0, 0, 0], 0.0, 0.0),                       # no load: defined as 0, not NaN
])
def test_max_violation_and_cv_by_hand(counts, max_violation, cv):
  counts = jnp.asarray(counts, jnp.int32)
  np.testing.assert_allclose(metrics.max_violation(counts), max_violation, rtol=1e-6)
  np.testing.assert_allclose(metrics.coefficient_of_variation(counts), cv, rtol=1e-6)


def test_router_entropies_by_hand():
  # Two tokens, each certain of a different expert of E = 2:
  #   per-token entropy 0; mean distribution [.5, .5], marginal entropy log 2.
  confident = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  assert float(metrics.entropy(confident)) == 0.0
  np.testing.assert_allclose(metrics.marginal_entropy(confident), math.log(2), rtol=1e-6)
  # Two uniform tokens: both entropies log 2 (no information about the token).
  uniform = jnp.full((2, 2), 0.5)
  np.testing.assert_allclose(metrics.entropy(uniform), math.log(2), rtol=1e-6)
  np.testing.assert_allclose(metrics.marginal_entropy(uniform), math.log(2), rtol=1e-6)


def test_domain_expert_mutual_information_by_hand():
  # 4 tokens, labels [0, 0, 1, 1], E = 2, K = 1.
  labels = jnp.array([0, 0, 1, 1])
  def plan(experts, valid=(True,) * 4):
    return RoutingPlan.from_topk(jnp.asarray(experts)[:, None], jnp.ones((4, 1)),
                                 jnp.asarray(valid)[:, None])
  # Perfect specialisation: label n -> expert n; I = H(label) = log 2.
  joint = joint_counts(plan([0, 0, 1, 1]), labels, 2, 2)
  np.testing.assert_array_equal(joint, [[2, 0], [0, 2]])
  np.testing.assert_allclose(mutual_information(joint), math.log(2), rtol=1e-6)
  # Routing independent of the label: I = 0.
  np.testing.assert_allclose(mutual_information(joint_counts(plan([0, 1, 0, 1]), labels, 2, 2)),
                             0.0, atol=1e-7)
  # Dropped assignments and masked tokens are not counted: tokens 1 (invalid) and
  # 3 (masked) leave [[1, 0], [0, 1]], again log 2.
  joint = joint_counts(plan([0, 1, 1, 0], (True, False, True, True)), labels, 2, 2,
                       token_mask=jnp.array([True, True, True, False]))
  np.testing.assert_array_equal(joint, [[1, 0], [0, 1]])
  np.testing.assert_allclose(mutual_information(joint), math.log(2), rtol=1e-6)
  # Empty table: 0, not NaN.
  assert float(mutual_information(jnp.zeros((2, 3)))) == 0.0


def test_expert_histogram_by_hand():
  # load [3, 0, 5, 1]: 9 assignments; sum of indices 0*3 + 1*0 + 2*5 + 3*1 = 13;
  # of squares 0 + 0 + 20 + 9 = 29; one bucket per expert, right edges e + 0.5.
  got = expert_histogram([3.0, 0.0, 5.0, 1.0])
  assert got == {"min": 0.0, "max": 3.0, "num": 9.0, "sum": 13.0, "sum_squares": 29.0,
                 "bucket_limits": [0.5, 1.5, 2.5, 3.5], "bucket_counts": [3.0, 0.0, 5.0, 1.0]}


def _tensorboard_records(directory):
  """(tag, value) of every summary value in the event files (TFRecord framing)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  out = []
  for path in glob.glob(f"{directory}/events.out.tfevents.*"):
    data = open(path, "rb").read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      out += [(v.tag, v) for v in event.summary.value]
  return out


def test_writer_logs_scalars_and_per_expert_load_histograms(tmp_path):
  writer = MetricWriter(str(tmp_path))
  flat = writer.write(7, "train", {"loss": 2.5, "layers": {"layer_0": {
      "max_violation": 0.5, "load": np.array([3.0, 0.0, 5.0, 1.0])}}})
  writer.close()
  assert flat == {"loss": 2.5, "layers/layer_0/max_violation": 0.5,
                  "layers/layer_0/load": [3.0, 0.0, 5.0, 1.0]}
  records = dict(_tensorboard_records(str(tmp_path / "tensorboard")))
  assert records["train/loss"].simple_value == 2.5
  histogram = records["train/layers/layer_0/load"].histo
  assert list(histogram.bucket) == [3.0, 0.0, 5.0, 1.0]
  assert list(histogram.bucket_limit) == [0.5, 1.5, 2.5, 3.5] and histogram.num == 9.0

"""Every figure of a harness results markdown comes from its committed JSON: the
report regenerated from the JSON equals the committed one, up to its reading."""
from __future__ import annotations

import argparse
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "experiments", "results")
sys.path.insert(0, os.path.join(REPO, "experiments"))

import harness  # noqa: E402  (experiments/)


def _generated(path: str) -> str:
  with open(path, encoding="utf-8") as f:
    text = f.read()
  return text.split(harness.READING)[0].rstrip("\n")


REPORTS = ["balance", "ec_capacity", "granularity", "interventions", "longer", "router_zoo",
           "router_zoo_2", "routing_analysis"]


@pytest.mark.parametrize("name", REPORTS)
def test_report_is_regenerated_from_its_json(name, tmp_path):
  path = os.path.join(RESULTS, f"{name}.json")
  if not os.path.exists(path):
    pytest.skip(f"{name}.json not committed yet")
  module = __import__(name)
  data = harness.load(path)
  out = str(tmp_path / f"{name}.md")
  module.write_report(out, data, argparse.Namespace(steps=data["meta"].get("steps")))
  assert _generated(out) == _generated(os.path.join(RESULTS, f"{name}.md"))


@pytest.mark.parametrize("name", REPORTS)
def test_reading_was_written_on_the_committed_data(name):
  """Each committed report has a reading, marked with the digest of the runs it
  interprets, and that digest is the committed JSON's: a reading left stale fails."""
  path = os.path.join(RESULTS, f"{name}.json")
  if not os.path.exists(path):
    pytest.skip(f"{name}.json not committed yet")
  with open(os.path.join(RESULTS, f"{name}.md"), encoding="utf-8") as f:
    reading = f.read().partition(harness.READING)[2]
  assert reading, f"{name}.md has no {harness.READING!r} section"
  digest = harness.digest(harness.load(path)["runs"])
  assert harness.DIGEST_MARK.format(digest=digest) in reading, (
      f"{name}.md's reading is not marked with its data's digest {digest}")
  assert "**Stale: " not in reading

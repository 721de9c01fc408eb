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


@pytest.mark.parametrize("name", ["balance", "ec_capacity", "granularity", "interventions",
                                  "longer", "router_zoo", "router_zoo_2", "routing_analysis"])
def test_report_is_regenerated_from_its_json(name, tmp_path):
  path = os.path.join(RESULTS, f"{name}.json")
  if not os.path.exists(path):
    pytest.skip(f"{name}.json not committed yet")
  module = __import__(name)
  data = harness.load(path)
  out = str(tmp_path / f"{name}.md")
  module.write_report(out, data, argparse.Namespace(steps=data["meta"].get("steps")))
  assert _generated(out) == _generated(os.path.join(RESULTS, f"{name}.md"))

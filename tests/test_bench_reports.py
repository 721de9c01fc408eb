"""Every benchmark report in experiments/results/ comes from its committed JSON: the
command each benchmark's docstring gives regenerates the report from it, equal to the
committed one up to its hand-written "## Reading"."""
from __future__ import annotations

import os
import shlex
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "experiments", "results")
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "experiments"))

from report_file import READING  # noqa: E402  (experiments/)

# report -> (benchmark module, the results files its --summarize reads)
REPORTS = {
    "bench_ep.md": ("bench_ep", ["bench_ep_cpu.jsonl"]),
    "bench_kernels.md": ("bench_kernels", ["bench_kernels_cpu.jsonl",
                                           "bench_kernels_gpu.jsonl"]),
    "bench_layer_cpu.md": ("bench_layer", ["bench_layer_cpu.jsonl",
                                           "bench_layer_cpu_blocks.jsonl",
                                           "bench_layer_cpu_bf16.jsonl"]),
    "bench_routers.md": ("bench_routers", ["bench_routers_cpu.jsonl"]),
    "bench_train.md": ("bench_train", ["bench_train_cpu.json"]),
}


def command(report: str) -> str:
  """The one command that regenerates `report`, run from the repository root."""
  name, files = REPORTS[report]
  return (f"PYTHONPATH=. python experiments/{name}.py --summarize "
          + " ".join(f"experiments/results/{f}" for f in files)
          + f" --out experiments/results/{report}")


def generated(path: str) -> str:
  """The part of a report before its "## Reading"."""
  with open(path, encoding="utf-8") as f:
    return f.read().split(READING)[0].rstrip("\n")


@pytest.mark.parametrize("report", sorted(REPORTS))
def test_report_is_regenerated_from_its_json(report, tmp_path, monkeypatch):
  module = __import__(REPORTS[report][0])
  argv = shlex.split(command(report))[3:]
  argv[-1] = str(tmp_path / report)
  monkeypatch.chdir(REPO)
  module.main(argv)
  assert generated(argv[-1]) == generated(os.path.join(RESULTS, report))


@pytest.mark.parametrize("report", sorted(REPORTS))
def test_docstring_and_report_give_the_command(report):
  doc = __import__(REPORTS[report][0]).__doc__
  assert command(report) in " ".join(doc.replace("\\\n", " ").split())
  assert command(report) in generated(os.path.join(RESULTS, report))


def test_a_reading_survives_regeneration(tmp_path):
  import bench_routers  # pylint: disable=import-outside-toplevel
  out = tmp_path / "bench_routers.md"
  out.write_text("old tables\n\n" + READING + "\n\nBy hand.\n", encoding="utf-8")
  bench_routers.summarize(os.path.join(RESULTS, "bench_routers_cpu.jsonl"), str(out))
  text = out.read_text(encoding="utf-8")
  assert text.startswith("# Router cost") and "old tables" not in text
  assert text.endswith(READING + "\n\nBy hand.\n")

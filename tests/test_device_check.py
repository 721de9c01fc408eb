"""experiments/device_check.py runs end to end on CPU without the data extras; a
missing platform is one line; a failed kernel is a failed line and the run goes on;
`auto` picks only backends the committed device checks passed."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

from moejax.dispatch import gmm as gmm_backends
from tests.helpers import import_blocker

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "experiments", "device_check.py")
# What an accelerator machine lacks: the script must not import any of these.
BLOCKED = ("ml_collections", "grain", "tensorflow_datasets", "tensorflow", "array_record")
RUN_WITHOUT_DATA_EXTRAS = import_blocker(
    BLOCKED, "is not installed on an accelerator machine") + """
import runpy
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _device_check(*args, **kwargs) -> subprocess.CompletedProcess:
  env = {**os.environ, "PYTHONPATH": REPO}
  return subprocess.run([sys.executable, "-c", RUN_WITHOUT_DATA_EXTRAS, SCRIPT, *args],
                        capture_output=True, text=True, env=env, cwd=REPO, timeout=600,
                        **kwargs)


def _records(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_cpu_run_writes_every_part_and_passes(tmp_path):
  out = str(tmp_path / "device_cpu.jsonl")
  done = _device_check("--platform", "cpu", "--out", out, "--train_backends", "xla")
  assert done.returncode == 0, done.stderr[-3000:]
  records = _records(out)
  assert [r["part"] for r in records if r["bench"] == "part_done"] == [
      "machine", "kernels", "layer", "kernel_perf", "layer_perf", "training"]
  assert not [r for r in records if r["bench"] == "part_error"]
  machine = records[0]
  assert machine["bench"] == "machine" and machine["backend"] == "cpu"
  assert machine["size"] == "tiny" and machine["platform_asked"] == "cpu"
  ceiling = [r for r in records if r["bench"] == "matmul_ceiling"]
  assert len(ceiling) == 1 and ceiling[0]["matmul_tflops"] > 0
  # 7 kernel entry points x 2 dtypes on the tiny grid, each against float64.
  kernels = [r for r in records if r["part"] == "kernels" and "op" in r]
  assert len(kernels) == 14 and all(r["pass"] for r in kernels)
  assert {r["dtype"] for r in kernels} == {"float32", "bfloat16"}
  # 2 layer cases at the tiny size (4 on an accelerator) x 3 backends against the
  # loop oracle.
  layer = [r for r in records if r["bench"] == "layer_parity"]
  assert len(layer) == 6 and all(r["pass"] for r in layer)
  assert {r["case"] for r in layer} == {"topk_capacity", "expert_choice_capacity"}
  assert max(e for r in layer for e in r["errors"].values()) <= 1e-4
  grid = [r for r in records if r["bench"] == "gmm_perf"]
  assert grid and all(r["check_pass"] for r in grid)
  extra = [r for r in records if r["bench"] == "tgmm_combine_perf"]
  assert extra and all(r["check_pass"] for r in extra) and not extra[0]["errors"]
  layer_perf = [r for r in records if r["bench"] == "layer_perf"]
  assert {r["backend"] for r in layer_perf} == {"pallas", "xla", "ragged_dot"}
  assert all(r["status"] == "ok" for r in layer_perf)
  training = [r for r in records if r["bench"] == "training"]
  assert [r["name"] for r in training] == ["dense", "moe_xla"]
  assert all(r["finite"] and r["tokens_per_s"] > 0 for r in training)
  summary = out.replace(".jsonl", ".md")
  with open(summary, encoding="utf-8") as f:
    text = f.read()
  # 14 kernel + 6 layer lines, 2 grid checks against ragged_dot, 2 training runs.
  assert "**Correctness: 24 of 24 lines pass.**" in text
  assert "Backends that passed every correctness line: pallas, xla, ragged_dot;" in text
  assert "## lm_small training, synthetic batches" in text
  # --summarize rewrites the same summary from the JSON lines.
  os.remove(summary)
  assert _device_check("--summarize", out).returncode == 0
  with open(summary, encoding="utf-8") as f:
    assert f.read() == text


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_missing_platform_is_one_line(tmp_path, platform):
  done = _device_check("--platform", platform, "--out", str(tmp_path / "x.jsonl"))
  assert done.returncode == 2
  lines = [line for line in done.stderr.splitlines() if line.strip()]
  assert lines == [f"device_check: --platform {platform}: no {platform} device on this "
                   "machine (JAX's backend is cpu)"]
  assert not os.path.exists(tmp_path / "x.jsonl")


def test_failed_kernel_is_a_failed_line_and_the_run_goes_on(tmp_path, monkeypatch):
  sys.path.insert(0, os.path.join(REPO, "experiments"))
  import device_check  # pylint: disable=g-import-not-at-top
  m = device_check.load_modules("cpu")
  real = m.bench_kernels.kernel_ops

  def failing_for_float32(settings, sizes, num_experts, num_tokens):
    run = real(settings, sizes, num_experts, num_tokens)

    def call(inputs):
      if inputs["lhs"].dtype == m.jnp.float32:
        raise RuntimeError("Triton compilation failed: out of shared memory")
      return run(inputs)
    return call

  monkeypatch.setattr(m.bench_kernels, "kernel_ops", failing_for_float32)
  out = str(tmp_path / "run.jsonl")
  status = device_check.main(["--platform", "cpu", "--parts", "kernels", "--out", out])
  assert status == 1
  records = _records(out)
  failed = [r for r in records if r.get("pass") is False]
  assert len(failed) == 1 and failed[0]["op"] == "all" and failed[0]["dtype"] == "float32"
  assert "out of shared memory" in failed[0]["error"]
  after = [r for r in records if r.get("dtype") == "bfloat16" and "op" in r]
  assert len(after) == 7 and all(r["pass"] for r in after)       # the run went on
  with open(out.replace(".jsonl", ".md"), encoding="utf-8") as f:
    assert "**Correctness: 7 of 8 lines pass.**" in f.read()


def _device_results() -> dict[str, list[list[dict]]]:
  """Committed device-check runs at full size, by platform."""
  runs = {}
  for path in glob.glob(os.path.join(REPO, "experiments", "results", "device_*.jsonl")):
    records = _records(path)
    head = records[0]
    if head.get("bench") == "machine" and head.get("size") == "full":
      runs.setdefault(head["backend"], []).append(records)
  return runs


def _passed(records: list[dict], backend: str) -> bool:
  """Every layer line of the backend passed, and for pallas every kernel line."""
  layer = [r for r in records if r.get("bench") == "layer_parity" and r["backend"] == backend]
  kernels = [r for r in records if r.get("part") == "kernels" and "pass" in r]
  return bool(layer) and all(r["pass"] for r in layer) and (
      backend != "pallas" or (bool(kernels) and all(r["pass"] for r in kernels)))


def test_auto_picks_only_backends_a_committed_device_check_passed():
  runs = _device_results()
  for platform, backend in gmm_backends.AUTO_BACKEND.items():
    if backend == "xla":       # pure XLA: its correctness needs no unrun kernel compiler
      continue
    assert any(_passed(r, backend) for r in runs.get(platform, [])), (
        f"AUTO_BACKEND[{platform!r}] = {backend!r}, but no committed device check on "
        f"{platform} passed it")
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
    readme = f.read()
  for platform, backend in gmm_backends.AUTO_BACKEND.items():
    assert f"| {platform.upper()} | `{backend}` |" in readme, platform


def test_a_spent_budget_skips_the_rest_of_a_part_and_says_so(tmp_path):
  sys.path.insert(0, os.path.join(REPO, "experiments"))
  import device_check  # pylint: disable=g-import-not-at-top
  results = device_check.Results(str(tmp_path / "r.jsonl"))
  assert list(device_check.within_budget("layer", "abc", None, results)) == ["a", "b", "c"]
  assert list(device_check.within_budget("layer", "abc", 0.0, results)) == ["a"]
  assert results.records == [{"part": "layer", "bench": "skipped", "skipped": ["b", "c"],
                              "reason": "the part's budget of 0 s was spent"}]
  assert results.failed() == []


def test_auto_choice_is_the_fastest_backend_that_passed_everything():
  sys.path.insert(0, os.path.join(REPO, "experiments"))
  import device_check  # pylint: disable=g-import-not-at-top

  def parity(backend, ok):
    return {"bench": "layer_parity", "part": "layer", "backend": backend, "pass": ok}

  def speed(backend, *tflops):
    return [{"bench": "layer_perf", "part": "layer_perf", "backend": backend,
             "tflops": {"moe": t}} for t in tflops]

  records = ([parity(b, True) for b in ("pallas", "xla", "ragged_dot")]
             + [{"part": "kernels", "bench": "correctness", "pass": True}]
             + speed("pallas", 300.0, 500.0, 400.0) + speed("xla", 200.0, 250.0)
             + speed("ragged_dot", 350.0))
  choice = device_check.auto_choice(records)
  assert choice == {"passed": ["pallas", "xla", "ragged_dot"], "fastest": "pallas",
                    "layer_tflops": {"pallas": 400.0, "xla": 250.0, "ragged_dot": 350.0}}
  # One failed kernel line rules pallas out, whatever its speed.
  records.append({"part": "kernels", "bench": "correctness", "pass": False})
  assert device_check.auto_choice(records)["fastest"] == "ragged_dot"
  assert device_check.auto_choice(records)["passed"] == ["xla", "ragged_dot"]

"""`python -m moejax.analyze` and `python -m moejax.intervene` on a tiny run, the
trainer's routing probe, and the start-up errors of both (one line, nothing
overwritten)."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from moejax import analyze
from moejax.analysis import trace as traces
from moejax.train import train
from tests.helpers import tiny_config

TOKENS = 300


@pytest.fixture(scope="module")
def run(tfds_dir, tmp_path_factory):
  """20 steps with checkpoints at 10 and 20 and a probe every 5 steps."""
  workdir = str(tmp_path_factory.mktemp("analyzed"))
  train(tiny_config(tfds_dir, **{"train.probe_every": 5}), workdir, progress=False)
  return workdir


@pytest.fixture(scope="module")
def analyzed(run):
  assert analyze.main(["--workdir", run, "--tokens", str(TOKENS)]) == 0
  return run


def _records(workdir, split):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [r for r in map(json.loads, f) if r["split"] == split]


def test_probe_logs_fluctuation_and_specialisation(run):
  probes = _records(run, "probe")
  assert [r["step"] for r in probes] == [5, 10, 15, 20]
  assert "layers/layer_0/top1_changed" not in probes[0]   # no predecessor
  for record in probes[1:]:
    for layer in ("layer_0", "layer_1"):
      assert 0.0 <= record[f"layers/{layer}/top1_changed"] <= 1.0
      assert 0.0 <= record[f"layers/{layer}/jaccard"] <= 1.0
      assert record[f"layers/{layer}/token_expert_mi"] >= 0.0
      assert record[f"layers/{layer}/domain_expert_mi"] >= 0.0
    np.testing.assert_allclose(
        record["mean_top1_changed"],
        np.mean([record[f"layers/layer_{i}/top1_changed"] for i in (0, 1)]), rtol=1e-6)
  # The learning rate is high at the start: routing moves between the first probes.
  assert probes[1]["mean_top1_changed"] > 0.0


def test_analyze_writes_traces_report_and_plots(analyzed):
  out = os.path.join(analyzed, "analysis")
  for name in ("analysis.md", "analysis.json", "routing.html", "sch.png", "affinity.png",
               "coactivation.png", "drops.png", "fluctuation.png", "load.png"):
    assert os.path.exists(os.path.join(out, name)), name
  a, b = (traces.load(os.path.join(out, f"trace_validation_{TOKENS}_step{s}.npz"))
          for s in (10, 20))
  assert a.experts.shape == b.experts.shape == (2, TOKENS, 2)
  np.testing.assert_array_equal(a.token_ids, b.token_ids)   # the same tokens each time
  assert a.meta["step"] == 10 and b.meta["step"] == 20 and b.num_experts == 4
  # top-2 of 4 experts, dropless: every token has two distinct experts, all kept.
  assert np.all(np.sort(b.experts, axis=-1)[..., 0] < np.sort(b.experts, axis=-1)[..., 1])
  assert b.kept.all()
  # Each token's router entropy over 4 experts lies in [0, ln 4], recorded for all.
  assert b.router_entropy.shape == (2, TOKENS)
  assert np.all((b.router_entropy >= 0) & (b.router_entropy <= np.log(4) + 1e-5))
  data = json.load(open(os.path.join(out, "analysis.json"), encoding="utf-8"))
  assert data["steps"] == [10, 20] and data["tokens"] == TOKENS
  move = data["fluctuation"][0]
  changed = np.mean(a.experts[:, :, 0] != b.experts[:, :, 0], axis=1)
  np.testing.assert_allclose(move["top1_changed"], changed, rtol=1e-6)
  load = np.bincount(b.experts[0].reshape(-1), minlength=4)
  assert data["layers"]["layer_0"]["load"] == load.tolist()
  np.testing.assert_allclose(data["balance_over_checkpoints"]["router_entropy"][1],
                             b.router_entropy.mean(axis=1), rtol=1e-5)
  report = open(os.path.join(out, "analysis.md"), encoding="utf-8").read()
  assert "## Local routing consistency" in report and "layer_0->layer_1" in report
  assert "10 -> 20" in report


def test_analyze_again_reuses_the_traces(analyzed):
  path = os.path.join(analyzed, "analysis", f"trace_validation_{TOKENS}_step20.npz")
  before = os.stat(path).st_mtime_ns
  assert analyze.main(["--workdir", analyzed, "--tokens", str(TOKENS), "--step", "20"]) == 0
  assert os.stat(path).st_mtime_ns == before


def _error(capsys, *argv) -> str:
  assert analyze.main(list(argv)) == 1
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1, lines
  return lines[0]


def test_bad_input_is_one_line(analyzed, tmp_path, capsys):
  assert "does not exist" in _error(capsys, "--workdir", str(tmp_path / "nope"))
  assert "has no config.json" in _error(capsys, "--workdir", str(tmp_path))
  assert "--step 7: no checkpoint at that step" in _error(
      capsys, "--workdir", analyzed, "--step", "7")
  assert "saved steps: 10, 20" in _error(capsys, "--workdir", analyzed, "--step", "7")
  assert "--tokens must be at least 1" in _error(capsys, "--workdir", analyzed, "--tokens",
                                                 "0")

  empty = tmp_path / "no_checkpoints"
  empty.mkdir()
  shutil.copy(os.path.join(analyzed, "config.json"), empty / "config.json")
  assert "no checkpoint to analyse" in _error(capsys, "--workdir", str(empty))

  dense = tmp_path / "dense"
  dense.mkdir()
  config = json.load(open(os.path.join(analyzed, "config.json"), encoding="utf-8"))
  config["model"]["moe_every"] = 0
  json.dump(config, open(dense / "config.json", "w", encoding="utf-8"))
  assert "dense model" in _error(capsys, "--workdir", str(dense))


def test_a_trace_of_another_model_is_refused_and_kept(analyzed, capsys):
  path = os.path.join(analyzed, "analysis", f"trace_validation_{TOKENS}_step20.npz")
  original = traces.load(path)
  other = traces.RoutingTrace(**{**original.__dict__,
                                 "meta": {**original.meta, "model_digest": "0" * 16}})
  traces.save(other, path)
  try:
    before = open(path, "rb").read()
    line = _error(capsys, "--workdir", analyzed, "--tokens", str(TOKENS), "--step", "20")
    assert "is a trace of another model digest" in line and path in line
    assert open(path, "rb").read() == before
  finally:
    traces.save(original, path)


def _checkpoint_files(workdir):
  out = {}
  for root, _, files in os.walk(os.path.join(workdir, "checkpoints")):
    for f in files:
      path = os.path.join(root, f)
      out[path] = os.path.getmtime(path)
  return out


def test_intervene_cli_writes_reports_beside_the_checkpoint(run, capsys):
  from moejax import intervene
  before = _checkpoint_files(run)
  for method, extra in (("oracle", ["--strengths", "3"]),
                        ("reroute", ["--steps", "2"]),
                        ("steer", ["--domain", "1", "--top", "1"]),
                        ("roma", ["--train_rows", "8", "--roma_steps", "2",
                                  "--neighbours", "2"])):
    assert intervene.main(["--workdir", run, "--method", method, "--rows", "4", *extra]) == 0
    path = capsys.readouterr().out.strip()
    assert path == os.path.join(run, "interventions", f"{method}_step20.md")
    with open(path.replace(".md", ".json"), encoding="utf-8") as f:
      data = json.load(f)
    assert data["rows"]["rows"] == 4
  assert data["change"]["roma"]["low"] <= data["change"]["roma"]["mean"]
  assert os.path.exists(os.path.join(run, "interventions", "roma_step20_roma.msgpack"))
  assert _checkpoint_files(run) == before            # only read


@pytest.mark.parametrize("argv,message", [
    (["--method", "steer"], "--method steer needs --domain"),
    (["--method", "oracle", "--rows", "0"], "--rows must be at least 1"),
    (["--method", "oracle", "--step", "3"], "--step 3: no checkpoint at that step"),
    (["--method", "reroute", "--layers", "layer_9"], "layers: layer_9"),
])
def test_intervene_cli_errors_name_the_argument(run, capsys, argv, message):
  from moejax import intervene
  assert intervene.main(["--workdir", run, *argv]) == 1
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err.startswith("intervene error:") and message in err


def test_intervene_refuses_a_dense_checkpoint(analyzed, tmp_path, capsys):
  from moejax import intervene
  dense = tmp_path / "dense"
  dense.mkdir()
  config = json.load(open(os.path.join(analyzed, "config.json"), encoding="utf-8"))
  config["model"]["moe_every"] = 0
  json.dump(config, open(dense / "config.json", "w", encoding="utf-8"))
  assert intervene.main(["--workdir", str(dense), "--method", "oracle"]) == 1
  assert "holds a dense model" in capsys.readouterr().err

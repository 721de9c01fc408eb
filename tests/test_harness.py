"""The experiment harness: resumable grids, spreads, paired t intervals, verdicts
from intervals, and readings marked stale when the data under them change."""
from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "experiments"))
import harness  # noqa: E402  (experiments/)


def test_paired_interval_by_hand():
  # d = [1, 2, 3]: mean 2, sd 1, se 1/sqrt(3); t_{0.975, 2} = 4.303:
  # 2 +- 4.303 / sqrt(3) = 2 +- 2.4843.
  out = harness.paired_interval([1.0, 2.0, 3.0])
  assert out["n"] == 3 and out["mean"] == 2.0
  np.testing.assert_allclose([out["low"], out["high"]], [2 - 2.48434, 2 + 2.48434], atol=1e-4)
  assert harness.paired_interval([0.5])["low"] is None
  assert harness.t_quantile(1) == 12.706 and harness.t_quantile(100) == 1.960
  with pytest.raises(ValueError, match="degrees of freedom"):
    harness.t_quantile(0)


def test_spread_by_hand():
  out = harness.spread([1.0, 3.0])
  assert out == {"n": 2, "mean": 2.0, "std": math.sqrt(2.0), "min": 1.0, "max": 3.0}
  assert harness.spread([4.0])["std"] is None and harness.spread([])["mean"] is None


@pytest.mark.parametrize("low,high,claim,margin,want", [
    (-0.3, -0.1, "lower", None, "holds"),
    (0.1, 0.3, "lower", None, "does not hold"),
    (-0.1, 0.1, "lower", None, "cannot tell"),
    (0.1, 0.3, "higher", None, "holds"),
    (-0.3, -0.1, "higher", None, "does not hold"),
    (-0.02, 0.01, "no_worse", 0.03, "holds"),        # below the baseline's spread
    (-0.02, 0.05, "no_worse", 0.03, "cannot tell"),
    (0.01, 0.05, "no_worse", 0.03, "does not hold"),  # worse beyond noise
    (None, None, "lower", None, "cannot tell"),
])
def test_verdicts_come_from_the_interval(low, high, claim, margin, want):
  assert harness.verdict({"low": low, "high": high}, claim, margin) == want


def test_verdict_arguments_are_checked():
  with pytest.raises(ValueError, match="claim must be one of"):
    harness.verdict({"low": 0, "high": 1}, "better")
  with pytest.raises(ValueError, match="needs a margin"):
    harness.verdict({"low": 0, "high": 1}, "no_worse")
  with pytest.raises(ValueError, match="baseline 'x' is not one of the arms"):
    harness.Grid(name="g", arms=["a"], baseline="x", datasets=["d"])


@hypothesis.given(diffs=st.lists(st.floats(-5, 5), min_size=2, max_size=12))
def test_interval_contains_the_mean_and_shrinks_with_agreement(diffs):
  out = harness.paired_interval(diffs)
  assert out["low"] <= out["mean"] + 1e-9 and out["mean"] <= out["high"] + 1e-9
  same = harness.paired_interval([diffs[0]] * len(diffs))
  np.testing.assert_allclose([same["low"], same["high"]], diffs[0], atol=1e-9)


def _fake_run(calls):
  def run_one(arm, dataset, seed):
    calls.append((arm, dataset, seed))
    base = {"a": 1.0, "b": 0.9, "c": 1.0}[arm]
    return {"final": {"loss": base + 0.01 * seed + (0.001 * seed * seed if arm == "c" else 0)},
            "evals": [{"step": 1, "loss": base}]}
  return run_one


def test_grid_runs_every_cell_once_resumes_and_compares(tmp_path):
  path = str(tmp_path / "grid.json")
  grid = harness.Grid(name="g", arms=["a", "b", "c"], baseline="a", datasets=["d"],
                      seeds={"a": 5, "*": 3})
  assert len(grid.cells()) == 5 + 3 + 3
  assert grid.cells()[:3] == [("a", "d", 0), ("b", "d", 0), ("c", "d", 0)]   # seed-major
  calls = []
  # Interrupted after 4 runs: the JSON keeps them.
  partial = harness.Grid(name="g", arms=["a", "b", "c"], baseline="a", datasets=["d"],
                         seeds={"a": 2, "*": 1})
  harness.run_grid(partial, _fake_run(calls), path, log=io.StringIO())
  assert len(calls) == 4 and len(harness.load(path)["runs"]) == 4
  data = harness.run_grid(grid, _fake_run(calls), path, log=io.StringIO())
  assert len(calls) == 11                                  # 7 more, none twice
  assert sorted(set(calls)) == sorted(grid.cells())
  with open(path, encoding="utf-8") as f:
    assert json.load(f)["runs"][0]["evals"] == [{"step": 1, "loss": 1.0}]
  out = harness.compare(data, "loss", "d")
  assert out["a"]["spread"]["n"] == 5 and out["a"]["paired"] is None
  # b = a - 0.1 on every seed: the interval is a point at -0.1.
  np.testing.assert_allclose([out["b"]["paired"]["low"], out["b"]["paired"]["high"]],
                             -0.1, atol=1e-9)
  assert out["b"]["paired"]["seeds"] == [0, 1, 2]
  assert harness.claim_verdict(out, "b", "lower", "a") == "holds"
  # c - a = 0.001 s^2 = [0, .001, .004]: mean .00167, above 0 but tiny; no worse
  # than a within a's seed spread (sd of 1.00..1.04 = 0.0158).
  assert harness.claim_verdict(out, "c", "no_worse", "a") == "holds"
  assert harness.claim_verdict(out, "c", "lower", "a") == "cannot tell"
  with pytest.raises(ValueError, match="holds grid 'g', not 'other'"):
    harness.run_grid(harness.Grid(name="other", arms=["a"], baseline="a", datasets=["d"]),
                     _fake_run([]), path, log=io.StringIO())


def test_reading_is_kept_and_marked_stale_when_its_data_change(tmp_path):
  path = str(tmp_path / "report.md")
  first = harness.digest({"runs": [1]})
  assert not harness.write_report(path, ["# Report", "| a | 1 |"], first)
  with open(path, "a", encoding="utf-8") as f:
    f.write(f"\n## Reading\n\n{harness.DIGEST_MARK.format(digest=first)}\nA is 1.\n")
  assert not harness.write_report(path, ["# Report", "| a | 1 |"], first)
  text = open(path, encoding="utf-8").read()
  assert "A is 1." in text and "Stale" not in text
  second = harness.digest({"runs": [2]})
  assert harness.write_report(path, ["# Report", "| a | 2 |"], second)
  text = open(path, encoding="utf-8").read()
  assert "| a | 2 |" in text and "A is 1." in text
  assert f"(digest {first}, now {second})" in text
  # Written again on the same new data: still stale, marked once, the file as it was.
  assert harness.write_report(path, ["# Report", "| a | 2 |"], second)
  assert open(path, encoding="utf-8").read() == text


def test_claims_between_any_two_arms(tmp_path):
  data = harness.run_grid(
      harness.Grid(name="g", arms=["a", "b", "c"], baseline="a", datasets=["d"], seeds=3),
      _fake_run([]), str(tmp_path / "g.json"), log=io.StringIO())
  # b - c = -0.1 on every seed: b lower than c holds; c lower than b does not.
  assert harness.claim(data, "loss", "d", "b", "c", "lower")["verdict"] == "holds"
  assert harness.claim(data, "loss", "d", "c", "b", "lower")["verdict"] == "does not hold"
  out = harness.claim(data, "loss", "d", "c", "b", "no_worse")
  assert out["verdict"] == "does not hold" and out["interval"]["seeds"] == [0, 1, 2]


def test_processes_sharing_a_grid_skip_claimed_cells_and_merge_their_runs(tmp_path):
  path = str(tmp_path / "grid.json")
  grid = harness.Grid(name="g", arms=["a", "b"], baseline="a", datasets=["d"], seeds=2)
  claims = path + ".claims"
  os.makedirs(claims)
  with open(os.path.join(claims, "b__d__0"), "w", encoding="utf-8") as f:
    f.write(str(os.getppid()))        # a running process holds this cell
  ended = subprocess.Popen([sys.executable, "-c", "pass"])
  ended.wait()
  with open(os.path.join(claims, "a__d__1"), "w", encoding="utf-8") as f:
    f.write(str(ended.pid))           # its process ended: the claim is taken over
  outside = {"arm": "b", "dataset": "d", "seed": 1, "final": {"loss": 7.0}}
  calls = []

  def run_one(arm, dataset, seed):
    # Another process finishes a run while this one trains: it must survive the save.
    if not calls:
      data = harness.load(path)
      data["runs"].append(outside)
      harness.save(path, data)
    return _fake_run(calls)(arm, dataset, seed)

  harness.run_grid(grid, run_one, path, log=io.StringIO())
  assert calls == [("a", "d", 0), ("a", "d", 1)]     # b0 is claimed, b1 was done meanwhile
  runs = {(r["arm"], r["seed"]): r["final"]["loss"] for r in harness.load(path)["runs"]}
  assert runs == {("a", 0): 1.0, ("a", 1): 1.01, ("b", 1): 7.0}
  assert os.listdir(claims) == ["b__d__0"]           # this process's claims are released
  os.remove(os.path.join(claims, "b__d__0"))         # that process stopped
  harness.run_grid(grid, _fake_run(calls), path, log=io.StringIO())
  assert calls[2:] == [("b", "d", 0)] and len(harness.load(path)["runs"]) == 4


def test_grid_main_runs_the_chosen_cells_and_refuses_a_missing_report(tmp_path, monkeypatch,
                                                                       capsys):
  out = str(tmp_path / "grid")
  calls, written = [], []

  def run(arm, dataset, seed, args):
    calls.append((arm, dataset, seed, args.steps))
    return {"final": {"loss": 1.0 + seed}}

  def main(*argv):
    monkeypatch.setattr(sys, "argv", ["grid", "--out", out, *argv])
    return harness.grid_main("a grid", "grid", "base", ("base", "other", "third"),
                             ("d1", "d2"), run, lambda data, args: written.append(args.out),
                             arms_flag="methods", default_baseline_seeds=3)

  with pytest.raises(SystemExit):
    main("--report_only")
  assert "--report_only: " + out + ".json does not exist" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    main("--methods", "other")                      # the baseline must be chosen
  assert "--methods must include base" in capsys.readouterr().err

  data = main("--methods", "base,other", "--datasets", "d2", "--seeds", "2", "--steps", "7")
  # Seed-major: base seeds 0-2 (3 by default), other seeds 0-1, all on d2 with 7 steps.
  assert sorted(calls) == sorted([("base", "d2", s, 7) for s in range(3)]
                                 + [("other", "d2", s, 7) for s in range(2)])
  assert len(data["runs"]) == 5 and written and written[-1] == out
  calls.clear()
  main("--methods", "base,other", "--datasets", "d2", "--seeds", "2")   # resumes: nothing left
  assert calls == []
  assert len(main("--report_only")["runs"]) == 5


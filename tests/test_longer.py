"""experiments/longer.py: which 600-step claims are rerun, how the rerun is
dispatched to its grid, and the side-by-side report, on hand-made grid JSON."""
from __future__ import annotations

import argparse
import math
import os
import sys
import types

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments"))

import harness  # noqa: E402  (experiments/)
import longer  # noqa: E402

T2 = 4.303  # t_{0.975, 2}


def _grid(name, baseline, losses):
  """A grid JSON with {arm: [loss of seed 0, 1, ...]} on stdlib_text."""
  runs = [{"arm": arm, "dataset": "stdlib_text", "seed": s, "final": {"loss": v}}
          for arm, values in losses.items() for s, v in enumerate(values)]
  return {"grid": name, "baseline": baseline, "arms": list(losses),
          "datasets": ["stdlib_text"], "meta": {"steps": 600}, "runs": runs}


def _results(tmp_path):
  # balance: d = [+0.01, -0.02, +0.03], an interval across 0 -> both balance
  # claims undecided. router_zoo: random - topk = [0.10, 0.11, 0.12] > 0 beyond
  # noise -> decided (does not hold); sinkhorn = topk exactly -> sd 0, decided.
  # granularity: 2 seeds only -> its grid is unfinished.
  base = [2.0, 2.1, 2.2]
  grids = {
      "balance": _grid("balance", "none", {
          "switch_microbatch": base,
          "switch_global": [b + d for b, d in zip(base, (0.01, -0.02, 0.03))],
          "aux_free": [b + d for b, d in zip(base, (0.2, -0.1, 0.05))]}),
      "router_zoo": _grid("router_zoo", "topk", {
          "topk": base, "random": [b + d for b, d in zip(base, (0.10, 0.11, 0.12))],
          "sinkhorn": [b - 0.05 for b in base]}),
      "granularity": _grid("granularity", "m1", {"m1": [2.0, 2.1], "m4": [1.9, 2.2]}),
  }
  for name, data in grids.items():
    harness.save(str(tmp_path / f"{name}.json"), data)
  return str(tmp_path)


def test_only_claims_undecided_over_three_seeds_are_rerun(tmp_path):
  results = _results(tmp_path)
  by_name = {c.name: c for c in longer.CANDIDATES}
  states = {name: longer.status(c, results) for name, c in by_name.items()}
  assert states == {"random_vs_topk": "decided", "sinkhorn_vs_topk": "decided",
                    "global_vs_micro": "undecided", "aux_free_vs_switch": "undecided",
                    "m4_vs_m1": "short grid unfinished"}
  picked = longer.undecided(longer.CANDIDATES, results)
  assert [c.name for c in picked] == ["global_vs_micro", "aux_free_vs_switch"]
  # Both claims share their reference, listed once and first.
  assert longer.arms_of(picked) == ["balance/switch_microbatch", "balance/switch_global",
                                    "balance/aux_free"]
  short = longer.short_claim(by_name["global_vs_micro"], results)["interval"]
  sd = math.sqrt(((0.01 - 0.02 / 3) ** 2 + (-0.02 - 0.02 / 3) ** 2
                  + (0.03 - 0.02 / 3) ** 2) / 2)
  assert math.isclose(short["mean"], 0.02 / 3, abs_tol=1e-12)
  assert math.isclose(short["high"] - short["mean"], T2 * sd / math.sqrt(3), rel_tol=1e-9)


def test_an_arm_runs_with_its_grids_run_in_its_own_workdir(tmp_path, monkeypatch):
  calls = []
  fake = types.ModuleType("balance")
  fake.run = lambda arm, dataset, seed, args: calls.append(
      (arm, dataset, seed, args.workdir, args.steps)) or {"final": {"loss": 1.0}}
  monkeypatch.setitem(sys.modules, "balance", fake)
  args = argparse.Namespace(workdir=str(tmp_path), steps=2400, data_dir="/data")
  assert longer.run("balance/aux_free", "stdlib_text", 2, args) == {"final": {"loss": 1.0}}
  assert calls == [("aux_free", "stdlib_text", 2, os.path.join(str(tmp_path), "balance"),
                    2400)]
  assert args.workdir == str(tmp_path)  # the caller's namespace is left alone


def test_report_puts_both_lengths_side_by_side(tmp_path):
  results = _results(tmp_path)
  # At 2400 steps: switch_global - switch_microbatch = [-1, -2, -3]: mean -2,
  # sd 1, half-width 4.303 / sqrt(3) = 2.484 -> [-4.484, +0.484], cannot tell.
  data = _grid("longer", "balance/switch_microbatch", {
      "balance/switch_microbatch": [10.0, 20.0, 30.0],
      "balance/switch_global": [9.0, 18.0, 27.0],
      "balance/aux_free": [10.0, 20.0, 30.0]})
  data["meta"] = {"steps": 2400, "machine": "test"}
  out = str(tmp_path / "longer.md")
  longer.write_report(out, data, argparse.Namespace(steps=2400), results=results)
  text = open(out, encoding="utf-8").read()
  rows = {line.split(" | ")[0][2:]: line for line in text.splitlines() if line.startswith("| ")}
  glob = rows[longer.CANDIDATES[2].text]
  assert "| −" not in glob and "-2.0000 [-4.4843, +0.4843] (3) | cannot tell |" in glob
  # aux_free = reference at every seed: d = 0, sd 0 -> interval [0, 0], below the
  # reference's seed sd (10) -> no_worse holds.
  assert "+0.0000 [+0.0000, +0.0000] (3) | holds |" in rows[longer.CANDIDATES[3].text]
  assert "not rerun: decided" in rows[longer.CANDIDATES[0].text]
  assert "not rerun: short grid unfinished" in rows[longer.CANDIDATES[4].text]
  assert rows["balance/switch_microbatch"].endswith(
      "| 2.1000 ± 0.1000 (3) | 20.0000 ± 10.0000 (3) |")


def test_unknown_claim_is_refused_naming_the_flag(monkeypatch, capsys):
  monkeypatch.setattr(sys, "argv", ["longer.py", "--claims", "random_vs_topk,faster"])
  try:
    longer.main()
  except SystemExit as exit_:
    assert exit_.code == 2
  else:
    raise AssertionError("an unknown claim was accepted")
  assert "--claims: unknown ['faster']" in capsys.readouterr().err


def test_arms_of_the_same_config_run_once():
  import granularity  # pylint: disable=import-outside-toplevel
  import router_zoo  # pylint: disable=import-outside-toplevel
  assert longer.SAME_CONFIG == {"granularity/m1": "router_zoo/topk"}
  for steps in (600, 2400):
    one = granularity.run_config("m1", "stdlib_text", 1, steps, "/data")
    other = router_zoo.run_config("topk", argparse.Namespace(steps=steps, data_dir="/data"),
                                  1, "stdlib_text")
    assert one.to_dict() == other.to_dict()
  by_name = {c.name: c for c in longer.CANDIDATES}
  assert longer.arms_of([by_name["random_vs_topk"], by_name["m4_vs_m1"]]) == [
      "router_zoo/topk", "router_zoo/random", "granularity/m4"]

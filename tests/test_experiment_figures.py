"""Figures the experiment reports derive: throughput.py's cost section from a
hand-made timing JSON, granularity.py's MI share of its bound."""
from __future__ import annotations

import math
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments"))

import granularity  # noqa: E402  (experiments/)
import harness  # noqa: E402
import throughput  # noqa: E402


def _row(arm, state, median, q1, q3, ratio, epts):
  return {"arm": arm, "state": state, "tokens_per_s_median": median, "tokens_per_s_q1": q1,
          "tokens_per_s_q3": q3, "tokens_per_s": [q1, median, q3],
          "ratio_to_baseline": ratio, "experts_per_token": epts}


def test_section_names_the_baseline_and_gives_both_states(tmp_path):
  path = str(tmp_path / "balance_throughput.json")
  harness.save(path, {
      "meta": {"machine": "m", "grid": "balance", "baseline": "none",
               "dataset": "stdlib_text", "seed": 2, "rounds": 7, "steps_per_round": 5,
               "command": "python experiments/throughput.py --grid balance"},
      "results": [_row("none", "init", 6000, 5000, 7000, 1.0, 2.0),
                  _row("none", "trained", 6100, 5100, 7100, 1.0, 2.0),
                  _row("switch_global", "init", 4500.4, 4000, 5000, 0.754, 2.0),
                  _row("switch_global", "trained", 4600, 4100, 5100, 0.7449, 2.0),
                  _row("erc", "init", 5000, 4500, 5500, 0.83, 2.0)]})
  lines = throughput.report_lines(path)
  assert "× none init | × none trained |" in lines[4]
  assert "(seed 2)" in lines[2] and "(7 rounds of 5 steps each)" in lines[2]
  rows = [l for l in lines if l.startswith("| ") and not l.startswith("| arm")]
  assert rows == ["| none | 2.00 → 2.00 | 6,000 [5,000, 7,000] | 6,100 [5,100, 7,100] | "
                  "1.00 | 1.00 |",
                  "| switch_global | 2.00 → 2.00 | 4,500 [4,000, 5,000] | "
                  "4,600 [4,100, 5,100] | 0.75 | 0.74 |"]  # erc lacks its trained state


def test_section_says_when_not_measured(tmp_path):
  lines = throughput.report_lines(str(tmp_path / "balance_throughput.json"))
  assert lines[2] == ("Not measured yet: run experiments/throughput.py (writes "
                      "balance_throughput.json).")


def test_mi_share_divides_by_the_log_of_each_arms_routed_experts():
  data = {"runs": [{"arm": "m1", "final": {"domain_expert_mi": 0.5}},
                   {"arm": "m4_shared", "final": {"domain_expert_mi": 0.5}},
                   {"arm": "m2", "final": {"loss": 1.0}}]}
  shares = [r["final"].get("domain_expert_mi_share")
            for r in granularity.with_mi_share(data)["runs"]]
  assert shares[0] == 0.5 / math.log(8) and shares[1] == 0.5 / math.log(31)
  assert shares[2] is None
  assert "domain_expert_mi_share" not in data["runs"][0]["final"]  # the input is left alone

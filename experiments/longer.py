"""The loss comparisons still undecided at 600 steps, rerun at 4x the steps.

  PYTHONPATH=. TFDS_DATA_DIR=/tmp/tfds python experiments/longer.py [--steps 2400] \\
      [--seeds 3] [--claims all] [--workdir DIR] [--report_only]

Each candidate in CANDIDATES is a loss claim of one grid (router_zoo, balance,
granularity) on stdlib_text, the dataset whose loss is not at its floor after 600
steps (synthetic_domains' arms end within a few thousandths of a nat of each
other). A candidate is decided first on its grid's committed 600-step JSON
(experiments/results/<grid>.json); those whose verdict there is "cannot tell"
over at least 3 paired seeds are rerun here: both arms, the same config, data
order and seeds, with --steps training steps (the learning-rate schedule
stretched to them). Arms are named <grid>/<arm> in longer.json (an arm whose
config is another's, SAME_CONFIG, runs once under that other name), on the
harness (experiments/harness.py: every run saved at once, a rerun resuming).
longer.md gives each claim's 600-step and longer interval and verdict side by
side. About 9 to 10 minutes per run on an idle 2-core CPU at 2400 steps (random
routing twice that); 13 to 21 minutes each with two processes sharing the grid.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any, Mapping, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import harness  # noqa: E402  (experiments/)

DATASET = "stdlib_text"
TOKENS_PER_STEP = 16 * 128      # lm_tiny's batch, in every grid
RESULTS = os.path.join(REPO, "experiments", "results")


@dataclasses.dataclass(frozen=True)
class Candidate:
  """A loss claim of `grid`: `arm` against `reference`, of kind lower / no_worse."""
  name: str
  grid: str
  arm: str
  reference: str
  kind: str
  text: str


CANDIDATES = (
    Candidate("random_vs_topk", "router_zoo", "random", "topk", "no_worse",
              "random routing is no worse than learned top-k (THOR 2021)"),
    Candidate("sinkhorn_vs_topk", "router_zoo", "sinkhorn", "topk", "no_worse",
              "Sinkhorn assignment is no worse than top-k (BASE 2021)"),
    Candidate("global_vs_micro", "balance", "switch_global", "switch_microbatch", "lower",
              "global-batch balancing lowers the loss (Demons in the Detail, 2025)"),
    Candidate("aux_free_vs_switch", "balance", "aux_free", "switch_microbatch", "no_worse",
              "the aux-free bias is no worse than the switch loss (DeepSeek 2024)"),
    Candidate("m4_vs_m1", "granularity", "m4", "m1", "lower",
              "4x finer experts lower the loss (DeepSeekMoE 2024)"),
)


# Arms whose config is another grid's arm's, field for field (tests/test_longer.py
# checks it): they run once, under the other name.
SAME_CONFIG = {"granularity/m1": "router_zoo/topk"}


def arm_name(grid: str, arm: str) -> str:
  """<grid>/<arm>, or the arm of the same config that runs in its place."""
  name = f"{grid}/{arm}"
  return SAME_CONFIG.get(name, name)


def short_data(grid: str, results: str = RESULTS) -> dict[str, Any]:
  """The committed 600-step grid JSON (empty when not committed)."""
  return harness.load(os.path.join(results, f"{grid}.json"))


def short_claim(candidate: Candidate, results: str = RESULTS) -> dict[str, Any]:
  """{"interval", "verdict"} of the candidate on its grid's committed runs."""
  data = short_data(candidate.grid, results)
  if not data["runs"]:
    return {"interval": {"n": 0, "mean": None, "low": None, "high": None, "seeds": []},
            "verdict": "cannot tell"}
  return harness.claim(data, "loss", DATASET, candidate.arm, candidate.reference,
                       candidate.kind)


def long_claim(candidate: Candidate, data: Mapping[str, Any]) -> dict[str, Any]:
  return harness.claim(data, "loss", DATASET, arm_name(candidate.grid, candidate.arm),
                       arm_name(candidate.grid, candidate.reference), candidate.kind)


def status(candidate: Candidate, results: str = RESULTS, seeds: int = 3) -> str:
  """"decided" (its 600-step verdict holds or does not hold), "undecided" (cannot
  tell over at least `seeds` paired seeds) or "short grid unfinished"."""
  short = short_claim(candidate, results)
  if short["verdict"] != "cannot tell":
    return "decided"
  return "undecided" if short["interval"]["n"] >= seeds else "short grid unfinished"


def undecided(candidates: Sequence[Candidate], results: str = RESULTS) -> list[Candidate]:
  """The candidates that cannot be told apart over the 600-step grid's seeds."""
  return [c for c in candidates if status(c, results) == "undecided"]


def arms_of(candidates: Sequence[Candidate]) -> list[str]:
  """<grid>/<arm> of every arm the candidates compare, references first."""
  names = []
  for c in candidates:
    for arm in (c.reference, c.arm):
      if arm_name(c.grid, arm) not in names:
        names.append(arm_name(c.grid, arm))
  return names


def run(name: str, dataset: str, seed: int, args) -> dict[str, Any]:
  """Trains arm <grid>/<arm> with its grid's own run(), in <workdir>/<grid>."""
  grid, arm = name.split("/")
  module = __import__(grid)
  grid_args = argparse.Namespace(**{**vars(args), "workdir": os.path.join(args.workdir, grid)})
  return module.run(arm, dataset, seed, grid_args)


def write_report(path: str, data, args, results: str = RESULTS) -> None:
  f, fi = harness.fmt, harness.fmt_interval
  steps = data.get("meta", {}).get("steps", getattr(args, "steps", None))
  lines = ["# Undecided loss comparisons, rerun longer", "",
           f"`experiments/longer.py` reruns, at {steps} training steps, the loss claims on "
           f"{DATASET} that the 600-step grids could not decide, with both arms' configs, "
           "data order and seeds unchanged (the learning-rate schedule stretched to the "
           "longer run). Every figure below comes from `longer.json` and the grids' "
           "committed JSON, by `experiments/harness.py`.", "",
           "```", f"PYTHONPATH=. TFDS_DATA_DIR=... python experiments/longer.py --steps "
           f"{steps}", "```", "",
           f"Machine: {data.get('meta', {}).get('machine', 'not recorded')}.", "",
           "Δ is the paired difference arm − reference in validation loss (nats per byte) "
           "over the seeds both ran, with its 95% t interval; the verdict rules are the "
           "harness's (a no_worse margin is the reference's own seed standard deviation "
           "at that length).", "",
           "| claim | grid | 600 steps: Δ [95% CI] (seeds) | verdict | "
           f"{steps} steps: Δ [95% CI] (seeds) | verdict |", "|---|---|---|---|---|---|"]
  for c in CANDIDATES:
    short, state = short_claim(c, results), status(c, results)
    if state != "undecided":
      long_text, long_verdict = f"not rerun: {state}", "–"
    else:
      long = long_claim(c, data)
      long_text = f"{fi(long['interval'], 4)} ({len(long['interval']['seeds'])})"
      long_verdict = long["verdict"]
    lines.append(f"| {c.text} | {c.grid} | {fi(short['interval'], 4)} "
                 f"({len(short['interval'].get('seeds', []))}) | {short['verdict']} | "
                 f"{long_text} | {long_verdict} |")
  lines += ["", "Validation loss per arm, mean ± standard deviation over seeds (n):", "",
            f"| arm | 600 steps | {steps} steps |", "|---|---|---|"]
  for name in data.get("arms", []):
    grid, arm = name.split("/")
    short = harness.spread(list(harness.values_by_seed(short_data(grid, results), "loss",
                                                       DATASET, arm).values()))
    long = harness.spread(list(harness.values_by_seed(data, "loss", DATASET,
                                                      name).values()))
    lines.append(f"| {name} | {f(short['mean'], 4)} ± {f(short['std'], 4)} ({short['n']}) | "
                 f"{f(long['mean'], 4)} ± {f(long['std'], 4)} ({long['n']}) |")
  tokens = f"{steps * TOKENS_PER_STEP / 1e6:.1f} million" if steps else "a few million"
  lines += ["", f"What this scale cannot test: {steps} steps are {tokens} training tokens "
            "(16 rows of 128 bytes a step) of a 2-block byte-level model on CPU; the papers' "
            "claims were "
            "made at billions of tokens and hundreds of millions of parameters or more. A "
            "verdict that changes with length says the 600-step one was premature, not "
            "what happens at scale.", ""]
  harness.write_report(path, lines, harness.digest(data["runs"]))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  harness.add_grid_arguments(parser, baseline="each claim's reference", default_seeds=3,
                             default_baseline_seeds=3)
  parser.set_defaults(steps=2400)
  parser.add_argument("--claims", default="all",
                      help=f"comma-separated, of {[c.name for c in CANDIDATES]}")
  harness.add_path_arguments(parser, "longer")
  args = parser.parse_args()
  names = harness.chosen(parser, "claims", args.claims, [c.name for c in CANDIDATES])
  picked = undecided([c for c in CANDIDATES if c.name in names])
  if not picked and not args.report_only:
    parser.error("--claims: no chosen claim is undecided over 3 seeds at 600 steps "
                 f"({[(c.name, status(c)) for c in CANDIDATES if c.name in names]}); "
                 "nothing to rerun")
  arms = arms_of(picked)
  args.baseline_seeds = args.seeds  # every arm is some claim's reference or arm
  harness.run_or_load(parser, args, "longer", arms, arms[0] if arms else "", [DATASET],
                      lambda arm, dataset, seed: run(arm, dataset, seed, args),
                      lambda data: write_report(args.out + ".md", data, args),
                      harness.machine_description())


if __name__ == "__main__":
  main()

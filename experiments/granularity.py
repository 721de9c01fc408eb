"""Fine-grained and shared experts (DeepSeekMoE) at equal active and total parameters.

  PYTHONPATH=. TFDS_DATA_DIR=/tmp/tfds python experiments/granularity.py [--steps 600] \\
      [--seeds 3] [--baseline_seeds 3] [--datasets synthetic_domains,stdlib_text] \\
      [--arms all] [--workdir DIR] [--report_only]

DeepSeekMoE (Dai et al. 2024) splits each of E experts of width F into m experts
of width F/m and routes each token to mK of the mE (fine-grained expert
segmentation), and isolates shared experts that every token uses, taking them from
the routed ones so that active and total parameters stay fixed. The arms, on
lm_tiny (E = 8, K = 2, F = 256, switch loss at the micro-batch scope):

  m1, m2, m4                     E = 8m routed experts of width 256/m, K = 2m
  m1_shared, m2_shared, m4_shared  one shared expert of width 256/m, and 8m - 1
                                 routed experts of that width with K = 2m - 1

so every arm runs 2 x 256 expert hidden units per token out of 8 x 256 in all.
The paper's direction: finer experts lower the loss (m2, m4 below m1) and a shared
expert lowers it further (mX_shared below mX); and finer experts specialise more:
MI(domain; expert) on synthetic_domains, whose 8 Markov-chain domains are known.
MI grows with the number of experts it can spread over (at most log of it), so
the report gives it beside its bound and decides the claim both on MI and on
MI / log E. On the harness (experiments/harness.py): every run saved to
<out>.json at once, a rerun resuming, claims decided from paired t intervals
against m1 (and mX_shared against mX). Every claim is a paired
difference over the seeds both arms share, so m1 runs the same 3 seeds as the others.
About 3.5 minutes per run on a 2-core CPU at 600 steps.
"""
from __future__ import annotations

import math
import os
import sys
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import harness  # noqa: E402  (experiments/)
from balance import FULL_VALIDATION, _records, summarise_run  # noqa: E402

DATASETS = ("synthetic_domains", "stdlib_text")
GRANULARITIES = (1, 2, 4)
ARMS = tuple(f"m{m}" for m in GRANULARITIES) + tuple(f"m{m}_shared" for m in GRANULARITIES)


def expert_settings(arm: str, experts: int = 8, top_k: int = 2, width: int = 256
                    ) -> dict[str, int]:
  """The MoE fields of an arm: equal active (top_k * width) and total
  (experts * width) expert hidden units in every arm."""
  m = int(arm.split("_")[0][1:])
  shared = int(arm.endswith("_shared"))
  return {"num_experts": experts * m - shared, "top_k": top_k * m - shared,
          "hidden_dim": width // m, "granularity": 1, "num_shared_experts": shared}


def run_config(arm: str, dataset: str, seed: int, steps: int, data_dir: str):
  from moejax.train import setup  # pylint: disable=g-import-not-at-top
  config = setup.config_from_file(os.path.join(REPO, "configs", "lm_tiny.py"))
  for key, value in expert_settings(arm, config.moe.num_experts, config.moe.top_k,
                                    config.moe.hidden_dim).items():
    config.moe[key] = value
  config.data.name, config.data.data_dir, config.seed = dataset, data_dir, seed
  t = config.train
  t.steps, t.eval_every, t.checkpoint_every, t.log_every = steps, steps, steps, 20
  t.eval_batches = FULL_VALIDATION
  t.warmup_steps = min(t.warmup_steps, steps // 10)
  return config


def run(arm: str, dataset: str, seed: int, args) -> dict[str, Any]:
  """Trains one run (resuming its workdir) and returns its figures for the harness."""
  from moejax.train import train  # pylint: disable=g-import-not-at-top
  workdir = os.path.join(args.workdir, dataset, arm, f"seed{seed}")
  train(run_config(arm, dataset, seed, args.steps, args.data_dir), workdir, progress=False)
  evals = [{k: v for k, v in r.items() if not k.startswith("layers/")}
           for r in _records(workdir) if r["split"] == "eval"]
  return {"steps": args.steps, "experts": expert_settings(arm), "final": summarise_run(workdir),
          "evals": evals}


def claim_tests(arms) -> list[tuple[str, str, str, str, str]]:
  """(figure, arm, reference, claim, text) of the paper's directions among `arms`."""
  tests = []
  for m in GRANULARITIES[1:]:
    tests.append(("loss", f"m{m}", "m1", "lower", f"m = {m} experts lower the loss than m = 1"))
    tests.append(("domain_expert_mi", f"m{m}", "m1", "higher",
                  f"m = {m} experts specialise more by domain than m = 1"))
    tests.append(("domain_expert_mi_share", f"m{m}", "m1", "higher",
                  f"m = {m} experts specialise more by domain than m = 1, as a share of "
                  "the bound log E"))
  for m in GRANULARITIES:
    tests.append(("loss", f"m{m}_shared", f"m{m}", "lower",
                  f"a shared expert lowers the loss at m = {m}"))
  return [t for t in tests if t[1] in arms and t[2] in arms]


def with_mi_share(data) -> dict[str, Any]:
  """The data with each run's `domain_expert_mi_share`: MI(domain; expert) over its
  bound, the log of the run's number of routed experts (finer arms have more
  experts, so a larger MI is within their reach whether or not they specialise)."""
  runs = []
  for run in data["runs"]:
    final = dict(run.get("final", {}))
    if final.get("domain_expert_mi") is not None:
      final["domain_expert_mi_share"] = (final["domain_expert_mi"]
                                         / math.log(expert_settings(run["arm"])["num_experts"]))
    runs.append({**run, "final": final})
  return {**data, "runs": runs}


def write_report(path: str, data, args) -> None:
  data_digest = harness.digest(data["runs"])
  data = with_mi_share(data)
  meta = data.get("meta", {})
  lines = ["# Fine-grained and shared experts (DeepSeekMoE) at equal parameters", "",
           "`experiments/granularity.py` trains lm_tiny (2 MoE blocks, D = 128, switch loss "
           "at the micro-batch scope) with the experts of each arm, per dataset and seed, "
           "with the same data order, steps and schedule. Every arm runs 2 x 256 expert "
           "hidden units per token out of 8 x 256 in all. Every figure below is computed "
           "from `granularity.json` by `experiments/harness.py`.", "",
           "```", f"PYTHONPATH=. TFDS_DATA_DIR=... python experiments/granularity.py --steps "
           f"{meta.get('steps', args.steps)}", "```", "",
           f"Machine: {meta.get('machine', 'not recorded')}.", "",
           "Cells: mean ± standard deviation over seeds, then Δ, the paired difference "
           "against m1 with its 95% t interval. MI(domain; expert) is bounded by the log "
           "of the number of routed experts (given beside it); MI / bound is the share of "
           "that bound reached.", ""]
  for dataset in harness.datasets_with_runs(data):
    loss = harness.compare(data, "loss", dataset)
    mi = harness.compare(data, "domain_expert_mi", dataset)
    share = harness.compare(data, "domain_expert_mi_share", dataset)
    mv = harness.compare(data, "max_violation_eval", dataset)
    lines += [f"## {dataset}", "", "| arm | routed E, K, width, shared | n | val loss | "
              "MI(domain; expert) (bound) | MI / bound | MaxVio eval |", "|---|---|---|---|---|---|---|"]
    for arm in data["arms"]:
      if not loss[arm]["spread"]["n"]:
        continue
      e = expert_settings(arm)
      cell = harness.fmt_cell
      lines.append(f"| {arm} | {e['num_experts']}, {e['top_k']}, {e['hidden_dim']}, "
                   f"{e['num_shared_experts']} | {loss[arm]['spread']['n']} | "
                   f"{cell(loss[arm], 4)} | {cell(mi[arm], 4)} "
                   f"({math.log(e['num_experts']):.2f}) | {cell(share[arm], 4)} | "
                   f"{cell(mv[arm], 3)} |")
    lines += ["", *harness.claim_rows(data, dataset, claim_tests(data["arms"])), ""]
  lines += ["What this scale cannot test: DeepSeekMoE's gains were measured at 2B to "
            "145B parameters over billions of tokens; here 2 MoE blocks of 8 x 256 hidden "
            "units train for 600 steps on CPU, so a verdict is about this setting only.", ""]
  harness.write_report(path, lines, data_digest)


def main() -> None:
  harness.grid_main(__doc__.splitlines()[0], "granularity", "m1", ARMS, DATASETS, run,
                    lambda data, args: write_report(args.out + ".md", data, args),
                    default_baseline_seeds=3)


if __name__ == "__main__":
  main()

"""Routing that remembers and looks around, against top-k at equal active compute.

  PYTHONPATH=. TFDS_DATA_DIR=/tmp/tfds python experiments/router_zoo_2.py [--steps 600] \\
      [--datasets stdlib_text,synthetic_domains] [--seeds 3] [--baseline_seeds 5] \\
      [--arms all] [--workdir DIR] [--out PREFIX] [--report_only]

Trains configs/router_zoo_2.py:<arm> (lm_tiny, E = 8, 2 expert rows per token; see
that file) per arm, dataset and seed on the harness (experiments/harness.py), with
6 evenly spaced checkpoints, and traces the first 8,192 validation tokens at the
last 3 (moejax.analyze). Per run:

  loss, bits/byte       validation (the whole split), after the last step
  tokens/s              training, median over logging windows
  fluctuation           the share of tokens whose top-1 expert changed between
                        consecutive traced checkpoints (the last 3: two
                        intervals of 1/6 of training), mean over intervals and layers
  paths                 distinct expert-set paths across the MoE layers / tokens,
                        at the last checkpoint (RMoE's combination diversity)
  combinations          distinct expert sets per layer / tokens, mean over layers
  srp                   local routing consistency, SRP over segments of 16 tokens,
                        mean over layers (moejax.analysis)
  max_violation         training MaxVio (last quarter), mean over layers

and decides each paper's claim from the paired 95% t interval over seeds against
topk ("holds", "does not hold", "cannot tell"):

  recurrent        lower loss than the per-layer router; more distinct paths
  similarity,      lower routing fluctuation late in training (and not a worse
  attention_aware  loss: no worse than topk's seed spread)
  coe              lower loss than a single pass at equal compute (2 x top-1)
  rexmoe           lower loss at the plain model's expert parameters

The rexmoe arm grows its candidates over the first half of --steps. About 3
minutes per run on a 2-core CPU at 600 steps, analysis included.
"""
from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import harness  # noqa: E402  (experiments/)

ARMS = ("topk", "recurrent", "similarity", "attention_aware", "coe", "rexmoe")
DATASETS = ("stdlib_text", "synthetic_domains")
CHECKPOINTS = 6
TRACED = 3                 # the last checkpoints traced (fluctuation between them)
TRACE_TOKENS = 8192
SEGMENT = 16
FULL_VALIDATION = 100_000  # more batches than the split has: evaluate all of it
CLAIMS = (
    ("loss", "recurrent", "lower", "RMoE: the recurrent router beats a per-layer router"),
    ("paths", "recurrent", "higher", "RMoE: more diverse expert combinations across layers"),
    ("fluctuation", "similarity", "lower", "Graph of tokens: similarity-aware routing "
     "fluctuates less late in training"),
    ("loss", "similarity", "no_worse", "Graph of tokens: similarity-aware routing, loss no worse"),
    ("fluctuation", "attention_aware", "lower", "Graph of tokens: attention-aware routing "
     "fluctuates less late in training"),
    ("loss", "attention_aware", "no_worse", "Graph of tokens: attention-aware routing, loss "
     "no worse"),
    ("loss", "coe", "lower", "Chain-of-Experts: 2 passes of top-1 beat one pass of top-2"),
    ("loss", "rexmoe", "lower", "ReXMoE: reusing the adjacent layer's experts lowers the loss "
     "at fixed expert parameters"),
)
COLUMNS = ("loss", "bits_per_byte", "tokens_per_s", "fluctuation", "paths", "combinations",
           "srp", "max_violation_train")


def run_config(arm: str, dataset: str, seed: int, steps: int, data_dir: str):
  from moejax.train import setup  # pylint: disable=g-import-not-at-top
  config = setup.config_from_file(os.path.join(REPO, "configs", f"router_zoo_2.py:{arm}"))
  config.data.name, config.data.data_dir, config.seed = dataset, data_dir, seed
  t = config.train
  t.steps, t.eval_every, t.log_every = steps, steps, min(20, steps)
  t.eval_batches = FULL_VALIDATION
  t.checkpoint_every = max(steps // CHECKPOINTS, 1)
  t.keep_checkpoints = steps // t.checkpoint_every + 1
  t.probe_every = 0
  t.warmup_steps = min(t.warmup_steps, steps // 10)
  if arm == "rexmoe":
    config.moe.rexmoe.psr_steps = steps // 2
  return config


def trace_figures(traces) -> dict[str, Any]:
  """Fluctuation between consecutive traces; diversity and consistency of the last."""
  from moejax import analysis  # pylint: disable=g-import-not-at-top
  last = traces[-1]
  layers = range(last.num_layers)
  changes = [analysis.routing_fluctuation(a, b) for a, b in zip(traces, traces[1:])]
  return {
      "fluctuation": float(np.mean([c.mean_top1_changed for c in changes])),
      "fluctuation_jaccard": float(np.mean([c.mean_jaccard for c in changes])),
      "paths": analysis.distinct_paths(last).share,
      "combinations": float(np.mean([analysis.distinct_combinations(last, l).share
                                     for l in layers])),
      "srp": float(np.mean([analysis.segment_routing_best_performance(last, l, SEGMENT).value
                            for l in layers])),
      "traced_steps": [t.meta.get("step") for t in traces],
  }


def run(arm: str, dataset: str, seed: int, args) -> dict[str, Any]:
  """Trains one run (resuming its workdir), traces it and returns its figures."""
  from moejax import analyze  # pylint: disable=g-import-not-at-top
  from moejax.train import train  # pylint: disable=g-import-not-at-top
  from router_zoo import summarise_run  # pylint: disable=g-import-not-at-top
  workdir = os.path.join(args.workdir, dataset, arm, f"seed{seed}")
  train(run_config(arm, dataset, seed, args.steps, args.data_dir), workdir, progress=False)
  saved = analyze.run_config(workdir)
  steps = analyze.chosen_steps(workdir, None)[-TRACED:]
  traces = analyze.trace_checkpoints(workdir, steps, TRACE_TOKENS, saved.data.eval_split, saved)
  final = summarise_run(workdir)
  evals = final.pop("evals")
  return {"steps": args.steps, "final": {**final, **trace_figures(traces)}, "evals": evals}


def write_report(path: str, data, args) -> None:
  meta = data.get("meta", {})
  lines = ["# Router zoo II: routing that remembers and looks around", "",
           "`experiments/router_zoo_2.py` trains `configs/router_zoo_2.py:<arm>` per arm, "
           "dataset and seed (lm_tiny: 2 MoE blocks of 8 experts, 2 expert rows per token), "
           f"checkpoints {CHECKPOINTS} times evenly and traces the first {TRACE_TOKENS} "
           f"validation tokens at the last {TRACED}. Every figure below comes from "
           "`router_zoo_2.json`.", "",
           "```", "PYTHONPATH=. TFDS_DATA_DIR=... python experiments/router_zoo_2.py "
           f"--steps {meta.get('steps', args.steps)}", "```", "",
           f"Machine: {meta.get('machine', 'not recorded')}.", "",
           "Cells: mean ± standard deviation over seeds, then Δ, the paired difference "
           "against topk with its 95% t interval. Claims: the verdict from where that "
           "interval lies (`no_worse`: its upper end below topk's own seed standard "
           "deviation). tokens/s are the training runs' medians, one run at a time on a "
           "shared machine: a rough cost, not a benchmark. coe's paths, combinations and "
           "SRP are its first pass's top-1 sets (smaller than the others' top-2 sets: not "
           "comparable), and its experts per token count one pass.", ""]
  for dataset in harness.datasets_with_runs(data):
    comparisons = {n: harness.compare(data, n, dataset) for n in COLUMNS}
    lines += [f"## {dataset}", "", "| arm | n | " + " | ".join(COLUMNS) + " |",
              "|---|---|" + "---|" * len(COLUMNS)]
    for arm in data["arms"]:
      n = comparisons["loss"][arm]["spread"]["n"]
      if n:
        digits = {"tokens_per_s": 0}
        lines.append(f"| {arm} | {n} | " + " | ".join(
            harness.fmt_cell(comparisons[c][arm], digits.get(c, 3)) for c in COLUMNS) + " |")
    lines += ["", *harness.claim_rows(data, dataset, [
        (name, arm, data["baseline"], kind, text) for name, arm, kind, text in CLAIMS]), ""]
  lines += ["What this scale cannot test: the papers trained models of 100M to 10B+ "
            "parameters over billions of tokens, with 16 to 32 MoE layers; here a byte-level "
            "model with 2 MoE layers trains 600 steps on CPU. With 2 MoE layers the recurrent "
            "router's state crosses one layer boundary, and ReXMoE's pool holds the only two "
            "layers; the fluctuation is measured over the last third of a short run, where "
            "routing still moves for every router. Chain-of-Experts' paper compares at its "
            "own scale (64 experts, top-8 against 2 x top-4); here 8 experts, top-2 against "
            "2 x top-1.", ""]
  harness.write_report(path, lines, harness.digest(data["runs"]))


def main() -> None:
  harness.grid_main(__doc__.splitlines()[0], "router_zoo_2", "topk", ARMS, DATASETS, run,
                    lambda data, args: write_report(args.out + ".md", data, args))


if __name__ == "__main__":
  main()

"""Load-balancing methods compared on the tiny LM: loss, balance, specialisation.

  PYTHONPATH=. python experiments/balance.py [--steps 600] [--seeds 3] \\
      [--baseline_seeds 5] [--datasets synthetic_domains,stdlib_text] [--methods all] \\
      [--workdir DIR] [--report_only]

Trains configs/balance.py:<method> per dataset, method and seed on the harness
(experiments/harness.py: resumable, every run saved to <out>.json at once), with
the same data order, steps and schedule (each step 16 rows of 128 tokens as 4
micro-batches), and records per run:

  loss, bits/byte      validation, after the last step
  MaxVio (micro)       training: MaxVio of each micro-batch's load, averaged over the
                       micro-batches, layers and the last quarter of the logged steps
  MaxVio (step)        training: MaxVio of the whole step's load (16 rows), same average
  MaxVio (eval)        validation (the whole split): per batch of 16 rows, averaged
  MaxVio (eval all)    validation: of the load summed over all eval batches
                       (balance on average, which the aux-free bias targets,
                       rather than in every batch)
  MI(domain; expert)   validation: plug-in mutual information between the
                       document's domain and the expert of each assignment, nats,
                       averaged over layers (synthetic_domains: 8 domains;
                       stdlib_text: the top-level stdlib module)
  ERC diagonal         erc: the coupling matrix's diagonal share and ratio (validation)
  evals                every evaluation record

<out>.md gives, per figure, the mean ± standard deviation over seeds and the
paired difference against `none` with its 95% t interval, and decides the two
claims (global vs micro-batch specialisation; aux-free vs switch loss) from paired
intervals (experiments/harness.py); a "## Reading" section at its end is kept and
marked stale when the data under it change. About 3.5 minutes per run on a 2-core
CPU at 600 steps.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import harness  # noqa: E402  (experiments/)

METHODS = ("none", "switch_microbatch", "switch_global", "switch_sequence", "aux_free",
           "aux_free_sequence", "erc")
DATASETS = ("synthetic_domains", "stdlib_text")
# More batches than either validation split has: the evaluation reads the whole
# split (stdlib_text's first 20 batches hold only 3 of its 202 domains).
FULL_VALIDATION = 100_000
ERC_METRICS = ("erc_diagonal_share", "erc_diagonal_ratio")
THROUGHPUT = os.path.join(REPO, "experiments", "results", "balance_throughput.json")


def run_config(method: str, dataset: str, seed: int, steps: int, data_dir: str):
  from moejax.train import setup  # pylint: disable=g-import-not-at-top
  config = setup.config_from_file(os.path.join(REPO, "configs", f"balance.py:{method}"))
  config.data.name = dataset
  config.data.data_dir = data_dir
  config.seed = seed
  t = config.train
  t.steps, t.eval_every, t.checkpoint_every, t.log_every = steps, steps, steps, 20
  t.eval_batches = FULL_VALIDATION
  t.warmup_steps = min(t.warmup_steps, steps // 10)
  return config


def _records(workdir: str) -> list[dict[str, Any]]:
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def summarise_run(workdir: str) -> dict[str, Any]:
  """The figures of one finished run (see the module docstring), from its
  metrics.jsonl: the train records and the last evaluation."""
  records = _records(workdir)
  # The last record of each step: a killed and restarted run logs steps again.
  train = sorted({r["step"]: r for r in records if r["split"] == "train"}.values(),
                 key=lambda r: r["step"])
  evaluation = [r for r in records if r["split"] == "eval"][-1]
  tail = train[len(train) * 3 // 4:]
  layers = sorted({k.split("/")[1] for k in evaluation if k.startswith("layers/")})
  per_layer = lambda key: [float(evaluation[f"layers/{l}/{key}"]) for l in layers]
  whole_set = []
  for layer in layers:
    load = np.asarray(evaluation[f"layers/{layer}/load"], np.float64)
    whole_set.append((load.max() - load.mean()) / load.mean())
  mi = per_layer("domain_expert_mi")
  return {
      "loss": float(evaluation["loss"]),
      "bits_per_byte": float(evaluation["bits_per_byte"]),
      "max_violation_micro": float(np.mean([r["mean_max_violation"] for r in tail])),
      "max_violation_step": float(np.mean([r["mean_step_max_violation"] for r in tail])),
      "max_violation_eval": float(np.mean(per_layer("max_violation"))),
      "max_violation_eval_all": float(np.mean(whole_set)),
      "load_cv_eval": float(np.mean(per_layer("load_cv"))),
      "domain_expert_mi": float(np.mean(mi)),
      "domain_expert_mi_by_layer": dict(zip(layers, mi)),
      "router_entropy_eval": float(np.mean(per_layer("router_entropy"))),
      "tokens_per_s": float(np.median([r["tokens_per_s"] for r in train[1:]] or [0.0])),
      **{name: float(np.mean(per_layer(name))) for name in ERC_METRICS
         if all(f"layers/{l}/{name}" in evaluation for l in layers)},
  }


def run(method: str, dataset: str, seed: int, args) -> dict[str, Any]:
  """Trains one run (resuming its workdir) and returns its figures for the harness."""
  from moejax.train import train  # pylint: disable=g-import-not-at-top
  workdir = os.path.join(args.workdir, dataset, method, f"seed{seed}")
  train(run_config(method, dataset, seed, args.steps, args.data_dir), workdir, progress=False)
  evals = [{k: v for k, v in r.items() if not k.startswith("layers/")}
           for r in _records(workdir) if r["split"] == "eval"]
  return {"steps": args.steps, "final": summarise_run(workdir), "evals": evals}


# ----------------------------------------------------------------------------
# Report.

COLUMNS = (("loss", "val loss", 4), ("bits_per_byte", "bits/byte", 4),
           ("max_violation_micro", "MaxVio micro", 3), ("max_violation_step", "MaxVio step", 3),
           ("max_violation_eval", "MaxVio eval", 3),
           ("max_violation_eval_all", "MaxVio eval all", 3),
           ("domain_expert_mi", "MI(domain; expert)", 4))
# (figure, arm, reference, claim): the papers' directions, decided from intervals.
CLAIM_TESTS = (
    ("domain_expert_mi", "switch_global", "switch_microbatch", "higher",
     "global-batch balancing gives more domain specialisation than micro-batch "
     "(Demons in the Detail, 2025)"),
    ("loss", "switch_global", "switch_microbatch", "lower",
     "global-batch balancing gives a lower loss than micro-batch (same paper)"),
    ("loss", "aux_free", "switch_microbatch", "no_worse",
     "the aux-free bias matches the switch loss's loss (DeepSeek 2024)"),
    ("max_violation_step", "aux_free", "switch_microbatch", "lower",
     "the aux-free bias balances each step better than the switch loss"),
    ("max_violation_eval_all", "aux_free", "switch_microbatch", "lower",
     "the aux-free bias balances the whole validation set better than the switch loss"),
)


def write_report(path: str, data, args) -> None:
  f = harness.fmt
  meta = data.get("meta", {})
  lines = ["# Load-balancing methods on the tiny LM", "",
           "`experiments/balance.py` trains `configs/balance.py:<method>` (lm_tiny: 2 MoE "
           "blocks, D = 128, E = 8 SwiGLU experts of width 256, top-2; each step 16 rows of "
           "128 bytes as 4 micro-batches of 4 rows) per dataset, method and seed, with the "
           "same data order, steps and schedule. Every figure below is computed from "
           "`balance.json` by `experiments/harness.py`.", "",
           "```", f"PYTHONPATH=. TFDS_DATA_DIR=... python experiments/balance.py --steps "
           f"{meta.get('steps', args.steps)}", "```", "",
           f"Machine: {meta.get('machine', 'not recorded')}.", "",
           "Cells: mean ± standard deviation over seeds (n), then Δ, the paired difference "
           "against `none` over the seeds both ran, with its 95% t interval. Columns: "
           "validation loss (nats per byte token) and bits per byte; MaxVio of each "
           "micro-batch's expert load (4 rows) and of the whole step's (16 rows), averaged "
           "over layers and the last quarter of training; MaxVio of each validation batch "
           "(16 rows), averaged, and of the load summed over all validation batches; "
           "plug-in mutual information between the document's domain and the chosen expert "
           "on the validation batches, nats, mean over the 2 layers. Training cost is timed "
           "interleaved in one process (its section below; `switch_global` runs one extra "
           "forward pass per step to count).", ""]
  for dataset in harness.datasets_with_runs(data):
    comparisons = {key: harness.compare(data, key, dataset) for key, _, _ in COLUMNS}
    lines += [f"## {dataset}", "",
              "| method | n | " + " | ".join(c[1] for c in COLUMNS) + " | "
              "ERC diagonal share / ratio |", "|---|---|" + "---|" * (len(COLUMNS) + 1)]
    for method in data["arms"]:
      if not comparisons["loss"][method]["spread"]["n"]:
        continue
      cells = [harness.fmt_cell(comparisons[key][method], digits) for key, _, digits in COLUMNS]
      erc = [harness.spread(list(harness.values_by_seed(data, name, dataset,
                                                        method).values()))["mean"]
             for name in ERC_METRICS]
      lines.append(f"| {method} | {comparisons['loss'][method]['spread']['n']} | "
                   + " | ".join(cells) + " | "
                   + ("–" if erc[0] is None else f"{f(erc[0])} / {f(erc[1], 2)}") + " |")
    lines += ["", *harness.claim_rows(data, dataset, CLAIM_TESTS), ""]
  import throughput  # pylint: disable=g-import-not-at-top
  lines += throughput.report_lines(THROUGHPUT)
  lines += ["Verdicts (experiments/harness.py): `lower`/`higher` hold when the interval "
            "excludes 0 in that direction and do not hold when it excludes 0 the other way; "
            "`no_worse` holds when the interval lies below the reference's own seed "
            "standard deviation and does not hold when it lies above 0; otherwise, or with "
            "fewer than 2 paired seeds, cannot tell.", "",
            "What this scale cannot test: 600 steps of a 2-block, 8-expert byte-level LM "
            "on CPU; balance at scale (many devices, long training) is out of its reach.", ""]
  harness.write_report(path, lines, harness.digest(data["runs"]))


def main() -> None:
  harness.grid_main(__doc__.splitlines()[0], "balance", "none", METHODS, DATASETS, run,
                    lambda data, args: write_report(args.out + ".md", data, args),
                    arms_flag="methods")


if __name__ == "__main__":
  main()

"""Load-balancing methods compared on the tiny LM: loss, balance, specialisation.

  PYTHONPATH=. python experiments/balance.py [--steps 600] [--seeds 0,1] \\
      [--datasets synthetic_domains,stdlib_text] [--methods all] [--workdir DIR]

Trains configs/balance.py:<method> once per dataset, method and seed, with the
same data order, steps and schedule (each step 16 rows of 128 tokens as 4
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

Each run keeps its workdir (metrics.jsonl, routing_report.md, checkpoint) and a
result.json; a rerun skips finished runs (one evaluated on less than the whole
validation split is evaluated again from its checkpoint). Writes <out>.json with every run and
<out>.md with the mean over seeds, each seed's value and the verdicts on the
two claims (global vs micro-batch specialisation; aux-free vs switch loss); a
"## Reading" section already at the end of <out>.md is kept.
Prints one JSON line per run. About 3.5 minutes per run on a 2-core CPU at 600 steps.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from report_file import write_keeping_reading  # noqa: E402  (experiments/)

METHODS = ("none", "switch_microbatch", "switch_global", "switch_sequence", "aux_free",
           "aux_free_sequence", "erc")
DATASETS = ("synthetic_domains", "stdlib_text")
# More batches than either validation split has: the evaluation reads the whole
# split (stdlib_text's first 20 batches hold only 3 of its 202 domains).
FULL_VALIDATION = 100_000


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
  }


def run(method: str, dataset: str, seed: int, args) -> dict[str, Any]:
  """Trains one run unless its workdir holds a finished one; its figures."""
  from moejax.train import train  # pylint: disable=g-import-not-at-top
  workdir = os.path.join(args.workdir, dataset, method, f"seed{seed}")
  done = os.path.join(workdir, "result.json")
  previous = {}
  if os.path.exists(done):
    with open(done, encoding="utf-8") as f:
      previous = json.load(f)
  if previous.get("eval") != "validation split":
    # Trains, or, for a run trained before, only evaluates the whole split again.
    start = time.time()
    train(run_config(method, dataset, seed, args.steps, args.data_dir), workdir,
          progress=False)
    previous.setdefault("wall_s", time.time() - start)
  result = {"dataset": dataset, "method": method, "seed": seed, "steps": args.steps,
            **summarise_run(workdir), "eval": "validation split",
            "wall_s": previous["wall_s"]}
  with open(done, "w", encoding="utf-8") as f:
    json.dump(result, f)
  return result


# ----------------------------------------------------------------------------
# Report.


COLUMNS = (("loss", "val loss", 4), ("bits_per_byte", "bits/byte", 4),
           ("max_violation_micro", "MaxVio micro", 3), ("max_violation_step", "MaxVio step", 3),
           ("max_violation_eval", "MaxVio eval", 3),
           ("max_violation_eval_all", "MaxVio eval all", 3),
           ("domain_expert_mi", "MI(domain; expert)", 4),
           ("tokens_per_s", "tokens/s", 0))


def _by(results, dataset, method, key):
  return [r[key] for r in sorted(results, key=lambda r: r["seed"])
          if r["dataset"] == dataset and r["method"] == method]


def _cell(values, digits):
  mean = float(np.mean(values))
  if digits == 0:
    return f"{mean:,.0f}"
  seeds = " / ".join(f"{v:.{digits}f}" for v in values)
  return f"{mean:.{digits}f} ({seeds})"


def verdicts(results, datasets) -> list[str]:
  """The two claims, decided from the numbers by the rules stated in the text."""
  lines = []
  for dataset in datasets:
    glob_mi = _by(results, dataset, "switch_global", "domain_expert_mi")
    micro_mi = _by(results, dataset, "switch_microbatch", "domain_expert_mi")
    if glob_mi and len(glob_mi) == len(micro_mi):
      wins = sum(g > m for g, m in zip(glob_mi, micro_mi))
      more = wins == len(glob_mi)
      lines.append(
          f"- **{dataset}, global vs micro-batch balancing:** MI(domain; expert) "
          f"{np.mean(glob_mi):.4f} (global) against {np.mean(micro_mi):.4f} (micro-batch); "
          f"global higher in {wins} of {len(glob_mi)} seeds. "
          + ("Global-batch balancing gave more domain specialisation here, as the Demons "
             "paper claims." if more else
             "Global-batch balancing did not give consistently more domain specialisation "
             "here."))
      glob_loss = _by(results, dataset, "switch_global", "loss")
      micro_loss = _by(results, dataset, "switch_microbatch", "loss")
      lines.append(f"  Validation loss: {np.mean(glob_loss):.4f} (global) against "
                   f"{np.mean(micro_loss):.4f} (micro-batch), lower in "
                   f"{sum(g < m for g, m in zip(glob_loss, micro_loss))} of {len(glob_loss)} "
                   "seeds.")
    free_loss = _by(results, dataset, "aux_free", "loss")
    switch_loss = _by(results, dataset, "switch_microbatch", "loss")
    if free_loss and len(free_loss) == len(switch_loss):
      spread = max(np.ptp(free_loss), np.ptp(switch_loss), 0.005)
      delta = float(np.mean(free_loss) - np.mean(switch_loss))
      mv = lambda method, key: float(np.mean(_by(results, dataset, method, key)))
      lower = {key: mv("aux_free", key) < mv("switch_microbatch", key)
               for key in ("max_violation_step", "max_violation_eval_all")}
      matched = delta <= spread
      lines.append(
          f"- **{dataset}, aux-free vs switch loss (micro-batch):** validation loss "
          f"{np.mean(free_loss):.4f} against {np.mean(switch_loss):.4f} (difference "
          f"{delta:+.4f}; seed spread {spread:.4f}). MaxVio per training step "
          f"{mv('aux_free', 'max_violation_step'):.3f} against "
          f"{mv('switch_microbatch', 'max_violation_step'):.3f}; over the whole validation "
          f"set {mv('aux_free', 'max_violation_eval_all'):.3f} against "
          f"{mv('switch_microbatch', 'max_violation_eval_all'):.3f}. Aux-free "
          + ("matched" if matched else "did not match") + " the switch loss's validation loss, "
          + ("at lower MaxVio on both measures." if all(lower.values()) else
             "at lower MaxVio over the validation set but not per training step."
             if lower["max_violation_eval_all"] else
             "at lower MaxVio per training step but not over the validation set."
             if lower["max_violation_step"] else "and not at lower MaxVio."))
  return lines


def write_report(path: str, results, args, datasets, methods) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  lines = ["# Load-balancing methods on the tiny LM", "",
           "`experiments/balance.py` trains `configs/balance.py:<method>` (lm_tiny: 2 MoE "
           "blocks, D = 128, E = 8 SwiGLU experts of width 256, top-2; each step 16 rows of "
           "128 bytes as 4 micro-batches of 4 rows) once per dataset, method and seed, with "
           "the same data order, steps and schedule.", "",
           "```", f"PYTHONPATH=. TFDS_DATA_DIR={args.data_dir} python experiments/balance.py "
           f"--steps {args.steps} --seeds {','.join(map(str, args.seeds))} "
           f"--datasets {','.join(datasets)} --workdir {args.workdir}", "```", "",
           f"Machine: jax {jax.__version__}, {jax.default_backend()} backend, "
           f"{os.cpu_count()} cores, shared; {platform.platform()}. Cells: mean over seeds "
           "(each seed's value).", "",
           "Columns: validation loss (nats per byte token) and bits per byte; MaxVio of each "
           "micro-batch's expert load (4 rows) and of the whole step's (16 rows), averaged "
           "over layers and the last quarter of training; MaxVio of each validation batch "
           "(16 rows), averaged, and of the load summed over all validation batches; plug-in mutual information between the document's domain and the "
           "chosen expert on the validation batches, nats, mean over the 2 layers; training "
           "tokens/s, the median over logging windows, indicative only (a shared machine; "
           "`switch_global` runs one extra forward pass per step to count).", ""]
  for dataset in datasets:
    lines += [f"## {dataset}", ""]
    if dataset == "synthetic_domains":
      from moejax.data import builders  # pylint: disable=g-import-not-at-top
      rates = builders.load(dataset, args.data_dir).info.metadata["entropy_rate_nats"]
      lines += [f"Loss floor: the domains' chains have entropy rates {min(rates):.3f} to "
                f"{max(rates):.3f} nats, mean {np.mean(rates):.4f} (document starts and ends "
                "add a little).", ""]
    lines += ["| method | " + " | ".join(c[1] for c in COLUMNS) + " |",
              "|---|" + "---|" * len(COLUMNS)]
    for method in methods:
      if not _by(results, dataset, method, "loss"):
        continue
      cells = [_cell(_by(results, dataset, method, key), digits) for key, _, digits in COLUMNS]
      lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines.append("")
  lines += ["## Verdicts", "",
            "Rules: \"more specialisation\" means higher MI in every seed (paired by seed); "
            "\"matched the loss\" means the aux-free mean loss is at most the switch loss's "
            "plus the larger seed-to-seed spread of the two (at least 0.005).", "",
            *verdicts(results, datasets), ""]
  write_keeping_reading(path, lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--seeds", default="0,1")
  parser.add_argument("--datasets", default=",".join(DATASETS))
  parser.add_argument("--methods", default="all")
  parser.add_argument("--workdir", default=os.path.join(REPO, "workdir", "balance"))
  parser.add_argument("--data_dir", default=os.environ.get("TFDS_DATA_DIR",
                                                           "~/tensorflow_datasets"))
  parser.add_argument("--out", default=os.path.join(REPO, "experiments", "results", "balance"))
  args = parser.parse_args()
  args.seeds = [int(s) for s in args.seeds.split(",")]
  datasets = args.datasets.split(",")
  methods = METHODS if args.methods == "all" else tuple(args.methods.split(","))
  unknown = sorted(set(methods) - set(METHODS)) + sorted(set(datasets) - set(DATASETS))
  if unknown:
    parser.error(f"unknown methods or datasets {unknown}; methods: {METHODS}, "
                 f"datasets: {DATASETS}")

  results = []
  for dataset in datasets:
    for seed in args.seeds:
      for method in methods:
        print(f"[balance] {dataset} {method} seed {seed}", file=sys.stderr, flush=True)
        results.append(run(method, dataset, seed, args))
        print(json.dumps(results[-1]), flush=True)
  with open(args.out + ".json", "w", encoding="utf-8") as f:
    json.dump(results, f, indent=1)
  write_report(args.out + ".md", results, args, datasets, methods)
  print(f"[balance] wrote {args.out}.md", file=sys.stderr)


if __name__ == "__main__":
  main()

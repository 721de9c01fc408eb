"""Every router on the tiny LM at equal active compute, each paper's claim checked.

  PYTHONPATH=. TFDS_DATA_DIR=/tmp/tfds python experiments/router_zoo.py [--steps 600] \\
      [--datasets stdlib_text,synthetic_domains] [--seeds 3] [--baseline_seeds 5] \\
      [--routers all (the ten of ZOO)] [--workdir DIR] [--out PREFIX]

Trains configs/router_zoo.py:<router> (lm_tiny, E = 8, 2 expert rows per token or
2 on average; see that file) per router, dataset and seed on the harness
(experiments/harness.py): the same data order, steps and schedule, every
finished run saved to <out>.json at once, a rerun resuming the grid. Per run:

  loss, bits/byte   validation (the whole split), after the last step
  tokens/s          training, median over logging windows (kept in the JSON; the
                    report's cost comes from experiments/throughput.py, timed
                    interleaved at initialisation and trained)
  MaxVio            training (last quarter of the logged steps) and validation, mean
                    over layers (soft: of its summary plan, see the report)
  dropped share     training, same average
  experts/token     expert rows per token: at initialisation (the first logged
                    window), trained (last quarter) and validation
  router metrics    the router's own per-layer scalars, training and validation
  evals             every evaluation record

and decides, against the topk baseline, whether each paper's direction holds
here, from paired t intervals over seeds (rules in the report). Writes <out>.json,
<out>.md (a "## Reading" section at its end is kept, and marked stale when the
data under it change) and <out>.png. About 3 to 4 minutes per run on a 2-core CPU
at 600 steps (random twice that: THOR's two forward passes).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import harness  # noqa: E402  (experiments/)

# The routers that decide each token in each layer alone; those that remember or
# look around (recurrent, similarity, attention_aware, rexmoe, and chain) are
# experiments/router_zoo_2.py's.
ZOO = ("topk", "expert_choice", "sinkhorn", "selective_sinkhorn", "soft", "top_p",
       "null_experts", "relu", "hash", "random")
FULL_VALIDATION = 100_000   # more batches than the split has: evaluate all of it
SPARSITY_SLACK = 0.005       # relu: "reaches 0.75" allows the controller's wobble
# Routers whose deterministic (evaluation) routing is plain top-K, hence causal.
EVAL_CAUSAL = ("sinkhorn", "selective_sinkhorn")
CLAIMS = (
    "top_p (Huang et al. 2024): fewer experts per token than top-2 (validation), no worse loss.",
    "null_experts (AdaMoE 2024): FLOPs ratio (true experts per token / 2, validation) below 1, "
    "no worse loss.",
    f"relu (ReMoE 2024, BlockFFN 2025): token sparsity at least 0.75 (less {SPARSITY_SLACK} "
    "for the controller's oscillation) in training and validation, no worse loss.",
    "sinkhorn, selective_sinkhorn (BASE 2021, S-BASE 2022, SSR 2025): lower training MaxVio "
    "than topk without a balance loss, no worse loss; SSR also claims a lower loss.",
    "expert_choice (Zhou et al. 2022), soft (Puigcerver et al. 2023): lower loss than top-k; "
    "both see future tokens here, so a lower loss is no evidence for the claim.",
    "hash (Roller et al. 2021): loss no worse than the learned top-k's.",
    "random (THOR 2021): the learned top-k does not beat random routing (random's loss no "
    "worse than topk's).")
STANDARD = {"dropped", "dropped_share", "experts_per_token", "load", "load_cv",
            "max_violation", "router_entropy", "router_marginal_entropy", "selected",
            "step_max_violation", "domain_expert_mi"}


def run_config(router: str, args, seed: int, dataset: str):
  from moejax.train import setup  # pylint: disable=g-import-not-at-top
  config = setup.config_from_file(os.path.join(REPO, "configs", f"router_zoo.py:{router}"))
  config.data.name, config.data.data_dir, config.seed = dataset, args.data_dir, seed
  t = config.train
  t.steps = t.eval_every = t.checkpoint_every = args.steps
  t.log_every, t.eval_batches = min(20, args.steps), FULL_VALIDATION
  t.warmup_steps = min(t.warmup_steps, args.steps // 10)
  return config


def causality(config) -> str:
  """'causal', 'training only' (non-causal in training) or 'non-causal'."""
  from moejax import routers  # pylint: disable=g-import-not-at-top
  from moejax.train import setup  # pylint: disable=g-import-not-at-top
  moe = setup.moe_settings(config)
  router = routers.create(moe["router"], num_experts=moe["num_experts"], top_k=moe["top_k"],
                          **moe["router_kwargs"])
  if router.is_causal:
    return "causal"
  return "training only" if moe["router"] in EVAL_CAUSAL else "non-causal"


def summarise_run(workdir: str) -> dict[str, Any]:
  """The figures of one finished run (module docstring) from its metrics.jsonl."""
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  train = sorted({r["step"]: r for r in records if r["split"] == "train"}.values(),
                 key=lambda r: r["step"])   # last record per step (restarts log again)
  evaluation = [r for r in records if r["split"] == "eval"][-1]
  tail = train[len(train) * 3 // 4:]
  layers = sorted({k.split("/")[1] for k in evaluation if k.startswith("layers/")})

  def layer_mean(record, key):
    values = [record.get(f"layers/{l}/{key}") for l in layers]
    return float(np.mean(values)) if all(isinstance(v, (int, float)) for v in values) else None

  def train_mean(key):
    values = [layer_mean(r, key) for r in tail]
    return float(np.mean(values)) if values and None not in values else None

  extra = {k.split("/", 2)[2] for k in evaluation if k.startswith("layers/")} - STANDARD
  router_metrics = {k: {"train": train_mean(k), "eval": layer_mean(evaluation, k)}
                    for k in sorted(extra) if not k.startswith("loss_")
                    and layer_mean(evaluation, k) is not None}
  if "consistency" in train[-1]:
    router_metrics["consistency"] = {
        "train": float(np.mean([r["consistency"] for r in tail])), "eval": None}
  return {
      "loss": float(evaluation["loss"]), "bits_per_byte": float(evaluation["bits_per_byte"]),
      "tokens_per_s": float(np.median([r["tokens_per_s"] for r in train[1:] or train])),
      "max_violation_train": train_mean("max_violation"),
      "max_violation_eval": layer_mean(evaluation, "max_violation"),
      "dropped_share_train": train_mean("dropped_share"),
      "experts_per_token_train": train_mean("experts_per_token"),
      "experts_per_token_init": layer_mean(train[0], "experts_per_token"),
      "evals": [{k: v for k, v in r.items() if not k.startswith("layers/")}
                for r in records if r["split"] == "eval"],
      "experts_per_token_eval": layer_mean(evaluation, "experts_per_token"),
      "router_metrics": router_metrics,
  }


def run(router: str, dataset: str, seed: int, args) -> dict[str, Any]:
  """Trains one run (resuming its workdir) and returns its figures for the harness."""
  from moejax.train import train  # pylint: disable=g-import-not-at-top
  workdir = os.path.join(args.workdir, dataset, router, f"seed{seed}")
  config = run_config(router, args, seed, dataset)
  train(config, workdir, progress=False)
  final = summarise_run(workdir)
  evals = final.pop("evals")
  return {"steps": args.steps, "causality": causality(config), "final": final,
          "evals": evals}


# ----------------------------------------------------------------------------
# Claims, from intervals (experiments/harness.py).

# Per router: (figure, claim) against topk, or (figure, "target", value): the
# figure's own interval against a target (relu: at least the target sparsity
# within the controller's slack; null_experts: a FLOPs ratio below 1).
CLAIM_TESTS = {
    "top_p": [("experts_per_token_eval", "lower"), ("loss", "no_worse")],
    "null_experts": [("router_metrics/flops_ratio/eval", "below", 1.0), ("loss", "no_worse")],
    "relu": [("router_metrics/token_sparsity/train", "at_least", 0.75),
             ("router_metrics/token_sparsity/eval", "at_least", 0.75), ("loss", "no_worse")],
    "sinkhorn": [("max_violation_train", "lower"), ("loss", "no_worse")],
    "selective_sinkhorn": [("max_violation_train", "lower"), ("loss", "no_worse"),
                           ("loss", "lower")],
    "expert_choice": [("loss", "lower")],
    "soft": [("loss", "lower")],
    "hash": [("loss", "no_worse")],
    "random": [("loss", "no_worse")],
}
NOT_COMPARABLE = ("expert_choice", "soft")


def _target_verdict(values: list[float], kind: str, target: float) -> tuple[str, dict]:
  """The verdict of a figure against a fixed target, from the t interval of its
  mean: `below` holds when the interval lies below the target (does not when it
  lies above); `at_least` holds when it lies above target - SPARSITY_SLACK (does
  not when it lies below the target)."""
  interval = harness.paired_interval(values)
  low, high = interval["low"], interval["high"]
  if low is None:
    return "cannot tell", interval
  if kind == "below":
    return ("holds" if high < target else "does not hold" if low > target
            else "cannot tell"), interval
  return ("holds" if low > target - SPARSITY_SLACK else "does not hold" if high < target
          else "cannot tell"), interval


def label(name: str) -> str:
  """'router_metrics/token_sparsity/eval' -> 'token_sparsity (eval)'."""
  parts = name.split("/")
  return f"{parts[1]} ({parts[2]})" if parts[0] == "router_metrics" else name


def claims(data, dataset: str, router: str) -> list[dict[str, Any]]:
  """Each claim test of `router` on `dataset`: figure, claim, interval, verdict."""
  out = []
  for test in CLAIM_TESTS.get(router, []):
    name, kind = test[0], test[1]
    comparison = harness.compare(data, name, dataset, arms=[router, data["baseline"]])
    if len(test) == 3:
      values = list(comparison[router]["values"].values())
      result, interval = _target_verdict(values, kind, test[2])
      claim = f"{kind} {test[2]}"
    else:
      interval = comparison[router]["paired"]
      result = harness.claim_verdict(comparison, router, kind, data["baseline"])
      claim = f"{kind} than {data['baseline']}"
    out.append({"figure": name, "claim": claim, "interval": interval, "verdict": result})
  return out


def overall(tests: list[dict[str, Any]]) -> str:
  verdicts = [t["verdict"] for t in tests]
  if not verdicts:
    return "–"
  if "does not hold" in verdicts:
    return "does not hold"
  return "holds" if all(v == "holds" for v in verdicts) else "cannot tell"


def write_report(path: str, data, args) -> None:
  f, fi = harness.fmt, harness.fmt_interval
  meta = data.get("meta", {})
  lines = [
      "# Routers on the tiny LM at equal active compute", "",
      "`experiments/router_zoo.py` trains `configs/router_zoo.py:<router>` (lm_tiny: 2 MoE "
      "blocks, D = 128, E = 8 SwiGLU experts of width 256; 16 rows of 128 bytes per step) "
      "per router, dataset and seed, with the same data order, steps and schedule; each "
      "router is set to 2 expert rows per token, or 2 on average (see configs/"
      "router_zoo.py). Every figure below is computed from `router_zoo.json` by "
      "`experiments/harness.py`.", "",
      "```", f"PYTHONPATH=. TFDS_DATA_DIR=... python experiments/router_zoo.py --steps "
      f"{meta.get('steps', args.steps)}", "```", "",
      f"Machine: {meta.get('machine', 'not recorded')}.", "",
      "Statistics: mean, standard deviation and min-max over seeds; Δ is the paired "
      "difference router − topk over the seeds both ran, with its 95% t interval. "
      "Verdicts come from those intervals (experiments/harness.py): `lower` holds when the "
      "interval lies below 0; `no_worse` holds when it lies below topk's own seed standard "
      "deviation and does not hold when it lies above 0; targets (relu's sparsity at "
      f"least 0.75 less {SPARSITY_SLACK}, null_experts' FLOPs ratio below 1) use the t "
      "interval of the figure's own mean; fewer than 2 seeds: "
      "cannot tell. Experts per token at initialisation is that of the first logged "
      "training window. Training cost: see the interleaved timing below the tables.", ""]
  for dataset in harness.datasets_with_runs(data):
    loss = harness.compare(data, "loss", dataset)
    lines += [f"## {dataset}", "",
              "| router | causality | seeds | val loss mean ± sd [min, max] | Δ loss vs topk "
              "[95% CI] | experts/token init → trained (eval) | MaxVio train | claim | verdict |",
              "|---|---|---|---|---|---|---|---|---|"]
    for router in data["arms"]:
      runs = [r for r in data["runs"] if r["arm"] == router and r["dataset"] == dataset]
      if not runs:
        continue
      s = loss[router]["spread"]
      m = lambda name: harness.spread(
          [v for v in (harness.figure(r, name) for r in runs) if v is not None])
      tests = claims(data, dataset, router)
      claim_text = "; ".join(f"{label(t['figure'])} {t['claim']}: {t['verdict']} "
                             f"({'' if ' than ' in t['claim'] else 'mean '}"
                             f"{fi(t['interval'])})" for t in tests) or "baseline"
      verdict_text = overall(tests) + (" (not comparable: sees future tokens)"
                                       if router in NOT_COMPARABLE else "")
      lines.append(
          f"| {router} | {runs[0]['causality']} | {s['n']} | {f(s['mean'], 4)} ± "
          f"{f(s['std'], 4)} [{f(s['min'], 4)}, {f(s['max'], 4)}] | "
          f"{fi(loss[router]['paired'])} | {f(m('experts_per_token_init')['mean'], 2)} → "
          f"{f(m('experts_per_token_train')['mean'], 2)} ({f(m('experts_per_token_eval')['mean'], 2)}) | "
          f"{f(m('max_violation_train')['mean'])} | "
          f"{claim_text} | {verdict_text if tests else 'baseline'} |")
    lines.append("")
  lines += throughput_lines()
  lines += ["## Claims", "", *[f"- {claim}" for claim in CLAIMS], "",
            "What this scale cannot test: 600 steps of a 2-block, 8-expert byte-level LM on "
            "CPU. Claims about large models, long training or throughput on accelerators "
            "are out of its reach; a verdict here is about this setting only.", ""]
  harness.write_report(path, lines, harness.digest(data["runs"]))


THROUGHPUT = os.path.join(REPO, "experiments", "results", "router_zoo_throughput.json")


def throughput_lines() -> list[str]:
  """The training cost section (experiments/throughput.py --grid router_zoo)."""
  import throughput  # pylint: disable=g-import-not-at-top
  return throughput.report_lines(THROUGHPUT)


def write_plot(path: str, data) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  style = {"causal": ("o", "tab:blue"), "training only": ("^", "tab:orange"),
           "non-causal": ("X", "tab:red")}
  datasets = [d for d in data["datasets"] if any(r["dataset"] == d for r in data["runs"])]
  fig, axes = plt.subplots(1, max(len(datasets), 1), figsize=(6.5 * max(len(datasets), 1), 4.5),
                           squeeze=False)
  for ax, dataset in zip(axes[0], datasets):
    loss = harness.compare(data, "loss", dataset)
    epm = harness.compare(data, "experts_per_token_eval", dataset)
    for router in data["arms"]:
      runs = [r for r in data["runs"] if r["arm"] == router and r["dataset"] == dataset]
      if not runs or loss[router]["spread"]["mean"] is None:
        continue
      marker, color = style[runs[0]["causality"]]
      x, s = epm[router]["spread"]["mean"], loss[router]["spread"]
      ax.errorbar([x], [s["mean"]], yerr=[[s["mean"] - s["min"]], [s["max"] - s["mean"]]],
                  fmt=marker, color=color, capsize=3)
      ax.annotate(router, (x, s["mean"]), textcoords="offset points", xytext=(6, -3),
                  fontsize=8)
    ax.set_xlabel("expert rows per token (validation, mean over layers)")
    ax.set_ylabel("validation loss (nats per byte), mean and min-max over seeds")
    ax.set_title(dataset)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  harness.add_grid_arguments(parser, baseline="topk")
  parser.add_argument("--datasets", default="stdlib_text,synthetic_domains")
  parser.add_argument("--routers", default="all")
  harness.add_path_arguments(parser, "router_zoo")
  args = parser.parse_args()
  names = harness.chosen(parser, "routers", args.routers, ZOO, required="topk")
  datasets = harness.chosen(parser, "datasets", args.datasets,
                            ("stdlib_text", "synthetic_domains"))
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  harness.run_or_load(parser, args, "router_zoo", names, "topk", datasets,
                      lambda arm, dataset, seed: run(arm, dataset, seed, args),
                      lambda data: write_outputs(args.out, data, args),
                      harness.machine_description())


def write_outputs(out: str, data, args) -> None:
  """<out>.md and <out>.png from the grid's data."""
  write_report(out + ".md", data, args)
  write_plot(out + ".png", data)


if __name__ == "__main__":
  main()

"""Every router on the tiny LM at equal active compute, each paper's claim checked.

  PYTHONPATH=. TFDS_DATA_DIR=/tmp/tfds python experiments/router_zoo.py [--steps 600] \\
      [--seeds 0] [--dataset stdlib_text] [--routers all] [--workdir DIR] [--out PREFIX]

Trains configs/router_zoo.py:<router> (lm_tiny, E = 8, 2 expert rows per token or
2 on average; see that file) once per router and seed, with the same data order,
steps and schedule, evaluates on the whole validation split, and records per run:

  loss, bits/byte   validation, after the last step
  tokens/s          training, median over logging windows (shared machine)
  MaxVio            training (last quarter of the logged steps) and validation, mean
                    over layers (soft: of its summary plan, see the report)
  dropped share     training, same average
  experts/token     expert rows per token, training and validation
  router metrics    the router's own per-layer scalars (unrouted_share, capped_share,
                    null_share, flops_ratio, token_sparsity, ...), training and validation

and decides, against the topk baseline, whether each paper's direction holds
here (rules in the report; "no worse" means within TOLERANCE nats). Each run keeps
its workdir and a result.json; a rerun skips finished runs. Writes <out>.json,
<out>.md (a "## Reading" section already at its end is kept) and <out>.png
(validation loss against experts per token). Prints one JSON line per run.
About 3 to 4 minutes per run on a 2-core CPU at 600 steps (random twice that:
THOR's two forward passes); 10 routers about 40 minutes.
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

FULL_VALIDATION = 100_000   # more batches than the split has: evaluate all of it
# "No worse" tolerance, nats: the seed-to-seed spread of switch_microbatch (the topk
# baseline's balancing) on stdlib_text in experiments/results/balance.md.
TOLERANCE = 0.03
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
    "random (THOR 2021): the learned top-k does not beat random routing (holds if random's "
    "loss is no worse than topk's).")
STANDARD = {"dropped", "dropped_share", "experts_per_token", "load", "load_cv",
            "max_violation", "router_entropy", "router_marginal_entropy", "selected",
            "step_max_violation", "domain_expert_mi"}


def run_config(router: str, args, seed: int):
  from moejax.train import setup  # pylint: disable=g-import-not-at-top
  config = setup.config_from_file(os.path.join(REPO, "configs", f"router_zoo.py:{router}"))
  config.data.name, config.data.data_dir, config.seed = args.dataset, args.data_dir, seed
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
      "experts_per_token_eval": layer_mean(evaluation, "experts_per_token"),
      "router_metrics": router_metrics,
  }


def run(router: str, seed: int, args) -> dict[str, Any]:
  """Trains one run unless its workdir holds a finished one; its figures."""
  from moejax.train import train  # pylint: disable=g-import-not-at-top
  workdir = os.path.join(args.workdir, args.dataset, router, f"seed{seed}")
  done = os.path.join(workdir, "result.json")
  config, previous = run_config(router, args, seed), {}
  if os.path.exists(done):
    with open(done, encoding="utf-8") as f:
      previous = json.load(f)
  if previous.get("steps") != args.steps:
    start = time.time()
    train(config, workdir, progress=False)
    previous = {"wall_s": time.time() - start}
  result = {"dataset": args.dataset, "router": router, "seed": seed, "steps": args.steps,
            "causality": causality(config), **summarise_run(workdir),
            "eval": "validation split", "wall_s": previous["wall_s"]}
  with open(done, "w", encoding="utf-8") as f:
    json.dump(result, f)
  return result


# ----------------------------------------------------------------------------
# Report.



def mean(results, router, key, sub=None):
  """Mean over seeds of result[key] (or result['router_metrics'][key][sub])."""
  rows = [r for r in results if r["router"] == router]
  values = [r["router_metrics"].get(key, {}).get(sub) if sub else r.get(key) for r in rows]
  values = [v for v in values if v is not None]
  return float(np.mean(values)) if values else None


def verdict(results, router) -> str:
  """Whether the paper's direction holds here, by the rules written in the report."""
  m = lambda *a: mean(results, *a)
  base, loss = m("topk", "loss"), m(router, "loss")
  if router == "topk":
    return "baseline"
  if base is None or loss is None:
    return "no topk baseline"
  delta = loss - base
  ok = delta <= TOLERANCE
  vs = f"loss {delta:+.3f} vs topk"
  yes = lambda b: "**yes**" if b else "**no**"
  if router == "top_p":
    fewer = m(router, "experts_per_token_eval") < m("topk", "experts_per_token_eval")
    return (f"{yes(fewer and ok)}: {m(router, 'experts_per_token_eval'):.2f} experts/token "
            f"(eval; train {m(router, 'experts_per_token_train'):.2f}), {vs}")
  if router == "null_experts":
    ratio = m(router, "flops_ratio", "eval")
    return f"{yes(ratio < 1 and ok)}: FLOPs ratio {ratio:.2f} (eval), {vs}"
  if router == "relu":
    train_s, eval_s = m(router, "token_sparsity", "train"), m(router, "token_sparsity", "eval")
    reached = min(train_s, eval_s) >= 0.75 - SPARSITY_SLACK
    return (f"{yes(reached and ok)}: token sparsity {train_s:.3f} train, {eval_s:.3f} eval "
            f"(target 0.75), {vs}")
  if router in ("sinkhorn", "selective_sinkhorn"):
    mv, mv_base = m(router, "max_violation_train"), m("topk", "max_violation_train")
    text = (f"{yes(mv < mv_base and ok)}: MaxVio {mv:.2f} vs {mv_base:.2f} (train, no "
            f"balance loss), {vs}")
    if router == "selective_sinkhorn":
      text += f"; better loss (SSR): {'yes' if delta < -TOLERANCE else 'no'}"
    return text
  if router in ("expert_choice", "soft"):
    return (f"{yes(delta < -TOLERANCE)}: {vs} (lower by more than {TOLERANCE}?); **not "
            "comparable**: non-causal, sees future tokens (optimistic)")
  if router == "hash":
    return f"{yes(ok)}: {vs} (no worse than the learned top-k?)"
  if router == "random":
    return (f"{yes(ok)} (learned top-k {'does not beat' if ok else 'beats'} random "
            f"beyond tolerance): {vs}")
  return f"(no claim recorded): {vs}"


def _f(value, digits=3):
  return "–" if value is None else f"{value:,.{digits}f}"


def write_report(path: str, results, args, names) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  seeds = ",".join(map(str, args.seeds))
  lines = [
      "# Routers on the tiny LM at equal active compute", "",
      "`experiments/router_zoo.py` trains `configs/router_zoo.py:<router>` (lm_tiny: 2 MoE "
      "blocks, D = 128, E = 8 SwiGLU experts of width 256; 16 rows of 128 bytes per step) "
      "once per router and seed, with the same data order, steps and schedule; each router "
      "is set to 2 expert rows per token, or 2 on average (see configs/router_zoo.py).", "",
      "```", f"PYTHONPATH=. TFDS_DATA_DIR={args.data_dir} python experiments/router_zoo.py "
      f"--steps {args.steps} --seeds {seeds} --dataset {args.dataset}", "```", "",
      f"Machine: jax {jax.__version__}, {jax.default_backend()} backend, {os.cpu_count()} "
      f"cores, shared; {platform.platform()}. Cells: mean over seeds {seeds}.", "",
      "Columns: validation loss (nats per byte) and bits per byte on the whole validation "
      "split; training tokens/s (median over logging windows, indicative only; `random` "
      "runs two forward passes per step); MaxVio in training (last quarter of the logged "
      "steps) and validation, mean over layers; dropped share (training); expert rows per "
      "token (training / validation); router metrics as `name train / eval`, mean over "
      "layers (`capped` is a count of cut gates per call, not a share). `soft`'s MaxVio is "
      "that of its summary plan (each token's largest combine expert); its compute (S slots "
      "per expert) is balanced by construction.", "",
      "**Non-causal routers.** `expert_choice` and `soft` route each token using the other "
      "tokens of the batch or sequence, later ones included, in training and evaluation: "
      "in this causal LM they see the future, so their loss is optimistic and not "
      "comparable with the others'. `sinkhorn` and `selective_sinkhorn` do so only in "
      "training (evaluation is plain top-2), so their validation loss is comparable. "
      "In the plot: circles causal, triangles non-causal in training only, crosses "
      "non-causal.", "",
      "| router | causality | val loss | bits/byte | tokens/s | MaxVio train | MaxVio eval "
      "| dropped | experts/token train / eval | router metrics (train / eval) "
      "| paper's direction holds here? |",
      "|---|---|---|---|---|---|---|---|---|---|---|"]
  for router in names:
    rows = [r for r in results if r["router"] == router]
    if not rows:
      continue
    m = lambda key, sub=None: mean(results, router, key, sub)
    keys = sorted({k for r in rows for k in r["router_metrics"]})
    extra = "; ".join(f"{k} {_f(m(k, 'train'))} / {_f(m(k, 'eval'))}" for k in keys) or "–"
    try:
      claim = verdict(results, router)
    except TypeError:   # a metric its rule needs is missing (None)
      claim = "metric missing"
    lines.append(
        f"| {router} | {rows[0]['causality']} | {_f(m('loss'), 4)} | "
        f"{_f(m('bits_per_byte'), 4)} | {_f(m('tokens_per_s'), 0)} | "
        f"{_f(m('max_violation_train'))} | {_f(m('max_violation_eval'))} | "
        f"{_f(m('dropped_share_train'))} | {_f(m('experts_per_token_train'), 2)} / "
        f"{_f(m('experts_per_token_eval'), 2)} | {extra} | "
        f"{claim} |")
  lines += [
      "", "## Claims and rules", "",
      f"\"No worse\" means validation loss at most topk's + {TOLERANCE} nats, the "
      "seed-to-seed spread of the top-2 switch-loss baseline on stdlib_text measured in "
      "experiments/results/balance.md (2.0300 vs 1.9999); \"lower\" means below topk's "
      f"by more than {TOLERANCE}. One seed per router unless stated above.", "",
      *[f"- {claim}" for claim in CLAIMS], ""]
  write_keeping_reading(path, lines)


def write_plot(path: str, results, names) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  style = {"causal": ("o", "tab:blue"), "training only": ("^", "tab:orange"),
           "non-causal": ("X", "tab:red")}
  fig, ax = plt.subplots(figsize=(7, 4.5))
  base = mean(results, "topk", "loss")
  if base is not None:
    ax.axhspan(base - TOLERANCE, base + TOLERANCE, color="0.9", label=f"topk ± {TOLERANCE}")
  labelled = []
  for kind, (marker, color) in style.items():
    points = [(mean(results, n, "experts_per_token_eval"), mean(results, n, "loss"), n)
              for n in names if any(r["router"] == n and r["causality"] == kind
                                    for r in results)]
    points = [p for p in points if None not in p[:2]]
    if points:
      ax.scatter([p[0] for p in points], [p[1] for p in points], marker=marker, c=color,
                 s=60, label=kind, zorder=3)
    labelled += points
  for i, (x, y, name) in enumerate(sorted(labelled, key=lambda p: (round(p[0], 1), p[1]))):
    left = i % 2 and any(abs(x - p[0]) < 0.05 for p in labelled if p[2] != name)
    ax.annotate(name, (x, y), textcoords="offset points", xytext=(-7 if left else 7, -3),
                ha="right" if left else "left", fontsize=8)
  ax.set_xlabel("expert rows per token (validation, mean over layers)")
  ax.set_ylabel("validation loss (nats per byte)")
  ax.set_title("Routers at equal active compute (lm_tiny, E = 8, top-2 baseline)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main() -> None:
  from moejax import routers  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--seeds", default="0")
  parser.add_argument("--dataset", default="stdlib_text")
  parser.add_argument("--routers", default="all")
  parser.add_argument("--workdir", default=os.path.join(REPO, "workdir", "router_zoo"))
  parser.add_argument("--data_dir", default=os.environ.get("TFDS_DATA_DIR",
                                                           "~/tensorflow_datasets"))
  parser.add_argument("--out", default=os.path.join(REPO, "experiments", "results",
                                                    "router_zoo"))
  args = parser.parse_args()
  args.seeds = [int(s) for s in args.seeds.split(",")]
  names = routers.names() if args.routers == "all" else args.routers.split(",")
  unknown = sorted(set(names) - set(routers.names()))
  if unknown:
    parser.error(f"unknown routers {unknown}; routers: {routers.names()}")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

  results = []
  for seed in args.seeds:
    for router in names:
      print(f"[router_zoo] {args.dataset} {router} seed {seed}", file=sys.stderr, flush=True)
      results.append(run(router, seed, args))
      print(json.dumps(results[-1]), flush=True)
  with open(args.out + ".json", "w", encoding="utf-8") as f:
    json.dump(results, f, indent=1)
  write_report(args.out + ".md", results, args, names)
  write_plot(args.out + ".png", results, names)
  print(f"[router_zoo] wrote {args.out}.md, .json, .png", file=sys.stderr)


if __name__ == "__main__":
  main()

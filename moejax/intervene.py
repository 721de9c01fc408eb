"""Routing interventions on a trained run: rerouting, steering, router-only
fine-tuning (RoMA), the oracle gap.

  python -m moejax.intervene --workdir=DIR --method=reroute [--prompt_len=P]
      [--steps=10] [--learning_rate=0.1] [--layers=layer_0,layer_1]
      [--prompt=TEXT --generate=N --adapt_every=16 --temperature=0]
  python -m moejax.intervene --workdir=DIR --method=steer --domain=D
      [--top=2] [--strength=1.0] [--layers=...]
  python -m moejax.intervene --workdir=DIR --method=roma [--train_rows=256]
      [--roma_steps=200] [--roma_learning_rate=1e-3] [--roma_weight=1.0]
      [--neighbours=4] [--domain=D]
  python -m moejax.intervene --workdir=DIR --method=oracle [--strengths=3,-3] [--passes=1]

Every method restores the run's checkpoint (--step, default the latest) on one
device and reads --rows evaluation rows that each lie inside one document
(moejax.interventions.frozen.sequence_rows; rows across a document boundary are
skipped and counted in the report). It writes
DIR/interventions/<method>_step<S>.json (every per-row figure) and .md (means
with 95% bootstrap intervals over rows; reroute with --prompt:
reroute_generate_step<S>), and prints the .md path; the run's checkpoints are
only read.

  reroute  the deltas are fitted on each row's first P tokens; the report gives
           the continuation's nll with and without them. With --prompt the
           deltas are fitted on that text and --generate tokens are sampled,
           re-fitting every --adapt_every tokens.
  steer    the experts used more on the training rows of domain D than on the
           training rows of every domain get +strength (labelled data only);
           the report gives, on the evaluation rows of domain D, the change in
           nll with each layer steered alone, with the middle layers and with
           the outer ones.
  roma     the routers alone are fine-tuned on --train_rows rows of the training
           split (of domain D if given), once with RoMA's alignment term and
           once without it (plain router fine-tuning, the same steps and
           batches); the report gives the evaluation rows' nll under the plain
           model and both, and the fine-tuned router parameters are written to
           DIR/interventions/roma_step<S>_{roma,router_ft}.msgpack.
  oracle   the per-sequence oracle gap per layer and in total.

Mistakes stop at start-up with one line on stderr and exit status 1.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Optional

import numpy as np

METHODS = ("reroute", "steer", "roma", "oracle")
DEFAULT_ROWS = 64


def interval(differences: np.ndarray) -> dict[str, float]:
  """Mean of per-row differences with its 95% percentile-bootstrap interval."""
  from moejax.analysis.consistency import bootstrap_interval  # pylint: disable=g-import-not-at-top
  d = np.asarray(differences, np.float64)
  parts = np.stack([d, np.ones_like(d)], axis=1)
  i = bootstrap_interval(parts, lambda s: s[:, 0] / s[:, 1])
  return {"mean": i.value, "low": i.low, "high": i.high}


def _fmt(i: dict[str, float]) -> str:
  return f"{i['mean']:+.4f} [{i['low']:+.4f}, {i['high']:+.4f}]"


def _layers(text: Optional[str]) -> Optional[tuple[str, ...]]:
  return None if not text else tuple(t.strip() for t in text.split(",") if t.strip())


def run_reroute(frozen, config, args) -> tuple[dict[str, Any], list[str]]:
  from moejax.interventions import frozen as frozens, reroute  # pylint: disable=g-import-not-at-top
  settings = reroute.Settings(_layers(args.layers), args.steps, args.learning_rate,
                              args.adapt_every)
  if args.prompt is not None:
    return _reroute_prompt(frozen, config, args, settings)
  rows, counts = frozens.sequence_rows(config, args.split or config.data.eval_split, args.rows)
  prompt_len = args.prompt_len or rows.shape[1] // 2
  out = reroute.reroute_rows(frozen, rows, prompt_len, settings)
  change = interval(out["rerouted"] - out["plain"])
  context = out["context_loss"]
  data = {"rows": counts, "prompt_len": prompt_len, "settings": vars(args),
          "plain": out["plain"].tolist(), "rerouted": out["rerouted"].tolist(),
          "context_loss": context.tolist(), "change": change,
          "delta_norm": {l: float(np.mean(np.linalg.norm(d, axis=-1)))
                         for l, d in out["deltas"].items()}}
  lines = [f"Rows: {counts['rows']} ({counts['skipped_boundary']} skipped: across a document "
           "boundary); each split into a prompt of "
           f"{prompt_len} tokens and its continuation.", "",
           "| | mean nll of the continuation |", "|---|---|",
           f"| plain | {np.mean(out['plain']):.4f} |",
           f"| rerouted | {np.mean(out['rerouted']):.4f} |",
           f"| rerouted - plain (95% CI) | {_fmt(change)} |", "",
           f"The prompt's own nll went from {np.mean(context[0]):.4f} to "
           f"{np.mean(context[-1]):.4f} over {settings.steps} Adam steps (learning rate "
           f"{settings.learning_rate}).", ""]
  return data, lines


def _reroute_prompt(frozen, config, args, settings):
  import jax  # pylint: disable=g-import-not-at-top
  from moejax.interventions import reroute  # pylint: disable=g-import-not-at-top
  from moejax.train import setup  # pylint: disable=g-import-not-at-top
  tokenizer = setup.tokenizer(config)
  prompt = np.asarray(tokenizer.encode(args.prompt), np.int32)[None]
  if prompt.shape[1] < 2:
    raise ValueError("--prompt must hold at least 2 tokens")
  tokens, _ = reroute.generate(frozen, prompt, args.generate, settings,
                               temperature=args.temperature,
                               rng=jax.random.PRNGKey(args.seed))
  text = tokenizer.decode(np.asarray(tokens)[0, prompt.shape[1]:])
  data = {"prompt": args.prompt, "generated": text, "tokens": np.asarray(tokens).tolist(),
          "settings": vars(args)}
  return data, ["Prompt:", "", "```", args.prompt, "```", "",
                f"Generated ({args.generate} tokens, deltas re-fitted every "
                f"{settings.adapt_every}):", "", "```", text, "```", ""]


def run_steer(frozen, config, args) -> tuple[dict[str, Any], list[str]]:
  from moejax.interventions import frozen as frozens, steer  # pylint: disable=g-import-not-at-top
  if args.domain is None:
    raise ValueError("--method steer needs --domain, the domain whose experts to promote")
  train = config.data.train_split
  reference, _ = frozens.sequence_rows(config, train, args.rows, domain=args.domain)
  contrast, _ = frozens.sequence_rows(config, train, args.rows)
  target, counts = frozens.sequence_rows(config, args.split or config.data.eval_split,
                                         args.rows, domain=args.domain)
  usage_ref = steer.expert_usage(frozen, reference)
  usage_all = steer.expert_usage(frozen, contrast)
  deltas = steer.steering_deltas(usage_ref, usage_all, args.top, args.strength,
                                 _layers(args.layers))
  layers = list(deltas)
  groups = {}
  if len(layers) > 2:
    groups = {"middle": tuple(layers[1:-1]), "outer": (layers[0], layers[-1])}
  out = steer.steer_rows(frozen, target, deltas, groups)
  changes = {k: interval(v - out["plain"]) for k, v in out.items() if k != "plain"}
  data = {"rows": counts, "settings": vars(args), "deltas": {l: d.tolist()
          for l, d in deltas.items()}, "nll": {k: v.tolist() for k, v in out.items()},
          "change": changes}
  lines = [f"Domain {args.domain}: {counts['rows']} evaluation rows; the top {args.top} "
           f"experts by lift per layer get +{args.strength}.", "",
           "| steered | promoted experts | nll change (95% CI) |", "|---|---|---|"]
  for name, change in changes.items():
    promoted = (np.flatnonzero(deltas[name]).tolist() if name in deltas
                else ", ".join(groups[name]))
    lines.append(f"| {name} | {promoted} | {_fmt(change)} |")
  lines += ["", f"Plain nll: {np.mean(out['plain']):.4f}. A negative change: steering "
            "helped.", ""]
  return data, lines


def run_oracle(frozen, config, args) -> tuple[dict[str, Any], list[str]]:
  from moejax.interventions import frozen as frozens, oracle  # pylint: disable=g-import-not-at-top
  try:
    strengths = tuple(float(s) for s in args.strengths.split(","))
  except ValueError:
    raise ValueError(f"--strengths must be numbers separated by commas, got "
                     f"{args.strengths!r}") from None
  rows, counts = frozens.sequence_rows(config, args.split or config.data.eval_split, args.rows)
  result = oracle.oracle_gap(frozen, rows, strengths, _layers(args.layers), args.passes)
  summary = oracle.summary(result)
  gaps = {l: interval(result["plain"] - v) for l, v in result["per_layer"].items()}
  gaps["joint"] = interval(result["plain"] - result["oracle"])
  data = {"rows": counts, "settings": vars(args), "summary": summary, "gap": gaps,
          "plain": result["plain"].tolist(), "oracle": result["oracle"].tolist(),
          "per_layer": {l: v.tolist() for l, v in result["per_layer"].items()},
          "choice": {l: v.tolist() for l, v in result["choice"].items()}}
  lines = [f"Rows: {counts['rows']}; candidates per layer: no bias, or "
           f"{', '.join(map(str, strengths))} on one expert.", "",
           "| searched | gap in nats (95% CI) | share of the plain nll |", "|---|---|---|"]
  for name, gap in gaps.items():
    lines.append(f"| {name} | {_fmt(gap)} | {gap['mean'] / summary['plain_nll']:.1%} |")
  lines += ["", f"Plain nll {summary['plain_nll']:.4f}, oracle {summary['oracle_nll']:.4f}. "
            "In-sample: the search reads the loss it reports.", ""]
  return data, lines


def run_roma(frozen, config, args) -> tuple[dict[str, Any], list[str]]:
  import flax  # pylint: disable=g-import-not-at-top
  from moejax.interventions import frozen as frozens, roma, steer  # pylint: disable=g-import-not-at-top
  train, train_counts = frozens.sequence_rows(config, config.data.train_split,
                                              args.train_rows, domain=args.domain)
  target, counts = frozens.sequence_rows(config, args.split or config.data.eval_split,
                                         args.rows, domain=args.domain)
  nll = {"plain": steer.rows_nll(frozen, target)}
  history = {}
  for name, weight in (("router_ft", 0.0), ("roma", args.roma_weight)):
    settings = roma.Settings(args.roma_steps, args.roma_learning_rate,
                             min(8, train.shape[0]), weight, args.neighbours, args.seed)
    tuned, losses = roma.finetune(frozen, train, train, settings)
    nll[name] = steer.rows_nll(tuned, target)
    history[name] = losses.tolist()
    routers, _ = roma.split_router_params(tuned.variables["params"])
    path = os.path.join(frozens.report_dir(args.workdir),
                        f"roma_step{frozen.step}_{name}.msgpack")
    with open(path, "wb") as f:
      f.write(flax.serialization.msgpack_serialize(
          flax.traverse_util.unflatten_dict({k: np.asarray(v) for k, v in routers.items()})))
  changes = {"router_ft": interval(nll["router_ft"] - nll["plain"]),
             "roma": interval(nll["roma"] - nll["plain"]),
             "roma - router_ft": interval(nll["roma"] - nll["router_ft"])}
  data = {"rows": counts, "train_rows": train_counts, "settings": vars(args),
          "nll": {k: v.tolist() for k, v in nll.items()}, "change": changes,
          "losses": history}
  lines = [f"Routers fine-tuned for {args.roma_steps} steps on {train_counts['rows']} "
           f"training rows; scored on {counts['rows']} evaluation rows.", "",
           "| comparison | nll change (95% CI) |", "|---|---|"]
  lines += [f"| {name} | {_fmt(change)} |" for name, change in changes.items()]
  lines += ["", f"Plain nll {np.mean(nll['plain']):.4f}; router fine-tuning "
            f"{np.mean(nll['router_ft']):.4f}; RoMA (lambda {args.roma_weight}) "
            f"{np.mean(nll['roma']):.4f}.", ""]
  return data, lines


RUNNERS = {"reroute": run_reroute, "steer": run_steer, "roma": run_roma,
           "oracle": run_oracle}


def intervene(args, log=None) -> str:
  """Runs args.method on args.workdir; returns the report's .md path."""
  from moejax.interventions import frozen as frozens  # pylint: disable=g-import-not-at-top
  log = log or (lambda line: None)
  if args.rows < 1:
    raise ValueError(f"--rows must be at least 1, got {args.rows}")
  if args.method == "reroute" and args.prompt is not None and args.generate < 1:
    raise ValueError(f"--generate must be at least 1 with --prompt, got {args.generate}")
  frozen, config = frozens.restore(args.workdir, args.step)
  log(f"{args.method} on {args.workdir} at step {frozen.step}")
  data, lines = RUNNERS[args.method](frozen, config, args)
  out = frozens.report_dir(args.workdir)
  generating = args.method == "reroute" and args.prompt is not None
  name = "reroute_generate" if generating else args.method
  stem = os.path.join(out, f"{name}_step{frozen.step}")
  with open(stem + ".json", "w", encoding="utf-8") as f:
    json.dump({"method": args.method, "step": frozen.step, **data}, f, default=str)
  with open(stem + ".md", "w", encoding="utf-8") as f:
    f.write("\n".join([f"# {name}: {os.path.abspath(args.workdir)}, step "
                       f"{frozen.step}", ""] + lines))
  return stem + ".md"


def parser():
  import argparse  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(prog="python -m moejax.intervene",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True, help="the run's workdir")
  p.add_argument("--method", required=True, choices=METHODS)
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--rows", type=int, default=DEFAULT_ROWS, help="evaluation rows")
  p.add_argument("--split", default=None, help="evaluation split (default: the run's)")
  p.add_argument("--layers", default=None, help="MoE layers, e.g. layer_0,layer_1 (all)")
  p.add_argument("--prompt_len", type=int, default=None, help="reroute: prompt tokens "
                 "(default half a row)")
  p.add_argument("--steps", type=int, default=10, help="reroute: Adam steps per fit")
  p.add_argument("--learning_rate", type=float, default=0.1, help="reroute: Adam rate")
  p.add_argument("--adapt_every", type=int, default=16, help="reroute: tokens between fits")
  p.add_argument("--prompt", default=None, help="reroute: text to continue")
  p.add_argument("--generate", type=int, default=64, help="reroute: tokens to sample")
  p.add_argument("--temperature", type=float, default=0.0, help="reroute: 0 is greedy")
  p.add_argument("--seed", type=int, default=0, help="reroute: sampling seed")
  p.add_argument("--domain", type=int, default=None, help="steer: the reference domain")
  p.add_argument("--top", type=int, default=2, help="steer: experts promoted per layer")
  p.add_argument("--strength", type=float, default=1.0, help="steer: their bias")
  p.add_argument("--train_rows", type=int, default=256, help="roma: training rows")
  p.add_argument("--roma_steps", type=int, default=200, help="roma: fine-tuning steps")
  p.add_argument("--roma_learning_rate", type=float, default=1e-3, help="roma: Adam rate")
  p.add_argument("--roma_weight", type=float, default=1.0, help="roma: lambda")
  p.add_argument("--neighbours", type=int, default=4, help="roma: k successful neighbours")
  p.add_argument("--strengths", default="3,-3", help="oracle: candidate biases")
  p.add_argument("--passes", type=int, default=1, help="oracle: coordinate-descent passes")
  return p


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  try:
    path = intervene(args, log=lambda line: print(line, file=sys.stderr, flush=True))
  except ValueError as e:
    print(f"intervene error: {' '.join(str(e).split())}", file=sys.stderr)
    return 1
  print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())

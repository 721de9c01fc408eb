"""Training cost of a grid's arms at initialisation and at the trained state,
timed interleaved in one process: tokens/s of router_zoo's routers or balance's
methods.

  PYTHONPATH=. TFDS_DATA_DIR=/tmp/tfds python experiments/throughput.py \\
      --grid router_zoo|balance --workdir workdir/<grid> [--dataset stdlib_text] \\
      [--seed 0] [--rounds 7] [--steps_per_round 5]

For every arm of the grid (experiments/router_zoo.py, experiments/balance.py)
whose run is finished in --workdir, the full train step of that run's model and
config (lm_tiny, 16 rows of 128 bytes; balance's as 4 micro-batches, with the
global scope's counting pass) is compiled once, then run with two states: the
initial one (the config's seed) and the trained one (the run's last checkpoint).
Each round times `--steps_per_round` steps of every (arm, state) in turn, the
order rotated from round to round, so that load from other processes falls on
all alike. Reported per (arm, state): tokens/s as the median over rounds with its
interquartile range, the ratio to the grid's baseline at the same state (the
median over rounds of the per-round ratio) and the experts per token that state
runs (mean over MoE layers). Adaptive routers (top_p, relu, null_experts) run
another number of experts per token once trained; their cost at initialisation
is not their cost. Writes <out>.json (default
experiments/results/<grid>_throughput.json), whose section the grid's report
takes (`report_lines`).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import harness  # noqa: E402  (experiments/)

STATES = ("init", "trained")


def _quartiles(values: list[float]) -> tuple[float, float]:
  q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
  return q[0], q[-1]


def _router_zoo_config(arm: str, dataset: str, seed: int, steps: int, data_dir: str):
  import router_zoo  # pylint: disable=g-import-not-at-top
  return router_zoo.run_config(arm, argparse.Namespace(steps=steps, data_dir=data_dir), seed,
                               dataset)


def _balance_config(arm: str, dataset: str, seed: int, steps: int, data_dir: str):
  import balance  # pylint: disable=g-import-not-at-top
  return balance.run_config(arm, dataset, seed, steps, data_dir)


def _router_zoo_arms() -> tuple[str, ...]:
  import router_zoo  # pylint: disable=g-import-not-at-top
  return router_zoo.ZOO


def _balance_arms() -> tuple[str, ...]:
  import balance  # pylint: disable=g-import-not-at-top
  return balance.METHODS


# grid: (its arms, its baseline, config(arm, dataset, seed, steps, data_dir)).
GRIDS = {"router_zoo": (_router_zoo_arms, "topk", _router_zoo_config),
         "balance": (_balance_arms, "none", _balance_config)}


def build(arm: str, args):
  """(step, {state: TrainState}, tokens per step, {state: experts per token}) of the
  arm's finished run, or None."""
  import jax  # pylint: disable=g-import-not-at-top
  from moejax.data import make_dataset  # pylint: disable=g-import-not-at-top
  from moejax.parallel import make_mesh  # pylint: disable=g-import-not-at-top
  from moejax.train import setup  # pylint: disable=g-import-not-at-top
  from moejax.train.checkpoints import Checkpointer, abstract_like, saved_steps  # pylint: disable=g-import-not-at-top
  from moejax.train.state import make_optimizer  # pylint: disable=g-import-not-at-top
  from moejax.train.step import make_train_step  # pylint: disable=g-import-not-at-top
  from moejax.train.trainer import init_state  # pylint: disable=g-import-not-at-top

  workdir = os.path.join(args.workdir, args.dataset, arm, f"seed{args.seed}")
  steps = saved_steps(os.path.join(workdir, "checkpoints"))
  if not steps:
    return None
  config = GRIDS[args.grid][2](arm, args.dataset, args.seed, max(steps), args.data_dir)
  model = setup.build_model(config)
  t = config.train
  tx = make_optimizer(t.learning_rate, t.warmup_steps, t.steps, t.weight_decay, t.grad_clip)
  mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
  with jax.set_mesh(mesh):
    initial, _ = init_state(model, tx, config, mesh)
    checkpointer = Checkpointer(workdir, t.keep_checkpoints)
    trained = checkpointer.restore(max(steps), abstract_like(initial))
    checkpointer.close()
  batch = next(iter(make_dataset(setup.pipeline_spec(config, config.data.train_split,
                                                     training=True), setup.tokenizer(config))))
  step = jax.jit(make_train_step(model, tx, t.num_microbatches, 1))
  key = jax.random.PRNGKey(0)
  states = {"init": initial, "trained": trained}
  epts = {}
  for name, state in states.items():       # compile (once) and warm up
    _, metrics = jax.block_until_ready(step(state, batch, key))
    layers = metrics["layers"]
    epts[name] = float(sum(float(m["experts_per_token"]) for m in layers.values())
                       / len(layers))
  tokens = t.batch_size * config.data.seq_len
  return (lambda state: jax.block_until_ready(step(state, batch, key))), states, tokens, epts


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--grid", required=True, choices=sorted(GRIDS))
  parser.add_argument("--workdir", default=None, help="the grid's workdir (workdir/<grid>)")
  parser.add_argument("--dataset", default="stdlib_text")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--steps_per_round", type=int, default=5)
  parser.add_argument("--data_dir", default=os.environ.get("TFDS_DATA_DIR",
                                                           "~/tensorflow_datasets"))
  parser.add_argument("--out", default=None,
                      help="output prefix (experiments/results/<grid>_throughput)")
  args = parser.parse_args()
  if args.rounds < 2 or args.steps_per_round < 1:
    parser.error("--rounds must be at least 2 and --steps_per_round at least 1")
  arms, baseline, _ = GRIDS[args.grid]
  args.workdir = args.workdir or os.path.join(REPO, "workdir", args.grid)
  args.out = args.out or os.path.join(REPO, "experiments", "results",
                                      f"{args.grid}_throughput")

  runs: dict[str, Any] = {}
  for arm in arms():
    print(f"[throughput] compiling {arm}", file=sys.stderr, flush=True)
    built = build(arm, args)
    if built is None:
      print(f"[throughput] {arm}: no finished run, left out", file=sys.stderr)
      continue
    runs[arm] = built
  if baseline not in runs:
    parser.error(f"--workdir {args.workdir} has no finished {baseline} run on "
                 f"{args.dataset} seed {args.seed}: the ratios need it")
  order = [(r, s) for r in runs for s in STATES]
  timings: dict[tuple[str, str], list[float]] = {key: [] for key in order}
  for round_index in range(args.rounds):
    shift = round_index % len(order)
    for router, state in order[shift:] + order[:shift]:
      run, states, tokens, _ = runs[router]
      start = time.perf_counter()
      for _ in range(args.steps_per_round):
        run(states[state])
      timings[(router, state)].append(tokens * args.steps_per_round
                                      / (time.perf_counter() - start))
    print(f"[throughput] round {round_index + 1}/{args.rounds}", file=sys.stderr,
          flush=True)
  results = []
  for arm, state in order:
    values = timings[(arm, state)]
    base = timings[(baseline, state)]
    low, high = _quartiles(values)
    results.append({
        "arm": arm, "state": state, "tokens_per_s_median": statistics.median(values),
        "tokens_per_s_q1": low, "tokens_per_s_q3": high, "tokens_per_s": values,
        "ratio_to_baseline": statistics.median(v / b for v, b in zip(values, base)),
        "experts_per_token": runs[arm][3][state]})
  harness.save(args.out + ".json", {
      "meta": {"machine": harness.machine_description(), "grid": args.grid,
               "baseline": baseline, "dataset": args.dataset, "seed": args.seed,
               "rounds": args.rounds, "steps_per_round": args.steps_per_round,
               "command": f"python experiments/throughput.py --grid {args.grid} --rounds "
                          f"{args.rounds} --steps_per_round {args.steps_per_round}"},
      "results": results})
  print(f"[throughput] wrote {args.out}.json", file=sys.stderr)


def report_lines(path: str) -> list[str]:
  """The training-cost section of a grid's report, from <grid>_throughput.json."""
  if not os.path.exists(path):
    return ["## Training cost", "",
            f"Not measured yet: run experiments/throughput.py (writes {os.path.basename(path)}).",
            ""]
  data = harness.load(path)
  meta, f = data["meta"], harness.fmt
  base = meta["baseline"]
  rows = {(r["arm"], r["state"]): r for r in data["results"]}
  lines = ["## Training cost, interleaved", "",
           f"`{meta['command']}`: the full train step of each arm's run on "
           f"{meta['dataset']} (seed {meta['seed']}), with its initial and its trained "
           f"state, timed round-robin in one process ({meta['rounds']} rounds of "
           f"{meta['steps_per_round']} steps each). Tokens/s: median over rounds "
           f"[interquartile range]; × {base}: median of the per-round ratio to {base} at "
           f"the same state. Machine: {meta['machine']}.", "",
           f"| arm | experts/token init → trained | tokens/s init | tokens/s trained | "
           f"× {base} init | × {base} trained |", "|---|---|---|---|---|---|"]
  for arm in dict.fromkeys(a for a, _ in rows):
    init, trained = rows.get((arm, "init")), rows.get((arm, "trained"))
    if init is None or trained is None:
      continue
    cell = lambda r: (f"{f(r['tokens_per_s_median'], 0)} [{f(r['tokens_per_s_q1'], 0)}, "
                      f"{f(r['tokens_per_s_q3'], 0)}]")
    lines.append(f"| {arm} | {f(init['experts_per_token'], 2)} → "
                 f"{f(trained['experts_per_token'], 2)} | {cell(init)} | {cell(trained)} | "
                 f"{f(init['ratio_to_baseline'], 2)} | {f(trained['ratio_to_baseline'], 2)} |")
  return lines + [""]


if __name__ == "__main__":
  main()

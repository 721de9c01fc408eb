"""Router cost in training, at initialisation and at the trained state, timed
interleaved in one process: the router zoo's tokens/s.

  PYTHONPATH=. TFDS_DATA_DIR=/tmp/tfds python experiments/zoo_throughput.py \\
      --zoo_workdir workdir/router_zoo [--dataset stdlib_text] [--seed 0] [--rounds 7]

For every router of configs/router_zoo.py whose run (experiments/router_zoo.py) is
finished in --zoo_workdir, the full train step of that run's model (lm_tiny, 16
rows of 128 bytes) is compiled once, then run with two states: the initial one
(the config's seed) and the trained one (the run's last checkpoint). Each round
times `--steps_per_round` steps of every (router, state) in turn, the order
rotated from round to round, so that load from other processes falls on all
alike. Reported per (router, state): tokens/s as the median over rounds with its
interquartile range, the ratio to topk at the same state (the median over
rounds of the per-round ratio) and the experts per token that state runs (mean
over MoE layers). Adaptive routers (top_p, relu, null_experts) run another
number of experts per token once trained; their cost at initialisation is not
their cost. Writes <out>.json; router_zoo.md reads it.
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


def build(router: str, args):
  """(step, {state: TrainState}, batch, tokens per step) of the router's zoo run."""
  import jax  # pylint: disable=g-import-not-at-top
  from moejax.data import make_dataset  # pylint: disable=g-import-not-at-top
  from moejax.parallel import make_mesh  # pylint: disable=g-import-not-at-top
  from moejax.train import setup  # pylint: disable=g-import-not-at-top
  from moejax.train.checkpoints import Checkpointer, abstract_like, saved_steps  # pylint: disable=g-import-not-at-top
  from moejax.train.state import make_optimizer  # pylint: disable=g-import-not-at-top
  from moejax.train.step import make_train_step  # pylint: disable=g-import-not-at-top
  from moejax.train.trainer import init_state  # pylint: disable=g-import-not-at-top
  import router_zoo  # pylint: disable=g-import-not-at-top

  workdir = os.path.join(args.zoo_workdir, args.dataset, router, f"seed{args.seed}")
  steps = saved_steps(os.path.join(workdir, "checkpoints"))
  if not steps:
    return None
  zoo_args = argparse.Namespace(steps=max(steps), data_dir=args.data_dir)
  config = router_zoo.run_config(router, zoo_args, args.seed, args.dataset)
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
  parser.add_argument("--zoo_workdir", default=os.path.join(REPO, "workdir", "router_zoo"))
  parser.add_argument("--dataset", default="stdlib_text")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--steps_per_round", type=int, default=5)
  parser.add_argument("--data_dir", default=os.environ.get("TFDS_DATA_DIR",
                                                           "~/tensorflow_datasets"))
  parser.add_argument("--out", default=os.path.join(REPO, "experiments", "results",
                                                    "zoo_throughput"))
  args = parser.parse_args()
  if args.rounds < 2 or args.steps_per_round < 1:
    parser.error("--rounds must be at least 2 and --steps_per_round at least 1")
  from configs.router_zoo import ROUTER_SETTINGS  # pylint: disable=g-import-not-at-top

  runs: dict[str, Any] = {}
  for router in ROUTER_SETTINGS:
    print(f"[zoo_throughput] compiling {router}", file=sys.stderr, flush=True)
    built = build(router, args)
    if built is None:
      print(f"[zoo_throughput] {router}: no finished run, left out", file=sys.stderr)
      continue
    runs[router] = built
  if "topk" not in runs:
    parser.error(f"--zoo_workdir {args.zoo_workdir} has no finished topk run on "
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
    print(f"[zoo_throughput] round {round_index + 1}/{args.rounds}", file=sys.stderr,
          flush=True)
  results = []
  for router, state in order:
    values = timings[(router, state)]
    base = timings[("topk", state)]
    low, high = _quartiles(values)
    results.append({
        "router": router, "state": state, "tokens_per_s_median": statistics.median(values),
        "tokens_per_s_q1": low, "tokens_per_s_q3": high, "tokens_per_s": values,
        "ratio_to_topk": statistics.median(v / b for v, b in zip(values, base)),
        "experts_per_token": runs[router][3][state]})
  harness.save(args.out + ".json", {
      "meta": {"machine": harness.machine_description(), "dataset": args.dataset,
               "seed": args.seed, "rounds": args.rounds,
               "steps_per_round": args.steps_per_round,
               "command": "python experiments/zoo_throughput.py --rounds "
                          f"{args.rounds} --steps_per_round {args.steps_per_round}"},
      "results": results})
  print(f"[zoo_throughput] wrote {args.out}.json", file=sys.stderr)


if __name__ == "__main__":
  main()

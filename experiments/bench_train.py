"""Training throughput of lm_tiny (MoE) against dense_tiny, measured side by side.

  PYTHONPATH=. python experiments/bench_train.py --repeats 40 [--data_dir DIR] \\
      > experiments/results/bench_train_cpu.json
  # the report experiments/results/bench_train.md from that JSON
  PYTHONPATH=. python experiments/bench_train.py --summarize \\
      experiments/results/bench_train_cpu.json --out experiments/results/bench_train.md

Both configs train on the same packed batches of stdlib_text (taken once from the
pipeline, so data loading is not timed). Each jitted train step is compiled and
warmed up, then steps alternate MoE, dense, MoE, dense, ...; the script prints
one JSON object with the median step times, tokens/s and the MoE/dense
throughput ratio (target on a 2-core CPU: at least 0.7). --summarize writes the
markdown report of that JSON (its "## Reading" section, written by hand, is kept).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "experiments"))

from moejax.data import make_dataset  # noqa: E402
from moejax.parallel import make_mesh  # noqa: E402
from moejax.train import setup  # noqa: E402
from moejax.train.state import make_optimizer  # noqa: E402
from moejax.train.step import make_train_step  # noqa: E402
from moejax.train.trainer import init_state  # noqa: E402
from report_file import (  # noqa: E402
    add_summary_arguments, results_path, summarize_command, write_or_print)

CONFIGS = os.path.join(REPO, "configs")
TARGET = 0.7          # MoE / dense throughput, on a 2-core CPU
MODELS = (("lm_tiny", "lm_tiny (MoE)"), ("dense_tiny", "dense_tiny"))


def load_config(name: str, data_dir: str):
  config = setup.config_from_file(os.path.join(CONFIGS, f"{name}.py"))
  config.data.data_dir = data_dir
  return config


def compiled_step(config, batch):
  setup.check(config)
  model = setup.build_model(config)
  mesh = make_mesh(*setup.mesh_shape(config))
  t = config.train
  tx = make_optimizer(t.learning_rate, t.warmup_steps, t.steps, t.weight_decay, t.grad_clip)
  state, _ = init_state(model, tx, config, mesh)
  step = jax.jit(make_train_step(model, tx, t.num_microbatches))
  key = jax.random.PRNGKey(0)
  state, metrics = step(state, batch, key)          # compile and warm up
  jax.block_until_ready(metrics)
  params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(state.params))
  return step, state, key, params


def report_lines(result: dict, path: str, out: str | None) -> list[str]:
  """The markdown report of the JSON object `result` read from `path`."""
  m = result["machine"]
  where = f"{m['cpu_count']}-core CPU" if m["backend"] == "cpu" else m["device"]
  ratio = result["moe_over_dense_throughput"]
  lines = [f"# Training throughput: lm_tiny (MoE) against dense_tiny, {where}", "",
           "`experiments/bench_train.py` (its docstring gives the method): the jitted train "
           "steps of `configs/lm_tiny.py` (every FFN an MoE of SwiGLU experts) and "
           "`configs/dense_tiny.py` (the same with a dense SwiGLU FFN of width K·F in place "
           "of each MoE, so the same active FFN parameters), on the same packed batch of "
           f"`stdlib_text` ({result['tokens_per_step']} tokens per step), alternating MoE, "
           "dense, MoE, dense after compilation and a warm-up step; medians of "
           f"{result['repeats']} steps each.", "", "```",
           f"PYTHONPATH=. python experiments/bench_train.py --repeats {result['repeats']} > "
           f"{results_path(path)}",
           summarize_command("bench_train.py", [path], out), "```", "",
           f"Machine: jax {m['jax']} {m['backend'].upper()} backend, {m['cpu_count']} cores, "
           f"{m['platform']}.", "",
           "| model | parameters | median step | tokens/s |", "|---|---|---|---|"]
  for name, label in MODELS:
    r = result[name]
    lines.append(f"| {label} | {r['parameters'] / 1e6:.2f}M | "
                 f"{1e3 * r['median_step_s']:.0f} ms | {r['tokens_per_s']:,.0f} |")
  lines += ["", f"**MoE / dense throughput: {ratio:.2f}** (target at least {TARGET}: "
            f"{'met' if ratio >= TARGET else 'not met'}). Raw JSON: "
            f"`{os.path.basename(path)}`.", ""]
  return lines


def summarize(path: str, out: str | None = None) -> None:
  """The markdown report of the JSON at `path`, written to `out` (its reading kept) or
  printed."""
  with open(path, encoding="utf-8") as f:
    result = json.load(f)
  write_or_print(out, report_lines(result, path, out))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--data_dir", default=os.environ.get("TFDS_DATA_DIR",
                                                           "~/tensorflow_datasets"))
  add_summary_arguments(parser, metavar="JSON")
  args = parser.parse_args(argv)
  if args.summarize:
    summarize(args.summarize, args.out)
    return

  configs = {name: load_config(name, args.data_dir) for name in ("lm_tiny", "dense_tiny")}
  spec = setup.pipeline_spec(configs["lm_tiny"], "train", training=True)
  batch = {k: jax.numpy.asarray(v) for k, v in next(iter(make_dataset(spec))).items()}
  runs = {name: compiled_step(config, batch) for name, config in configs.items()}
  times = {name: [] for name in runs}
  states = {name: run[1] for name, run in runs.items()}
  for _ in range(args.repeats):
    for name, (step, _, key, _) in runs.items():
      start = time.perf_counter()
      states[name], metrics = step(states[name], batch, key)
      jax.block_until_ready(metrics)
      times[name].append(time.perf_counter() - start)
  tokens = int(np.prod(batch["tokens"].shape)) - batch["tokens"].shape[0]
  result = {"tokens_per_step": tokens, "repeats": args.repeats}
  for name in runs:
    median = statistics.median(times[name])
    result[name] = {"median_step_s": median, "min_step_s": min(times[name]),
                    "tokens_per_s": tokens / median, "parameters": runs[name][3]}
  result["moe_over_dense_throughput"] = (result["lm_tiny"]["tokens_per_s"]
                                         / result["dense_tiny"]["tokens_per_s"])
  result["machine"] = {"jax": jax.__version__, "backend": jax.default_backend(),
                       "device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
                       "platform": platform.platform()}
  print(json.dumps(result))


if __name__ == "__main__":
  main()

"""Router cost: the MoE layer's forward+backward with each router, against a dense
FFN of the same active width and against top-k, side by side in one process.

  PYTHONPATH=. python experiments/bench_routers.py --repeats 10 \\
      > experiments/results/bench_routers_cpu.jsonl
  PYTHONPATH=. python experiments/bench_routers.py --size gpu --dtype bfloat16 > routers.jsonl
  # the report experiments/results/bench_routers.md from the CPU run's JSON lines
  PYTHONPATH=. python experiments/bench_routers.py --summarize \\
      experiments/results/bench_routers_cpu.jsonl --out experiments/results/bench_routers.md

Each router runs at the settings of configs/router_zoo.py (top-2 of 8 compute, or
K_max = 4 where the count adapts), in training mode (deterministic=False: the
Sinkhorn plan is solved, random routing draws), on the `sorted` engine. What is
timed: the jitted value_and_grad of sum(y**2) + aux.loss with respect to (params,
x). The dense FFN (hidden width K*F) and all routers are compiled and warmed up
first, then timed round-robin (dense, topk, expert_choice, ..., dense, topk, ...)
so that load from other processes hits all alike; reported are the median
milliseconds, the ratio of medians to the dense FFN and to topk, the experts per
token actually run, and the compile-time peak memory estimate
(bench_layer.memory). An adaptive router's time reflects its routing at
initialisation, not after training.

Sizes: `cpu` T = 2048 (B = 2, L = 1024), D = 256, F = 512; `gpu` T = 16384
(B = 16), D = 1024, F = 2048. E = 8 in both.
Output: one JSON line per router on stdout, progress on stderr. --summarize writes
the markdown report of such a file (its "## Reading" section, written by hand, is
kept).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import jax
import jax.numpy as jnp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench_layer import DenseFFN, interleaved, log, machine, memory, sum_squares  # noqa: E402
from configs.router_zoo import NO_SWITCH, ROUTER_SETTINGS, TOP_K  # noqa: E402
from moejax import MoE, routers  # noqa: E402
from moejax.core import RoutingContext  # noqa: E402
from report_file import (  # noqa: E402
    add_summary_arguments, results_path, summarize_command, write_or_print)

SIZES = {"cpu": dict(B=2, L=1024, D=256, E=8, F=512),
         "gpu": dict(B=16, L=1024, D=1024, E=8, F=2048)}
BASE_K = 2


class Run:
  """A compiled forward+backward step with its inputs."""

  def __init__(self, step, params, *inputs):
    self.executable = jax.jit(step).lower(params, *inputs).compile()
    self.memory = memory(self.executable)
    self.args = (params, *inputs)

  def __call__(self):
    return jax.block_until_ready(self.executable(*self.args))


def dense_run(size, x, dtype) -> Run:
  module = DenseFFN(BASE_K * size["F"], dtype=dtype)
  params = jax.jit(module.init)(jax.random.key(0), x)["params"]

  def step(params, x):
    return jax.value_and_grad(lambda p, x: sum_squares(module.apply({"params": p}, x)),
                              argnums=(0, 1))(params, x)
  return Run(step, params, x)


def router_run(name, size, x, token_ids, dtype, backend) -> Run:
  settings = dict(ROUTER_SETTINGS.get(name, {}))
  settings.pop("allow_noncausal", None)          # the benchmark is not causal
  weights = dict(routers.get(name).default_loss_weights)
  if name in NO_SWITCH:
    weights["switch"] = 0.0
  module = MoE(num_experts=size["E"], top_k=TOP_K.get(name, BASE_K), hidden_dim=size["F"],
               router=name, router_kwargs=settings, loss_weights=weights, backend=backend,
               dtype=dtype)
  ctx = RoutingContext(token_ids=token_ids)
  rngs = {"params": jax.random.key(0), "router": jax.random.key(1)}
  variables = jax.jit(lambda x: module.init(rngs, x, ctx, deterministic=False))(x)
  params, routing = variables["params"], {k: v for k, v in variables.items() if k != "params"}

  def step(params, routing, x):
    def loss(params, x):
      (y, aux), _ = module.apply({"params": params, **routing}, x, ctx, deterministic=False,
                                 rngs={"router": jax.random.key(2)}, mutable=["routing"])
      return sum_squares(y) + aux.loss, aux.metrics["experts_per_token"]
    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
  return Run(step, params, routing, x)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", choices=list(SIZES), default="cpu")
  parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  parser.add_argument("--backend", default="xla", help="grouped-matmul backend of `sorted`")
  parser.add_argument("--routers", default="all")
  parser.add_argument("--repeats", type=int, default=10)
  add_summary_arguments(parser)
  args = parser.parse_args(argv)
  if args.summarize:
    summarize(args.summarize, args.out)
    return
  names = routers.names() if args.routers == "all" else args.routers.split(",")
  size, dtype = SIZES[args.size], jnp.dtype(args.dtype)
  x = jax.random.normal(jax.random.key(0), (size["B"], size["L"], size["D"]), dtype)
  token_ids = jax.random.randint(jax.random.key(1), (size["B"], size["L"]), 0, 256)
  runs = {"dense": dense_run(size, x, dtype)}
  for name in names:
    log(f"compiling {name}")
    runs[name] = router_run(name, size, x, token_ids, dtype, args.backend)
  experts = {}
  for name, run in runs.items():
    out = run()
    if name != "dense":
      experts[name] = float(out[0][1])
  log(f"timing {len(runs)} runs x {args.repeats} repeats")
  times = dict(zip(runs, interleaved(list(runs.values()), args.repeats)))
  median = {name: 1e3 * statistics.median(t) for name, t in times.items()}
  info = machine()
  for name in names:
    print(json.dumps({
        "router": name, "size": args.size, **size, "dtype": args.dtype,
        "backend": args.backend, "top_k": TOP_K.get(name, BASE_K),
        "median_ms": round(median[name], 2), "dense_median_ms": round(median["dense"], 2),
        "ratio_to_dense": round(median[name] / median["dense"], 3),
        "ratio_to_topk": round(median[name] / median["topk"], 3) if "topk" in median else None,
        "experts_per_token": round(experts[name], 3),
        "peak_estimate_mib": round(runs[name].memory.get("peak_estimate", 0) / 2 ** 20, 1),
        "dense_peak_estimate_mib": round(
            runs["dense"].memory.get("peak_estimate", 0) / 2 ** 20, 1),
        "repeats": args.repeats, "machine": info}), flush=True)


def run_command(first: dict, path: str) -> str:
  """The command that wrote the JSON lines at `path`, from their settings."""
  options = [f"--{name} {first[name]}" for name, default in
             (("size", "cpu"), ("dtype", "float32"), ("backend", "xla"))
             if first[name] != default]
  return " ".join(["PYTHONPATH=. python experiments/bench_routers.py", *options,
                   f"--repeats {first['repeats']} > {results_path(path)}"])


def report_lines(rows: list[dict], path: str, out: str | None) -> list[str]:
  """The markdown report of the JSON lines `rows` read from `path`."""
  first = rows[0]
  m = first["machine"]
  host = (f", {m['cpu_count']} cores ({m['cpu_model']}), {m['ram_gib']} GiB"
          if m["backend"] == "cpu" else "")
  lines = ["# Router cost: layer forward+backward per router", "",
           "`experiments/bench_routers.py` (its docstring gives the method):", "", "```",
           run_command(first, path),
           summarize_command("bench_routers.py", [path], out), "```", "",
           f"Device: {m['device_kind']} ({m['backend']}), jax {m['jax']}{host}; T = "
           f"{first['B'] * first['L']}, D = {first['D']}, E = {first['E']}, F = {first['F']}, "
           f"{first['dtype']}, backend {first['backend']}, median of {first['repeats']}; dense "
           f"FFN (width 2F) {first['dense_median_ms']} ms, peak estimate "
           f"{first['dense_peak_estimate_mib']} MiB.", "",
           "Each router at its configs/router_zoo.py settings, in training mode, on the "
           f"`sorted` engine ({first['backend']} backend, its default block size); "
           '"experts/token run" is what the router chose at initialisation. Ratios are of '
           "medians taken round-robin in one process.", "",
           "| router | K (max) | experts/token run | ms | / dense | / topk | peak MiB |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    topk = "-" if r["ratio_to_topk"] is None else f"{r['ratio_to_topk']:.2f}"
    lines.append(f"| {r['router']} | {r['top_k']} | {r['experts_per_token']:.2f} | "
                 f"{r['median_ms']:.2f} | {r['ratio_to_dense']:.2f} | "
                 f"{topk} | {r['peak_estimate_mib']:.0f} |")
  return lines + [""]


def summarize(path: str, out: str | None = None) -> None:
  """The markdown report of the JSON lines at `path`, written to `out` (its reading
  kept) or printed."""
  with open(path, encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if line.strip()]
  write_or_print(out, report_lines(rows, path, out))


if __name__ == "__main__":
  main()

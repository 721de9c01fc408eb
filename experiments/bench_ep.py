"""Expert parallelism on 8 devices: plain all_to_all EP, LLEP and the dropless
all-gather path under balanced, Zipf-skewed and single-expert-skewed routing.

  # 8 simulated CPU devices
  PYTHONPATH=. python experiments/bench_ep.py --size cpu --repeats 7 \\
      > experiments/results/bench_ep_cpu.jsonl
  # the report experiments/results/bench_ep.md from those JSON lines
  PYTHONPATH=. python experiments/bench_ep.py --summarize \\
      experiments/results/bench_ep_cpu.jsonl --out experiments/results/bench_ep.md

What is timed: the jitted forward+backward (grad of sum(sin(y)) with respect to x
and the expert weights) of moejax.parallel.expert_parallel_apply under shard_map
on a (1, 8, 1) mesh: one expert-parallel group of 8 devices, E/8 experts each.
Plans are drawn, not learned (top-K distinct experts per token):
  balanced  uniform experts
  zipf      expert e with probability proportional to 1 / (e + 1)^1.2
  single    half the tokens take expert 0 first (it gets 50% of the tokens)
Methods:
  ep            all_to_all, fixed transport, dropless buffers (C = A_local)
  ep_cf2        all_to_all, fixed transport, capacity factor 2 (drops counted)
  llep          ep + LLEP (lambda 1.3, alpha 1.0, m 1, 2 guest slots)
  llep_cf1.25   llep with buffers of capacity factor 1.25 per destination
  all_gather    dropless all-gather / reduce-scatter
and on GPU/TPU also ragged transport: ep_ragged (dropless) and
llep_ragged_cf1.25 (LLEP with a receive buffer of 1.25 A_local rows: LLEP bounds
a device's total rows, which the ragged buffer sizes, while the fixed transport
sizes each source-destination pair).
All methods of a scenario are compiled and warmed up, then timed round-robin;
reported are median milliseconds, the ratio to `ep`, the rows each device runs
(max/mean: what a real multi-device step waits for), dropped rows, and the
compile-time per-device memory estimate. On simulated CPU devices the devices
share the host's cores, so times follow total work, not the slowest device:
there the load statistics and memory are the result, and the times need a real
multi-GPU run.

Output: one JSON object per line on stdout, one per (scenario, method), each with
the machine description; progress on stderr. --summarize writes the markdown
report of such a file (its "## Reading" section, written by hand, is kept).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

if "--summarize" not in sys.argv:
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "experiments"))

from bench_layer import log, machine, memory  # noqa: E402
from report_file import (  # noqa: E402
    add_summary_arguments, results_path, summarize_command, write_or_print)
from moejax import dispatch  # noqa: E402
from moejax.core import RoutingPlan  # noqa: E402
from moejax.experts import ExpertFFN  # noqa: E402
from moejax.parallel import ExpertParallel, expert_parallel_apply, make_mesh  # noqa: E402
from moejax.parallel.exchange import has_ragged_all_to_all  # noqa: E402

SIZES = {"tiny": dict(T=512, D=32, F=64, E=16, K=2),
         "cpu": dict(T=8192, D=128, F=256, E=32, K=2),
         "gpu": dict(T=65536, D=1024, F=2048, E=64, K=2)}
METHODS = {
    "ep": ExpertParallel(transport="fixed"),
    "ep_cf2": ExpertParallel(transport="fixed", capacity_factor=2.0),
    "llep": ExpertParallel(transport="fixed", llep=True),
    "llep_cf1.25": ExpertParallel(transport="fixed", llep=True, capacity_factor=1.25),
    "all_gather": ExpertParallel(dispatch="all_gather"),
}
RAGGED_METHODS = {     # where the backend has ragged_all_to_all (GPU, TPU)
    "ep_ragged": ExpertParallel(transport="ragged"),
    "llep_ragged_cf1.25": ExpertParallel(transport="ragged", llep=True, capacity_factor=1.25),
}
SCENARIOS = ("balanced", "zipf", "single")


def draw_experts(scenario: str, num_tokens: int, num_experts: int, k: int,
                 rng: np.random.Generator) -> np.ndarray:
  """[T, K] distinct experts per token."""
  if scenario == "balanced":
    p = np.full(num_experts, 1.0 / num_experts)
  elif scenario == "zipf":
    p = 1.0 / np.arange(1, num_experts + 1) ** 1.2
    p /= p.sum()
  else:
    p = np.full(num_experts - 1, 1.0 / (num_experts - 1))
  out = np.empty((num_tokens, k), np.int32)
  for t in range(num_tokens):
    if scenario == "single":
      rest = rng.choice(np.arange(1, num_experts), size=k, replace=False, p=p)
      out[t] = [0, *rest[:k - 1]] if t % 2 == 0 else rest
    else:
      out[t] = rng.choice(num_experts, size=k, replace=False, p=p)
  return out


def make_step(settings: ExpertParallel, mesh, devices: int):
  engine = dispatch.create("sorted", block_size=64)

  def device(x, experts, weights, ffn):
    y, stats = expert_parallel_apply(x, RoutingPlan.from_topk(experts, weights), ffn, engine,
                                     settings)
    me = jax.nn.one_hot(jax.lax.axis_index("expert"), devices)
    rows = jax.lax.psum(me * stats.rows, "expert")
    return y, rows, jax.lax.psum(stats.dropped, "expert")

  run = jax.shard_map(device, mesh=mesh, in_specs=(P("expert"),) * 4,
                      out_specs=(P("expert"), P(), P()))

  def step(x, experts, weights, ffn):
    def loss(x, ffn):
      y, rows, dropped = run(x, experts, weights, ffn)
      return jnp.sum(jnp.sin(y)), (rows, dropped)
    (_, aux), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, ffn)
    return grads, aux
  return step


def bench(size: str, repeats: int):
  s = SIZES[size]
  devices = jax.device_count()
  mesh = make_mesh(1, devices, 1)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(s["T"], s["D"])), jnp.float32)
  weights = jnp.asarray(rng.uniform(0.1, 1.0, size=(s["T"], s["K"])), jnp.float32)
  scale = s["D"] ** -0.5
  ffn = ExpertFFN({
      "wi_gate": jnp.asarray(rng.normal(size=(s["E"], s["D"], s["F"])) * scale, jnp.float32),
      "wi_up": jnp.asarray(rng.normal(size=(s["E"], s["D"], s["F"])) * scale, jnp.float32),
      "wo": jnp.asarray(rng.normal(size=(s["E"], s["F"], s["D"])) * s["F"] ** -0.5,
                        jnp.float32)})
  methods = dict(METHODS)
  if has_ragged_all_to_all():
    methods.update(RAGGED_METHODS)
  for scenario in SCENARIOS:
    experts = jnp.asarray(draw_experts(scenario, s["T"], s["E"], s["K"], rng))
    compiled = {}
    for name, settings in methods.items():
      log(f"{scenario}/{name}: compiling")
      executable = jax.jit(make_step(settings, mesh, devices)).lower(
          x, experts, weights, ffn).compile()
      _, (rows, dropped) = jax.block_until_ready(executable(x, experts, weights, ffn))
      compiled[name] = (executable, np.asarray(rows), float(dropped))
    times = {name: [] for name in methods}
    for _ in range(repeats):
      for name, (executable, _, _) in compiled.items():
        start = time.perf_counter()
        jax.block_until_ready(executable(x, experts, weights, ffn))
        times[name].append(time.perf_counter() - start)
    base = statistics.median(times["ep"])
    for name, (executable, rows, dropped) in compiled.items():
      median = statistics.median(times[name])
      yield {"scenario": scenario, "method": name, "size": size, **s, "devices": devices,
             "median_ms": round(1e3 * median, 2), "vs_ep": round(median / base, 3),
             "device_rows": rows.astype(int).tolist(),
             "max_over_mean": round(float(rows.max() / rows.mean()), 3),
             "dropped": int(dropped), "memory": memory(executable),
             "repeats": repeats}


# The methods whose rows per device the report lists, for every skewed scenario.
ROW_METHODS = ("ep", "llep", "llep_cf1.25", "ep_ragged", "llep_ragged_cf1.25")


def read_records(path: str) -> list[dict]:
  """The JSON lines of the file at `path`."""
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def device_rows(rows: list[int]) -> str:
  """Rows per device, a run of 4 or more equal values written `value × count`."""
  parts, i = [], 0
  while i < len(rows):
    j = i
    while j < len(rows) and rows[j] == rows[i]:
      j += 1
    parts += [f"{rows[i]} × {j - i}"] if j - i >= 4 else [str(v) for v in rows[i:j]]
    i = j
  return " ".join(parts)


def machine_line(records: list[dict], path: str) -> str:
  """The report's machine sentence, from the records' `machine` where they have one."""
  info = records[0].get("machine")
  devices = records[0]["devices"]
  if not info:
    return f"Machine: not recorded in {os.path.basename(path)}."
  line = (f"Machine: {info['cpu_count']}-core {info['cpu_model']}, {info['ram_gib']} GiB, "
          f"JAX {info['jax']} {info['backend'].upper()}")
  if info["backend"] == "cpu":
    return (line + f", {devices} devices simulated with "
            f"`--xla_force_host_platform_device_count={devices}`.")
  return line + f", {info['device_count']} × {info['device_kind']}."


def report_lines(records: list[dict], path: str, out: str | None) -> list[str]:
  """The markdown report of the JSON lines `records` read from `path`."""
  s = records[0]
  n = s["devices"]
  lines = [f"# Expert parallelism on {n} devices: plain EP, LLEP, dropless all-gather", "",
           "`experiments/bench_ep.py` (its docstring gives the method):", "", "```",
           f"PYTHONPATH=. python experiments/bench_ep.py --size {s['size']} --repeats "
           f"{s['repeats']} > {results_path(path)}",
           summarize_command("bench_ep.py", [path], out), "```", ""]
  lines.append(
      machine_line(records, path) + f" T = {s['T']} tokens, D = {s['D']}, F = {s['F']} "
      f"(SwiGLU), E = {s['E']}, top-{s['K']}, one expert-parallel group of {n} devices "
      f"(mesh (1, {n}, 1), {s['E'] // n} experts each, A_local = {s['T'] * s['K'] // n} "
      f"slots per device). Forward + backward, median of {s['repeats']} round-robin "
      "repeats. The ratio is to `ep` in the same scenario. Peak memory is XLA's "
      "compile-time estimate per device (arguments + outputs + temporaries).")
  lines += ["", "| routing | method | ms (median) | vs ep | max/mean device rows | dropped | "
            "peak MiB/device |", "|---|---|---|---|---|---|---|"]
  for r in records:
    peak = r["memory"].get("peak_estimate")
    mib = f"{peak / 2**20:.1f}" if peak else "n/a"
    lines.append(f"| {r['scenario']} | {r['method']} | {r['median_ms']:.1f} | "
                 f"{r['vs_ep']:.2f}x | {r['max_over_mean']:.2f} | {r['dropped']} | {mib} |")
  methods = [m for m in ROW_METHODS if any(r["method"] == m for r in records)]
  scenarios = [c for c in dict.fromkeys(r["scenario"] for r in records) if c != "balanced"]
  rows = {(r["scenario"], r["method"]): r["device_rows"] for r in records}
  lines += ["", "Rows per device (what each device's grouped matmul runs):", "",
            "| routing | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
  for scenario in scenarios:
    lines.append(f"| {scenario} | " + " | ".join(
        device_rows(rows[scenario, m]) if (scenario, m) in rows else "-" for m in methods)
        + " |")
  return lines + [""]


def summarize(path: str, out: str | None = None) -> None:
  """The markdown report of the JSON lines at `path`, written to `out` (its reading
  kept) or printed."""
  write_or_print(out, report_lines(read_records(path), path, out))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
  parser.add_argument("--repeats", type=int, default=7)
  add_summary_arguments(parser)
  args = parser.parse_args(argv)
  if args.summarize:
    summarize(args.summarize, args.out)
    return
  info = machine()
  log(json.dumps(info))
  for record in bench(args.size, args.repeats):
    print(json.dumps({**record, "machine": info}), flush=True)


if __name__ == "__main__":
  main()

"""Layer benchmark: MoE forward+backward against a dense FFN of equal active FLOPs.

  PYTHONPATH=. python experiments/bench_layer.py > bench.jsonl          # default run
  PYTHONPATH=. python experiments/bench_layer.py --cases main_e8 \\
      --engines sorted_xla --block_sizes 64,128,256,512                 # block sweep
  # the report experiments/results/bench_layer_cpu.md from its three JSON-lines files
  PYTHONPATH=. python experiments/bench_layer.py --summarize \\
      experiments/results/bench_layer_cpu.jsonl experiments/results/bench_layer_cpu_blocks.jsonl \\
      experiments/results/bench_layer_cpu_bf16.jsonl --out experiments/results/bench_layer_cpu.md

What is timed: the jitted value_and_grad of sum(y**2) + aux.loss with respect to
(params, x), for the MoE layer (router -> capacity -> engine -> experts) and for a
dense FFN of hidden width K*F with the same expert_type and activation, built
with moejax.experts.FFNWeights(num_experts=None) and applied with dense_matmul,
so both run the same FFN math on the same tokens and the MoE does the same
active FFN FLOPs plus its router, dispatch and combine. Both are compiled and
run once (warm-up) before timing; repeats are interleaved (dense, moe, dense,
moe, ...) so load from other processes hits both alike. Reported: median and
min of the repeats, the ratio of medians and the ratio of minima.

Memory: on CPU, the compiled executable's memory_analysis(): XLA's static
buffer assignment (argument, output and temp bytes); `peak_estimate` =
argument + output + temp - alias is what the program needs live at once, as
planned at compile time, not a measured resident size. On GPU,
device.memory_stats() is recorded too (its peak is the process lifetime peak).

Engines (--engines): sorted_xla (one row per --block_sizes entry), and the slow
ones: sorted_ragged_dot (dense on CPU: XLA counts E times the FLOPs), einsum (GShard,
capacity_factor --einsum_capacity_factor, since dropless einsum needs [T, E, T]
tensors) and loop (the oracle, E times the FLOPs; not in the default list). Slow
engines run after all fast ones, on --slow_cases only (default main_e8, the
cheapest main case for them, when it is among --cases), and only if their
predicted time, dense median x (XLA-counted FLOPs ratio) x --predict_factor x
(repeats + 1), fits both --slow_budget_s and what is left of --time_budget_s;
otherwise they are recorded as skipped with the prediction. --skip_slow drops
them.

Einsum fit (--fit_experts, run last, outside the time budget): compile-only
memory analysis of the einsum layer's forward+backward, dropless and with the
capacity factor, over E at T, D, K, F of the scaling family (K*F fixed);
"fits" means peak_estimate <= --memory_budget_gb (default: this machine's RAM).
Nothing is allocated, so nothing can crash.

Output: one JSON object per line on stdout, one per (case, engine, backend,
block size), each with the machine description; one more for the einsum fit.
Progress goes to stderr.

Report (--summarize, one or more such files; --out the markdown file, whose "## Reading"
section, written by hand, is kept): a file of float32 runs without a block sweep gives
the main cases and the scaling curve, a file sweeping block sizes the block-size table,
a file of another dtype its own table, and the einsum fit its table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moejax import MoE
from moejax.experts import FFNWeights, dense_matmul
from report_file import (  # (experiments/)
    add_summary_arguments, results_path, summarize_command, write_or_print)

# Main cases, and the scaling family: E varies at fixed K*F = 8*256 = 2048, so
# active FLOPs stay those of main_e64 (which is the family's E=64 point). At E=8
# the family has K = E: every token visits every expert.
CASES = {
    "main_e64": dict(T=8192, D=512, E=64, K=8, F=256),
    "main_e8": dict(T=8192, D=512, E=8, K=2, F=1024),
    "scale_e8": dict(T=8192, D=512, E=8, K=8, F=256),
    "scale_e32": dict(T=8192, D=512, E=32, K=8, F=256),
    "scale_e128": dict(T=8192, D=512, E=128, K=8, F=256),
}
ENGINES = {  # name -> (engine, backend, slow)
    "sorted_xla": ("sorted", "xla", False),
    "sorted_ragged_dot": ("sorted", "ragged_dot", True),
    "einsum": ("einsum", None, True),
    "loop": ("loop", None, True),
}
MIB = 2 ** 20


def log(*parts: Any) -> None:
  print(*parts, file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
  """What ran the benchmark."""
  device = jax.devices()[0]
  cpu_model = None
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      cpu_model = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), None)
  ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  try:
    import jaxlib  # pylint: disable=import-outside-toplevel
    jaxlib_version = jaxlib.__version__
  except (ImportError, AttributeError):
    jaxlib_version = None
  return {"jax": jax.__version__, "jaxlib": jaxlib_version, "backend": jax.default_backend(),
          "device_kind": device.device_kind,
          "device_count": jax.device_count(), "cpu_count": os.cpu_count(),
          "cpu_affinity": len(os.sched_getaffinity(0)), "cpu_model": cpu_model,
          "ram_gib": round(ram / 2 ** 30, 1), "platform": platform.platform(),
          "python": platform.python_version()}


def parse_case(name: str) -> dict[str, int]:
  """A name in CASES, or `T:D:E:K:F`."""
  if name in CASES:
    return dict(CASES[name])
  try:
    t, d, e, k, f = (int(v) for v in name.split(":"))
  except ValueError:
    raise SystemExit(f"--cases: {name!r} is neither one of {list(CASES)} nor T:D:E:K:F")
  return dict(T=t, D=d, E=e, K=k, F=f)


class DenseFFN(nn.Module):
  """The dense baseline: one FFN of hidden width K*F over all tokens."""

  hidden_dim: int
  expert_type: str = "glu"
  activation: str = "silu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    batch, length, model_dim = x.shape
    ffn = FFNWeights(self.hidden_dim, None, self.expert_type, self.activation, self.dtype,
                     name="ffn")(model_dim)
    tokens = x.reshape(batch * length, model_dim).astype(self.dtype)
    return ffn(tokens, dense_matmul).reshape(batch, length, model_dim)


def sum_squares(y):
  return jnp.sum(jnp.square(y.astype(jnp.float32)))


def dense_step(case, args) -> tuple[nn.Module, Callable]:
  """The dense module and its step: (params, x) -> ((loss, {}), grads)."""
  module = DenseFFN(case["K"] * case["F"], args.expert_type, args.activation, args.dtype)

  def loss(params, x):
    return sum_squares(module.apply({"params": params}, x)), {}
  return module, jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)


def moe_step(case, engine, backend, block_size, capacity_factor,
             args) -> tuple[nn.Module, Callable]:
  """The MoE module and its step: (params, x) -> ((loss, routing stats), grads)."""
  module = MoE(num_experts=case["E"], top_k=case["K"], hidden_dim=case["F"], engine=engine,
               backend=backend or "xla", block_size=block_size or 128,
               capacity_factor=capacity_factor, expert_type=args.expert_type,
               activation=args.activation, dtype=args.dtype)

  def loss(params, x):
    y, aux = module.apply({"params": params}, x)
    stats = {k: aux.metrics[k] for k in ("load", "max_violation", "dropped_share")}
    return sum_squares(y) + aux.loss, stats
  return module, jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)


def memory(compiled) -> dict[str, Optional[int]]:
  """Compile-time buffer sizes, in bytes."""
  try:
    stats = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    stats = None
  if stats is None:
    return {}
  out = {k: int(getattr(stats, f"{k}_size_in_bytes", 0) or 0)
         for k in ("argument", "output", "temp", "alias", "generated_code")}
  out["peak_estimate"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  return out


def xla_flops(compiled) -> Optional[float]:
  """FLOPs XLA counts; a while loop's body counts once (meaningless for sorted_xla)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0)) if cost else None


class Compiled:
  """A jitted step compiled for (params, x), with its warm-up output."""

  def __init__(self, module, step, x, seed):
    self.params = jax.jit(module.init)(jax.random.PRNGKey(seed), x)["params"]
    start = time.perf_counter()
    self.executable = jax.jit(step).lower(self.params, x).compile()
    self.compile_s = time.perf_counter() - start
    self.memory = memory(self.executable)
    self.flops = xla_flops(self.executable)
    self.x = x
    self.stats = None
    self.warmup_s = None

  def __call__(self):
    return jax.block_until_ready(self.executable(self.params, self.x))

  def warm_up(self):
    start = time.perf_counter()
    (_, self.stats), _ = self()
    self.warmup_s = time.perf_counter() - start


def interleaved(runs: list[Compiled], repeats: int) -> list[list[float]]:
  """Seconds of each run per repeat, visiting runs round-robin."""
  times = [[] for _ in runs]
  for _ in range(repeats):
    for run, series in zip(runs, times):
      start = time.perf_counter()
      run()
      series.append(time.perf_counter() - start)
  return times


def summary_ms(series: list[float]) -> dict[str, Any]:
  ms = [1e3 * s for s in series]
  return {"median": round(statistics.median(ms), 2), "min": round(min(ms), 2),
          "all": [round(v, 1) for v in ms]}


def routing(stats, block_size, num_slots) -> dict[str, Any]:
  load = np.asarray(stats["load"])
  out = {"max_violation": round(float(stats["max_violation"]), 4),
         "dropped_share": round(float(stats["dropped_share"]), 4),
         "load_min": int(load.min()), "load_max": int(load.max())}
  if block_size:  # rows of the padded grouped layout the xla backend visits
    rows = int(np.sum(np.ceil(load / block_size) * block_size))
    out["padded_rows"] = rows
    out["padding_overhead"] = round(rows / num_slots - 1.0, 4)
  return out


def record(case_name, case, spec, args, moe: Compiled, dense: Compiled, times, **extra):
  """One JSON object (a dict) describing one measured or skipped configuration."""
  engine, backend, _ = ENGINES[spec["name"]]
  out = {"bench": "layer", "case": case_name, **case, "active_hidden": case["K"] * case["F"],
         "expert_type": args.expert_type, "activation": args.activation,
         "dtype": jnp.dtype(args.dtype).name, "engine": engine, "backend": backend,
         "block_size": spec.get("block_size"), "capacity_factor": spec.get("capacity_factor"),
         "repeats": args.repeats}
  if times is not None:
    moe_ms, dense_ms = summary_ms(times[1]), summary_ms(times[0])
    out.update(status="ok", moe_ms=moe_ms, dense_ms=dense_ms,
               ratio_median=round(moe_ms["median"] / dense_ms["median"], 3),
               ratio_min=round(moe_ms["min"] / dense_ms["min"], 3))
  out.update(extra)
  out["compile_s"] = {"moe": round(moe.compile_s, 2), "dense": round(dense.compile_s, 2)}
  out["warmup_call_s"] = {"moe": moe.warmup_s and round(moe.warmup_s, 2),
                          "dense": dense.warmup_s and round(dense.warmup_s, 2)}
  out["memory_bytes"] = {"moe": moe.memory, "dense": dense.memory,
                         "source": "compiled.memory_analysis() (XLA buffer assignment)"}
  device_stats = jax.devices()[0].memory_stats()
  if device_stats:
    out["device_memory_stats"] = {k: device_stats.get(k) for k in
                                  ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")}
  out["xla_flops"] = {"moe": moe.flops, "dense": dense.flops}
  if moe.stats is not None:
    out["routing"] = routing(moe.stats, spec.get("block_size") if backend == "xla" else None,
                             case["T"] * case["K"])
  out["process_max_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
  out["loadavg_1m"] = round(os.getloadavg()[0], 2)
  out["machine"] = MACHINE
  return out


def emit(obj):
  print(json.dumps(obj), flush=True)


def inputs(case, args):
  shape = (1, case["T"], case["D"])
  return jax.random.normal(jax.random.PRNGKey(args.seed + 1), shape).astype(args.dtype)


def run_fast(case_name, case, specs, args) -> Optional[float]:
  """Dense and every fast spec of a case, interleaved; returns the dense median (s)."""
  x = inputs(case, args)
  dense = Compiled(*dense_step(case, args), x, args.seed)
  moes = []
  for spec in specs:
    engine, backend, _ = ENGINES[spec["name"]]
    moes.append(Compiled(*moe_step(case, engine, backend, spec.get("block_size"),
                                   spec.get("capacity_factor"), args), x, args.seed))
  for run in [dense] + moes:
    run.warm_up()
  log(f"[{case_name}] fast: {[s['label'] for s in specs]} x {args.repeats} repeats")
  times = interleaved([dense] + moes, args.repeats)
  for spec, moe, series in zip(specs, moes, times[1:]):
    emit(record(case_name, case, spec, args, moe, dense, [times[0], series]))
  return statistics.median(times[0]) if times[0] else None


def run_slow(case_name, case, spec, args, dense_s, deadline) -> None:
  """One slow spec, if its predicted time fits the budgets."""
  x = inputs(case, args)
  engine, backend, _ = ENGINES[spec["name"]]
  dense = Compiled(*dense_step(case, args), x, args.seed)
  moe = Compiled(*moe_step(case, engine, backend, None, spec.get("capacity_factor"), args),
                 x, args.seed)
  ratio = moe.flops / dense.flops if moe.flops and dense.flops else float("inf")
  if engine == "loop":  # a scan over E: XLA counts its body once
    ratio *= case["E"]
  call_s = (dense_s or 0.0) * ratio * args.predict_factor
  predicted = call_s * (args.repeats + 1) + (dense_s or 0.0) * (args.repeats + 1)
  left = deadline - time.perf_counter()
  extra = {"flops_ratio_xla": round(ratio, 2), "predicted_s": round(predicted, 1),
           "budget_left_s": round(left, 1)}
  if predicted > min(args.slow_budget_s, left):
    log(f"[{case_name}] {spec['label']}: skipped, predicted {predicted:.0f} s, "
        f"left {left:.0f} s")
    emit(record(case_name, case, spec, args, moe, dense, None, status="skipped",
                skip_reason=f"predicted {predicted:.0f} s > min(slow_budget_s "
                f"{args.slow_budget_s:.0f}, time left {left:.0f})", **extra))
    return
  log(f"[{case_name}] {spec['label']}: predicted {predicted:.0f} s")
  dense.warm_up()
  moe.warm_up()
  times = interleaved([dense, moe], args.repeats)
  emit(record(case_name, case, spec, args, moe, dense, times, **extra))


def einsum_fit(args) -> dict[str, Any]:
  """Compile-only memory of einsum forward+backward over E (scaling family shapes)."""
  base = CASES["scale_e8"]
  budget = args.memory_budget_gb * 2 ** 30
  x = jax.ShapeDtypeStruct((1, base["T"], base["D"]), args.dtype)
  rows = []
  for capacity_factor in (None, args.einsum_capacity_factor):
    for num_experts in args.fit_experts:
      top_k = base["K"]
      case = dict(base, E=num_experts)
      if top_k > num_experts:
        continue
      module, step = moe_step(case, "einsum", None, None, capacity_factor, args)
      cap = (base["T"] if capacity_factor is None else
             max(1, math.ceil(capacity_factor * base["T"] * top_k / num_experts)))
      # dispatch (activation dtype) and combine (float32), [T, E, C] each
      tensors = base["T"] * num_experts * cap * (jnp.dtype(args.dtype).itemsize + 4)
      row = {"E": num_experts, "capacity_factor": capacity_factor, "C": cap,
             "dispatch_combine_bytes": tensors}
      try:
        params = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)["params"]
        row.update(memory(jax.jit(step).lower(params, x).compile()))
        row["fits"] = row["peak_estimate"] <= budget
      except Exception as e:  # pylint: disable=broad-except
        row.update(error=f"{type(e).__name__}: {str(e)[:200]}", fits=False)
      log(f"[einsum_fit] cf={capacity_factor} E={num_experts}: "
          f"{row.get('peak_estimate', 0) / 2 ** 30:.1f} GiB fits={row['fits']}")
      rows.append(row)
      if capacity_factor is None and not row["fits"]:
        break  # dropless grows with E: the first miss ends the search
  largest = {}
  for name, cf in (("dropless", None), (f"cf_{args.einsum_capacity_factor}",
                                        args.einsum_capacity_factor)):
    fits = [r["E"] for r in rows if r["capacity_factor"] == cf and r["fits"]]
    largest[name] = max(fits) if fits else None
  return {"bench": "layer_einsum_fit", "T": base["T"], "D": base["D"], "K": base["K"],
          "F": base["F"], "dtype": jnp.dtype(args.dtype).name,
          "memory_budget_bytes": int(budget),
          "method": "compile-only memory_analysis peak_estimate vs memory_budget_gb",
          "largest_E_fits": largest, "rows": rows, "machine": MACHINE}


# ----------------------------------------------------------------------------
# --summarize: JSON lines -> markdown report

MAIN_CASES = tuple(name for name in CASES if name.startswith("main_"))
SCALING = CASES["scale_e8"]          # the scaling family: these K, F, T, D at any E


def _mib(n):
  return f"{n / MIB:,.0f}" if n is not None else "-"


def _percent(share: float) -> str:
  return f"{100 * share:.1f}%"


def _is_xla(o) -> bool:
  return o["engine"] == "sorted" and o["backend"] == "xla"


def _layers(records):
  """The timed configurations among a file's records."""
  return [o for o in records if o["bench"] == "layer"]


def _swept(records) -> bool:
  """Whether a file times one case at several block sizes."""
  sizes = {}
  for o in _layers(records):
    if _is_xla(o):
      sizes.setdefault(o["case"], set()).add(o["block_size"])
  return any(len(v) > 1 for v in sizes.values())


def _dtype(records) -> str:
  return next((o["dtype"] for o in _layers(records)), "float32")


def case_label(o, hidden: bool = True) -> str:
  """A case as the report names it: E and K, and F unless `hidden` is False."""
  return f"E={o['E']}, K={o['K']}" + (f", F={o['F']}" if hidden else "")


def engine_label(o) -> str:
  """An engine (with its backend, block or capacity factor) as the report names it."""
  if _is_xla(o):
    return f"sorted / xla, block {o['block_size']}"
  if o["engine"] == "sorted":
    return f"sorted / {o['backend']}"
  if o["engine"] == "einsum":
    cf = o["capacity_factor"]
    return f"einsum, capacity factor {cf:g}" if cf else "einsum, dropless"
  return o["engine"]


def run_command(records, path: str) -> str:
  """A command that writes the JSON lines of `records` (read from `path`)."""
  layers = _layers(records)
  options = []
  cases = list(dict.fromkeys(o["case"] for o in layers))
  if cases != list(CASES):
    options.append(f"--cases {','.join(cases)}")
  if all(_is_xla(o) for o in layers):
    options.append("--skip_slow")
  blocks = sorted({o["block_size"] for o in layers if _is_xla(o)})
  if blocks and blocks != [128]:
    options.append(f"--block_sizes {','.join(map(str, blocks))}")
  if _dtype(records) != "float32":
    options.append(f"--dtype {_dtype(records)}")
  repeats = {o["repeats"] for o in layers}
  if repeats and repeats != {5}:
    options.append(f"--repeats {max(repeats)}")
  if not any(o["bench"] == "layer_einsum_fit" for o in records):
    options.append('--fit_experts ""')
  return " ".join(["PYTHONPATH=. python experiments/bench_layer.py", *options,
                   f"> {results_path(path)}"])


def header_lines(series, out: Optional[str]) -> list[str]:
  """Title, method, commands and machine of the report."""
  everything = [o for _, records in series for o in _layers(records)]
  machines = list({json.dumps(o["machine"], sort_keys=True): o["machine"]
                   for o in everything}.values())
  m = machines[0]
  where = f"a {m['cpu_affinity']}-core CPU" if m["backend"] == "cpu" else m["device_kind"]
  main = next((records for _, records in series
               if _dtype(records) == "float32" and not _swept(records)), series[0][1])
  first = _layers(main)[0]
  experts = ("SwiGLU" if (first["expert_type"], first["activation"]) == ("glu", "silu")
             else f"{first['expert_type']} ({first['activation']})")
  dtype = {"float32": "fp32", "bfloat16": "bf16"}.get(first["dtype"], first["dtype"])
  lines = [f"# MoE layer vs dense FFN, forward+backward, on {where}", "",
           "`experiments/bench_layer.py` (its docstring gives the method): the jitted "
           "`value_and_grad` of `sum(y**2) + aux.loss` with respect to (params, x), for the "
           f"MoE layer (router, capacity, engine, experts; {experts} experts, {dtype}) and for "
           f"a dense {experts} FFN of hidden width K·F built from the same `FFNWeights`, so "
           "both run the same active FFN FLOPs on the same "
           f"T = {first['T']} tokens, D = {first['D']}. One compile and one warm-up each, "
           f"then {first['repeats']} repeats interleaved dense, MoE, dense, MoE; **ratio** = "
           'MoE median / dense median from that one series ("ratio min": the minima). '
           "Memory is XLA's compile-time buffer plan (`memory_analysis()`: arguments + "
           "outputs + temp − aliased), not a measured resident size. Padding is the extra "
           "rows the `xla` backend visits because each expert's rows are rounded up to the "
           "tile.", ""]
  described = "; ".join(
      f"jax {m['jax']} ({m['backend'].upper()} backend), {m['cpu_affinity']} cores of an "
      f"{m['cpu_model']}, {m['ram_gib']} GiB RAM, Python {m['python']}" for m in machines)
  load = [o["loadavg_1m"] for o in everything if "loadavg_1m" in o]
  shape = ("T", "D", "active_hidden", "dtype")
  dense = [o["dense_ms"]["median"] for o in everything
           if o.get("status") == "ok" and all(o[k] == first[k] for k in shape)]
  spread = (f" The same {first['dtype']} dense step's median ranges from {min(dense):,.0f} "
            f"to {max(dense):,.0f} ms across these files, so only ratios within one series "
            "are comparable." if len(set(dense)) > 1 else "")
  lines.append(f"Machine: {described}; 1-minute load average {min(load)} to {max(load)} "
               f"during the runs.{spread} The raw JSON lines are beside this file.")
  lines += ["", "## Commands", "", "```"]
  lines += [run_command(records, path) for path, records in series]
  lines += [summarize_command("bench_layer.py", [path for path, _ in series], out), "```", ""]
  return lines


def main_lines(records) -> list[str]:
  """The main cases (and any case given as T:D:E:K:F) of a default run, every engine."""
  rows = [o for o in _layers(records) if o["case"] in MAIN_CASES or o["case"] not in CASES]
  lines = ["## Main cases (default run)", "",
           "| case | engine | MoE median ms | dense median ms | ratio | ratio min | "
           "peak est. MiB MoE / dense | padding |", "|---|---|---|---|---|---|---|---|"]
  for o in rows:
    mem, r = o["memory_bytes"], o.get("routing", {})
    if o.get("status") == "ok":
      ratio = f"{o['ratio_median']:.2f}"
      cells = (f"{o['moe_ms']['median']:,.0f}", f"{o['dense_ms']['median']:,.0f}",
               f"**{ratio}**" if _is_xla(o) else ratio, f"{o['ratio_min']:.2f}")
    else:
      cells = (f"skipped (pred. {o.get('predicted_s')} s)", "-", "-", "-")
    pad = _percent(r["padding_overhead"]) if "padding_overhead" in r else "–"
    lines.append(f"| {case_label(o)} | {engine_label(o)} | " + " | ".join(cells) +
                 f" | {_mib(mem['moe'].get('peak_estimate'))} / "
                 f"{_mib(mem['dense'].get('peak_estimate'))} | {pad} |")
  return lines + [""]


def scaling_lines(records) -> list[str]:
  """The scaling family of a default run (sorted / xla), by E."""
  rows = sorted((o for o in _layers(records) if _is_xla(o) and o.get("status") == "ok"
                 and all(o[k] == SCALING[k] for k in ("T", "D", "K", "F"))),
                key=lambda o: o["E"])
  if not rows:
    return []
  k, f = SCALING["K"], SCALING["F"]
  blocks = ", ".join(str(b) for b in dict.fromkeys(o["block_size"] for o in rows))
  dense = _mib(rows[0]["memory_bytes"]["dense"].get("peak_estimate"))
  lines = [f"## Scaling curve: E at fixed active FLOPs (K={k}, F={f}, K·F = {k * f}; "
           f"block {blocks})", "",
           f"| E | ratio | ratio min | peak est. MiB (dense {dense}) | padding |",
           "|---|---|---|---|---|"]
  for o in rows:
    lines.append(f"| {o['E']} | {o['ratio_median']:.2f} | {o['ratio_min']:.2f} | "
                 f"{_mib(o['memory_bytes']['moe'].get('peak_estimate'))} | "
                 f"{_percent(o['routing']['padding_overhead'])} |")
  return lines + [""]


def block_lines(records) -> list[str]:
  """A block sweep: ratio and padding per case and block size."""
  rows = [o for o in _layers(records) if _is_xla(o) and o.get("status") == "ok"]
  blocks = sorted({o["block_size"] for o in rows})
  cells = {(o["case"], o["block_size"]): o for o in rows}
  lines = ["## Block size (sorted / xla), one interleaved series per case", "",
           "Ratio of medians (padding) per block size:", "",
           "| case | " + " | ".join(map(str, blocks)) + " |", "|---" * (len(blocks) + 1) + "|"]
  for case in dict.fromkeys(o["case"] for o in rows):
    row = []
    for block in blocks:
      o = cells.get((case, block))
      row.append("-" if o is None else f"{o['ratio_median']:.2f} "
                 f"({_percent(o['routing']['padding_overhead'])})")
    label = case_label(next(o for o in rows if o["case"] == case), hidden=False)
    lines.append(f"| {label} | " + " | ".join(row) + " |")
  return lines + [""]


def fit_lines(fit) -> list[str]:
  """The einsum fit: planned memory and whether it fits, per E, dropless and capped."""
  gib = 2 ** 30
  factors = list(dict.fromkeys(r["capacity_factor"] for r in fit["rows"]))
  rows = {(r["capacity_factor"], r["E"]): r for r in fit["rows"]}
  names = {cf: (f"cf {cf:g}" if cf else "dropless (C = T)") for cf in factors}
  largest = ", ".join(f"{name.replace('cf_', 'capacity factor ')} up to E = {e}" if e
                      else f"{name.replace('cf_', 'capacity factor ')} at no E"
                      for name, e in fit["largest_E_fits"].items())
  lines = ["## Einsum memory fit", "",
           f"Compile-time memory plans (`peak_estimate`) of the einsum layer's forward+backward "
           f"against {fit['memory_budget_bytes'] / gib:.1f} GiB (T = {fit['T']}, "
           f"D = {fit['D']}, K = {fit['K']}, F = {fit['F']}, {fit['dtype']}; nothing was "
           f"allocated). It fits {largest}.", "",
           "| E | " + " | ".join(f"{names[cf]}: planned GiB | fits" for cf in factors) + " |",
           "|---" * (2 * len(factors) + 1) + "|"]
  for e in sorted({r["E"] for r in fit["rows"]}):
    cells = []
    for cf in factors:
      r = rows.get((cf, e))
      if r is None:
        cells += ["–", "–"]
      else:
        planned = f"{r['peak_estimate'] / gib:.1f}" if "peak_estimate" in r else "error"
        cells += [planned, "yes" if r["fits"] else "**no**"]
    lines.append(f"| {e} | " + " | ".join(cells) + " |")
  return lines + [""]


def dtype_lines(records) -> list[str]:
  """A run of another activation dtype: the sorted / xla ratios per case."""
  rows = [o for o in _layers(records) if _is_xla(o) and o.get("status") == "ok"]
  lines = [f"## {_dtype(records)} activations (params fp32)", "",
           "| case | MoE median ms | dense median ms | ratio |", "|---|---|---|---|"]
  for o in rows:
    lines.append(f"| {case_label(o)} | {o['moe_ms']['median']:,.0f} | "
                 f"{o['dense_ms']['median']:,.0f} | {o['ratio_median']:.2f} |")
  return lines + [""]


def report_lines(series, out: Optional[str]) -> list[str]:
  """The markdown report of `series`: (path, JSON lines) per file."""
  lines = header_lines(series, out)
  main = [records for _, records in series
          if _dtype(records) == "float32" and not _swept(records)]
  for records in main:
    lines += main_lines(records) + scaling_lines(records)
  for _, records in series:
    if _swept(records):
      lines += block_lines(records)
  for _, records in series:
    for o in records:
      if o["bench"] == "layer_einsum_fit":
        lines += fit_lines(o)
  for _, records in series:
    if _dtype(records) != "float32" and not _swept(records):
      lines += dtype_lines(records)
  return lines


def summarize(paths: list[str], out: Optional[str] = None) -> None:
  """The markdown report of the JSON-lines files at `paths`, written to `out` (its
  reading kept) or printed."""
  series = []
  for path in paths:
    with open(path, encoding="utf-8") as f:
      series.append((path, [json.loads(line) for line in f if line.startswith("{")]))
  write_or_print(out, report_lines(series, out))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", default=",".join(CASES),
                      help=f"comma-separated names in {list(CASES)} or T:D:E:K:F")
  parser.add_argument("--engines", default="sorted_xla,sorted_ragged_dot,einsum",
                      help=f"comma-separated, from {list(ENGINES)}")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--block_sizes", default="128", help="row tiles of sorted_xla")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--expert_type", default="glu", choices=("glu", "mlp"))
  parser.add_argument("--activation", default="silu", choices=("silu", "gelu", "relu"))
  parser.add_argument("--einsum_capacity_factor", type=float, default=1.25)
  parser.add_argument("--skip_slow", action="store_true",
                      help="skip sorted_ragged_dot, einsum and loop")
  parser.add_argument("--slow_cases", default=None,
                      help="cases (of --cases) where slow engines are tried, or 'all'; "
                      "default: main_e8 if in --cases, else all of --cases")
  parser.add_argument("--time_budget_s", type=float, default=600.0,
                      help="whole run; slow engines only start if they fit in what is left")
  parser.add_argument("--slow_budget_s", type=float, default=300.0,
                      help="largest predicted time of one slow configuration")
  parser.add_argument("--predict_factor", type=float, default=1.6,
                      help="measured/FLOP-predicted time of slow engines (1.4-1.6 on the "
                      "2-core CPU this was written on)")
  parser.add_argument("--fit_experts", default="8,16,32,64,128,256,512",
                      help="E values of the einsum fit; empty to skip it")
  parser.add_argument("--memory_budget_gb", type=float, default=None,
                      help="einsum fit budget in GiB; default: this machine's RAM")
  parser.add_argument("--seed", type=int, default=0)
  add_summary_arguments(parser, many=True)
  args = parser.parse_args(argv)
  if args.summarize:
    summarize(args.summarize, args.out)
    return
  if args.repeats < 1:
    parser.error("--repeats must be >= 1")
  args.dtype = jnp.dtype(args.dtype)
  args.fit_experts = [int(e) for e in args.fit_experts.split(",") if e]
  if args.memory_budget_gb is None:
    args.memory_budget_gb = MACHINE["ram_gib"]
  engines = [e for e in args.engines.split(",") if e]
  for e in engines:
    if e not in ENGINES:
      parser.error(f"--engines: {e!r} is not one of {list(ENGINES)}")
  block_sizes = [int(b) for b in args.block_sizes.split(",")]
  cases = {name: parse_case(name) for name in args.cases.split(",") if name}

  start = time.perf_counter()
  deadline = start + args.time_budget_s
  log(f"machine: {json.dumps(MACHINE)}")
  fast, slow = [], []
  for e in engines:
    if ENGINES[e][0] == "sorted" and ENGINES[e][1] == "xla":
      fast += [{"name": e, "block_size": b, "label": f"{e}@{b}"} for b in block_sizes]
    elif not args.skip_slow:
      cf = args.einsum_capacity_factor if e == "einsum" else None
      slow.append({"name": e, "capacity_factor": cf, "label": e})
  dense_s = {}
  for name, case in cases.items():
    if fast:
      dense_s[name] = run_fast(name, case, fast, args)
  if args.slow_cases is None:
    slow_cases = ["main_e8"] if "main_e8" in cases else list(cases)
  elif args.slow_cases == "all":
    slow_cases = list(cases)
  else:
    slow_cases = [c for c in args.slow_cases.split(",") if c in cases]
  for spec in slow:
    for name in slow_cases:
      case = cases[name]
      if name not in dense_s:  # no fast pass: time the dense FFN once for the prediction
        probe = Compiled(*dense_step(case, args), inputs(case, args), args.seed)
        probe.warm_up()
        dense_s[name] = statistics.median(interleaved([probe], 2)[0])
      run_slow(name, case, spec, args, dense_s[name], deadline)
  if args.fit_experts and "einsum" in engines:
    emit(einsum_fit(args))
  log(f"done in {time.perf_counter() - start:.0f} s")


MACHINE = machine()

if __name__ == "__main__":
  main()

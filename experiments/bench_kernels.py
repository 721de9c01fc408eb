"""Grouped-matmul kernels (pallas_kernels): correctness in interpret mode, and on a GPU
TFLOP/s against a dense matmul of the same FLOPs, jax.lax.ragged_dot, and the MoE layer
with backend `pallas` against a dense FFN.

  # CPU (default there): interpret-mode correctness, about a minute on 2 cores
  PYTHONPATH=. python experiments/bench_kernels.py --mode correctness \\
      > experiments/results/bench_kernels_cpu.jsonl
  # H100 / H200 (default on GPU and TPU): throughput and targets
  PYTHONPATH=. python experiments/bench_kernels.py --mode perf \\
      > experiments/results/bench_kernels_gpu.jsonl
  # the markdown report, experiments/results/bench_kernels.md, from the JSON lines
  # (a file not written yet, such as the GPU one before a GPU run, is skipped)
  PYTHONPATH=. python experiments/bench_kernels.py --summarize \\
      experiments/results/bench_kernels_cpu.jsonl experiments/results/bench_kernels_gpu.jsonl \\
      --out experiments/results/bench_kernels.md

--mode correctness runs gmm (plain; with row_index, indices outside lhs included;
transpose_rhs; group_offset with G = E/2 local groups; all three together), tgmm and
combine, values and the gradients of a random cotangent, for targets `triton` and
`mosaic` in float32 and bfloat16, on small shapes with odd D and F, empty groups, one
group holding every row, and rows past the last group. A target runs compiled where
this backend is its hardware (triton on GPU, mosaic on TPU) and in Pallas interpret
mode elsewhere. References are per row in float64 numpy. Error = max |got - want| /
max |want|; a case passes at <= 1e-4 (float32) or <= 2e-2 (bfloat16), and when rows in
no local group (or reading outside lhs) and weight gradients of empty groups are
exactly zero. Expect every line to pass.

--mode perf (bfloat16 by default), per (tokens per expert, E, D = F) of the grid
{128, 512, 2048} x {8, 64} x {1024, 4096}, M = tokens per expert * E rows:
  pallas      pallas_kernels.gmm(lhs [M, D], W [E, D, F], group_sizes [E])
  ragged_dot  jax.lax.ragged_dot(lhs, W, group_sizes)
  dense       jnp.dot(lhs, W0 [D, F]): the same 2 M D F FLOPs in one matmul
each forward and forward+backward (the output and a vjp of a random cotangent with
respect to lhs and W: 3x the FLOPs). Each function is compiled, warmed up and timed
with block_until_ready; one timed repeat dispatches `inner` calls back to back
(inner set so a repeat lasts >= --min_repeat_ms), methods round-robin, median of
--repeats (fewer for a function whose repeats would outlast
--max_seconds_per_function). Reported: ms, TFLOP/s, pallas/dense and
pallas/ragged_dot throughput, against the targets pallas >= 0.85 dense at 2048
tokens per expert and pallas >= 1.5 ragged_dot, and the largest relative difference
of pallas from ragged_dot (a check that the compiled kernels compute the right
thing). The smallest shapes (a few GFLOP) may measure dispatch more than kernels.
--routings balanced,skewed adds group sizes with half the rows on expert 0. Records
are flushed one per grid point; under a per-command time limit, split the grid
(e.g. --dims 1024 --layer_dims 1024, then --dims 4096 --layer_dims 4096).

Layer: moejax.MoE (top-2, sorted engine, --layer_backends, default pallas; bf16
activations and parameters) against a dense FFN of hidden width K F of the same
expert type: jitted value_and_grad of sum(y^2) (+ aux.loss) with respect to (params,
x), T = 2048 E / K tokens (M = T K rows, as in the grid at 2048 tokens per expert).
Throughput counts the active expert FLOPs, 3 x 2 T K D F x (3 for glu, 2 for mlp);
target: >= 0.5 of the dense FFN and of the grid's dense-matmul forward+backward
throughput. A backend the layer does not accept, or a failure to compile, is
reported in its JSON line. --mode perf refuses to run on CPU, where kernels run in
interpret mode, unless --allow-cpu (then pass small sizes).

Output: one JSON object per line on stdout (the first describes the machine),
progress on stderr. The core needs only jax, flax, numpy and this repository.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "experiments"))

import pallas_kernels  # noqa: E402
from bench_layer import log, machine  # noqa: E402
from moejax import MoE  # noqa: E402
from moejax.experts import FFNWeights, dense_matmul  # noqa: E402
from report_file import add_summary_arguments, write_keeping_reading  # noqa: E402

TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}
VS_DENSE_TARGET = 0.85          # pallas / dense throughput, at TARGET_TOKENS_PER_EXPERT
VS_RAGGED_TARGET = 1.5          # pallas / ragged_dot throughput
LAYER_TARGET = 0.5              # MoE layer / dense throughput, forward+backward
TARGET_TOKENS_PER_EXPERT = 2048
NATIVE_TARGET = {"gpu": "triton", "tpu": "mosaic"}
PERF_COMMAND = ("PYTHONPATH=. python experiments/bench_kernels.py --mode perf "
                "> experiments/results/bench_kernels_gpu.jsonl")
CORRECTNESS_COMMAND = ("PYTHONPATH=. python experiments/bench_kernels.py --mode correctness "
                       "> experiments/results/bench_kernels_cpu.jsonl")
SUMMARIZE_COMMAND = ("PYTHONPATH=. python experiments/bench_kernels.py --summarize "
                     "experiments/results/bench_kernels_cpu.jsonl "
                     "experiments/results/bench_kernels_gpu.jsonl "
                     "--out experiments/results/bench_kernels.md")

# Correctness shapes: R rows of E groups, lhs [R, D], W [E, D, F].
CORRECTNESS_CASES = {
    "e4_empty_groups": dict(E=4, R=200, D=24, F=40, sizes=(0, 120, 0, 80)),
    "e8_one_group": dict(E=8, R=256, D=33, F=40, sizes=(0, 0, 0, 0, 0, 256, 0, 0)),
    "e8_rows_past_groups": dict(E=8, R=300, D=40, F=33, sizes=(37, 0, 64, 1, 90, 0, 17, 51)),
}


def emit(obj: dict[str, Any]) -> None:
  print(json.dumps(obj), flush=True)


def error_text(e: BaseException) -> str:
  return f"{type(e).__name__}: {str(e)[:400]}"


def device_kind() -> str:
  return jax.devices()[0].device_kind


def source_version() -> dict[str, Any]:
  """The commit of this checkout and whether pallas_kernels differs from it."""
  def git(*command):
    return subprocess.run(["git", "-C", REPO, *command], capture_output=True, text=True,
                          timeout=10, check=True).stdout.strip()
  try:
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "pallas_kernels_modified": bool(git("status", "--porcelain", "pallas_kernels"))}
  except (OSError, subprocess.SubprocessError):
    return {"commit": None, "pallas_kernels_modified": None}


# ----------------------------------------------------------------------------
# Correctness: per-row float64 references.


def local_group_of_rows(sizes, num_rows: int, offset: int, num_local: int) -> np.ndarray:
  """Local group of each of R rows (group - offset), -1 for rows in no local group: [R]."""
  bounds = np.concatenate([[0], np.cumsum(sizes)])
  rows = np.arange(num_rows)
  group = np.searchsorted(bounds, rows, side="right") - 1
  local = group - offset
  return np.where((rows < bounds[-1]) & (local >= 0) & (local < num_local), local, -1)


def reference_gmm(lhs, rhs, sizes, offset, row_index, transpose_rhs, cotangent):
  """out [R, N], d lhs [M, K], d rhs [G, K, N] ([G, N, K] transposed), in float64.

  out[r] = lhs[src(r)] @ W[g(r)] for rows of local groups, else zero; src(r) =
  row_index[r] (a zero row outside lhs) or r.
  """
  num_rows = lhs.shape[0] if row_index is None else row_index.shape[0]
  local = local_group_of_rows(sizes, num_rows, offset, rhs.shape[0])
  src = np.arange(num_rows) if row_index is None else row_index
  inside = (src >= 0) & (src < lhs.shape[0])
  x = np.where(inside[:, None], lhs[np.clip(src, 0, lhs.shape[0] - 1)], 0.0)     # [R, K]
  w = rhs.transpose(0, 2, 1) if transpose_rhs else rhs                              # [G, K, N]
  live = local >= 0
  w_rows = w[np.maximum(local, 0)]                                                  # [R, K, N]
  out = np.einsum("rk,rkn->rn", x, w_rows) * live[:, None]
  d_x = np.einsum("rn,rkn->rk", cotangent * live[:, None], w_rows)
  d_lhs = np.zeros_like(lhs)
  np.add.at(d_lhs, src[inside], d_x[inside])
  d_w = np.zeros_like(w)
  np.add.at(d_w, local[live], np.einsum("rk,rn->rkn", x[live], cotangent[live]))
  d_rhs = d_w.transpose(0, 2, 1) if transpose_rhs else d_w
  return {"out": out, "d_lhs": d_lhs, "d_rhs": d_rhs}, (~live) | (~inside)


def reference_tgmm(lhs, grad, sizes):
  """d W [E, K, N] = sum over the rows of group g of lhs_r^T grad_r, in float64."""
  local = local_group_of_rows(sizes, lhs.shape[0], 0, len(sizes))
  live = local >= 0
  out = np.zeros((len(sizes), lhs.shape[1], grad.shape[1]))
  np.add.at(out, local[live], np.einsum("rk,rn->rkn", lhs[live], grad[live]))
  return {"out": out}


def reference_combine(rows, row_index, weight, num_tokens, cotangent):
  """y [T, D], d rows [R, D], d weight [R], in float64; indices outside [0, T) drop."""
  inside = (row_index >= 0) & (row_index < num_tokens)
  safe = np.clip(row_index, 0, num_tokens - 1)
  y = np.zeros((num_tokens, rows.shape[1]))
  np.add.at(y, row_index[inside], weight[inside, None] * rows[inside])
  dy = np.where(inside[:, None], cotangent[safe], 0.0)
  return {"out": y, "d_rows": weight[:, None] * dy, "d_weight": np.sum(dy * rows, axis=-1)}


# ----------------------------------------------------------------------------
# Correctness: the kernels, all ops of a case in one jitted function.


def correctness_inputs(case: dict[str, Any], dtype, seed: int) -> dict[str, np.ndarray]:
  """Inputs of every op, rounded to dtype and held as float64 numpy (weights float32)."""
  rng = np.random.default_rng(seed)
  e, r, d, f = case["E"], case["R"], case["D"], case["F"]
  num_src, num_tokens = r // 2 + 7, r // 3

  def draw(*shape):
    return np.asarray(jnp.asarray(rng.normal(size=shape), dtype).astype(jnp.float32),
                      np.float64)

  return {"lhs": draw(r, d), "rhs": draw(e, d, f), "rhs_t": draw(e, f, d),
          "rhs_local": draw(e // 2, d, f), "rhs_local_t": draw(e // 2, f, d),
          "src": draw(num_src, d), "ct_f": draw(r, f),
          "row_index": rng.integers(-2, num_src + 2, r).astype(np.int32),
          "token_index": rng.integers(-1, num_tokens + 1, r).astype(np.int32),
          "weight": rng.uniform(0.1, 1.0, r).astype(np.float32).astype(np.float64),
          "ct_tokens": draw(num_tokens, d)}


def kernel_ops(settings: pallas_kernels.KernelSettings, sizes, num_experts: int,
               num_tokens: int) -> Callable:
  """Jitted (inputs) -> {op: {quantity: array}}: every op's values and vjp."""
  offset = num_experts // 4

  def gmm_with_grads(lhs, rhs, ct, **kwargs):
    out, pullback = jax.vjp(lambda a, b: pallas_kernels.gmm(a, b, sizes, settings=settings,
                                                            **kwargs), lhs, rhs)
    d_lhs, d_rhs = pullback(ct.astype(out.dtype))
    return {"out": out, "d_lhs": d_lhs, "d_rhs": d_rhs}

  def combine_with_grads(rows, index, weight, ct):
    y, pullback = jax.vjp(lambda a, w: pallas_kernels.combine(a, index, w, num_tokens,
                                                              settings=settings), rows, weight)
    d_rows, d_weight = pullback(ct.astype(y.dtype))
    return {"out": y, "d_rows": d_rows, "d_weight": d_weight}

  def run(a):
    return {
        "gmm": gmm_with_grads(a["lhs"], a["rhs"], a["ct_f"]),
        "gmm_gather": gmm_with_grads(a["src"], a["rhs"], a["ct_f"], row_index=a["row_index"]),
        "gmm_transposed": gmm_with_grads(a["lhs"], a["rhs_t"], a["ct_f"], transpose_rhs=True),
        "gmm_offset": gmm_with_grads(a["lhs"], a["rhs_local"], a["ct_f"], group_offset=offset),
        "gmm_gather_transposed_offset": gmm_with_grads(
            a["src"], a["rhs_local_t"], a["ct_f"], row_index=a["row_index"],
            transpose_rhs=True, group_offset=offset),
        "tgmm": {"out": pallas_kernels.tgmm(a["lhs"], a["ct_f"], sizes, settings=settings)},
        "combine": combine_with_grads(a["lhs"], a["token_index"], a["weight"], a["ct_tokens"]),
    }
  return jax.jit(run)


def reference_ops(a: dict[str, np.ndarray], sizes, num_experts: int, num_tokens: int):
  """{op: ({quantity: float64 array}, rows that must be exactly zero or None)}."""
  offset = num_experts // 4
  sizes = np.asarray(sizes)
  return {
      "gmm": reference_gmm(a["lhs"], a["rhs"], sizes, 0, None, False, a["ct_f"]),
      "gmm_gather": reference_gmm(a["src"], a["rhs"], sizes, 0, a["row_index"], False,
                                  a["ct_f"]),
      "gmm_transposed": reference_gmm(a["lhs"], a["rhs_t"], sizes, 0, None, True, a["ct_f"]),
      "gmm_offset": reference_gmm(a["lhs"], a["rhs_local"], sizes, offset, None, False,
                                  a["ct_f"]),
      "gmm_gather_transposed_offset": reference_gmm(
          a["src"], a["rhs_local_t"], sizes, offset, a["row_index"], True, a["ct_f"]),
      "tgmm": (reference_tgmm(a["lhs"], a["ct_f"], sizes), None),
      "combine": (reference_combine(a["lhs"], a["token_index"], a["weight"], num_tokens,
                                    a["ct_tokens"]), None),
  }


def relative_error(got: np.ndarray, want: np.ndarray) -> dict[str, Any]:
  """max |got - want| and that over max |want| (over 1 when want is all zeros);
  both None where got has a NaN or infinity."""
  if not np.all(np.isfinite(got)):
    return {"max_abs": None, "rel": None}
  max_abs = float(np.max(np.abs(got - want))) if want.size else 0.0
  scale = float(np.max(np.abs(want))) if want.size else 0.0
  return {"max_abs": max_abs, "rel": max_abs / (scale if scale > 0 else 1.0)}


def exact_zeros(op: str, got: dict[str, np.ndarray], zero_rows, sizes, num_experts) -> bool:
  """Rows in no local group (or read outside lhs) and weight gradients of empty
  local groups are exactly zero."""
  ok = True
  if zero_rows is not None:
    ok &= bool(np.all(got["out"][zero_rows] == 0))
  if op.startswith("gmm") or op == "tgmm":
    offset = num_experts // 4 if "offset" in op else 0
    weights = got["d_rhs"] if op.startswith("gmm") else got["out"]
    local_sizes = np.asarray(sizes)[offset:offset + weights.shape[0]]
    ok &= bool(np.all(weights[local_sizes == 0] == 0))
  return ok


def kernel_settings_for(target: str) -> pallas_kernels.KernelSettings:
  """Compiled where this backend runs the target natively, else interpret mode."""
  native = NATIVE_TARGET.get(jax.default_backend()) == target
  return pallas_kernels.KernelSettings(target=target, interpret=not native)


def check_case(name: str, case: dict[str, Any], target: str, dtype_name: str, seed: int):
  """Yields one record per op of one (case, target, dtype)."""
  dtype = jnp.dtype(dtype_name)
  settings = kernel_settings_for(target)
  num_tokens = case["R"] // 3
  inputs = correctness_inputs(case, dtype, seed)
  as_jax = {k: jnp.asarray(v, jnp.int32 if v.dtype == np.int32 else
                           jnp.float32 if k == "weight" else dtype) for k, v in inputs.items()}
  sizes = jnp.asarray(case["sizes"], jnp.int32)
  start = time.perf_counter()
  try:
    got = jax.device_get(kernel_ops(settings, sizes, case["E"], num_tokens)(as_jax))
  except Exception as e:  # pylint: disable=broad-except
    yield {**correctness_header(name, case, target, dtype_name, settings), "op": "all",
           "pass": False, "error": error_text(e)}
    return
  seconds = round(time.perf_counter() - start, 2)
  want = reference_ops(inputs, case["sizes"], case["E"], num_tokens)
  tolerance = TOLERANCE[dtype_name]
  for op, (reference, zero_rows) in want.items():
    values = {k: np.asarray(v, np.float64) for k, v in got[op].items()}
    errors = {k: relative_error(values[k], reference[k]) for k in reference}
    zeros = exact_zeros(op, values, zero_rows, case["sizes"], case["E"])
    yield {**correctness_header(name, case, target, dtype_name, settings), "op": op,
           "errors": errors, "exact_zeros": zeros, "tolerance": tolerance,
           "pass": zeros and all(e["rel"] is not None and e["rel"] <= tolerance
                                 for e in errors.values()),
           "case_seconds": seconds}


def correctness_header(name, case, target, dtype_name, settings) -> dict[str, Any]:
  return {"bench": "correctness", "case": name, "E": case["E"], "R": case["R"],
          "D": case["D"], "F": case["F"], "sizes": list(case["sizes"]), "target": target,
          "interpret": settings.interpret, "dtype": dtype_name, "device_kind": device_kind()}


def run_correctness(args) -> None:
  start = time.perf_counter()
  for name in args.cases:
    for target in args.targets:
      for dtype_name in args.dtypes:
        log(f"[correctness] {name} {target} {dtype_name}")
        for record in check_case(name, CORRECTNESS_CASES[name], target, dtype_name, args.seed):
          emit(record)
  log(f"[correctness] done in {time.perf_counter() - start:.0f} s")


# ----------------------------------------------------------------------------
# Performance: timing.


class Timed:
  """A jitted function on fixed arguments: compiled, warmed up, then timed.

  `error` holds why it could not be built, compiled or run (then it is skipped).
  """

  def __init__(self, name: str, fn: Optional[Callable], args: tuple = (),
               error: Optional[str] = None):
    self.name, self.args, self.times, self.inner, self.max_repeats = name, args, [], 1, None
    self.error, self.output, self.compile_s = error, None, None
    if error is None:
      try:
        start = time.perf_counter()
        self.executable = jax.jit(fn).lower(*args).compile()
        self.compile_s = time.perf_counter() - start
      except Exception as e:  # pylint: disable=broad-except
        self.error = error_text(e)

  @property
  def ok(self) -> bool:
    return self.error is None

  def warm_up(self, calls: int, min_repeat_s: float, max_total_s: float,
              keep_output: bool = True) -> None:
    """Runs `calls` times (keeping the last output if asked), then sets `inner` so
    that one timed repeat lasts at least min_repeat_s, and caps the repeats so
    that the timing lasts about max_total_s at most."""
    try:
      for _ in range(max(calls, 1)):
        out = jax.block_until_ready(self.executable(*self.args))
      self.output = out if keep_output else None
      del out
      start = time.perf_counter()
      jax.block_until_ready(self.executable(*self.args))
      once = max(time.perf_counter() - start, 1e-6)
      self.inner = int(min(1000, max(1, math.ceil(min_repeat_s / once))))
      self.max_repeats = max(1, int(max_total_s / (once * self.inner)))
    except Exception as e:  # pylint: disable=broad-except
      self.error = error_text(e)

  def wants_more(self) -> bool:
    return self.ok and (self.max_repeats is None or len(self.times) < self.max_repeats)

  def time_once(self) -> None:
    start = time.perf_counter()
    out = None
    for _ in range(self.inner):
      out = self.executable(*self.args)
    jax.block_until_ready(out)
    self.times.append((time.perf_counter() - start) / self.inner)

  def median_ms(self) -> Optional[float]:
    return round(1e3 * statistics.median(self.times), 4) if self.ok and self.times else None


def time_round_robin(runs: list[Timed], repeats: int) -> None:
  """Appends up to `repeats` timings to each working run, visiting runs in turn."""
  for _ in range(repeats):
    for run in runs:
      if run.wants_more():
        try:
          run.time_once()
        except Exception as e:  # pylint: disable=broad-except
          run.error = error_text(e)


def tflops(flops: float, ms: Optional[float]) -> Optional[float]:
  return float(f"{flops / (ms * 1e-3) / 1e12:.4g}") if ms else None


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
  return float(f"{a / b:.4g}") if a is not None and b else None


def at_least(value: Optional[float], target: Optional[float]) -> Optional[bool]:
  return None if value is None or target is None else value >= target


# ----------------------------------------------------------------------------
# Performance: the grouped matmul grid.


def group_sizes_of(routing: str, tokens_per_expert: int, num_experts: int) -> np.ndarray:
  """[E] rows per group summing to M = tokens_per_expert * E: equal (balanced), or
  half of M on group 0 and the rest spread evenly (skewed)."""
  total = tokens_per_expert * num_experts
  if routing == "balanced" or num_experts == 1:
    return np.full(num_experts, tokens_per_expert, np.int32)
  first = total // 2
  rest = np.full(num_experts - 1, (total - first) // (num_experts - 1), np.int32)
  rest[-1] += total - first - rest.sum()
  return np.concatenate([[first], rest]).astype(np.int32)


def forward_fns(settings: pallas_kernels.KernelSettings) -> dict[str, Callable]:
  """(lhs [M, D], W, sizes [E]) -> [M, F]; W is [E, D, F], or [D, F] for dense."""
  return {
      "pallas": lambda lhs, w, sizes: pallas_kernels.gmm(lhs, w, sizes, settings=settings),
      "ragged_dot": lambda lhs, w, sizes: jax.lax.ragged_dot(lhs, w, sizes),
      "dense": lambda lhs, w, sizes: jnp.dot(lhs, w),
  }


def with_backward(forward: Callable) -> Callable:
  """(lhs, W, sizes, cotangent [M, F]) -> (out, d lhs, d W): forward and its vjp."""
  def step(lhs, w, sizes, cotangent):
    out, pullback = jax.vjp(lambda a, b: forward(a, b, sizes), lhs, w)
    return (out,) + tuple(pullback(cotangent))
  return step


def largest_relative_difference(got, want) -> Optional[float]:
  """max over the outputs of max |got - want| / max |want| (float32)."""
  if got is None or want is None:
    return None
  worst = 0.0
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    scale = float(jnp.max(jnp.abs(b)))
    worst = max(worst, float(jnp.max(jnp.abs(a - b))) / (scale if scale > 0 else 1.0))
  return round(worst, 5)


def gmm_case(routing: str, tokens_per_expert: int, num_experts: int, dim: int, args):
  """One grid point: every method forward and forward+backward; returns its record."""
  dtype = args.dtype
  rows = tokens_per_expert * num_experts
  keys = jax.random.split(jax.random.PRNGKey(args.seed), 4)
  lhs = jax.random.normal(keys[0], (rows, dim), dtype)
  w = (jax.random.normal(keys[1], (num_experts, dim, dim), jnp.float32) * dim ** -0.5
       ).astype(dtype)
  w_dense = (jax.random.normal(keys[2], (dim, dim), jnp.float32) * dim ** -0.5).astype(dtype)
  cotangent = jax.random.normal(keys[3], (rows, dim), dtype)
  sizes = jnp.asarray(group_sizes_of(routing, tokens_per_expert, num_experts))
  runs = {}
  for method, forward in forward_fns(args.settings).items():
    weight = w_dense if method == "dense" else w
    runs[(method, "fwd")] = Timed(f"{method}/fwd", forward, (lhs, weight, sizes))
    runs[(method, "fwd_bwd")] = Timed(f"{method}/fwd_bwd", with_backward(forward),
                                      (lhs, weight, sizes, cotangent))
  for (method, _), run in runs.items():
    if run.ok:
      run.warm_up(args.warmup, args.min_repeat_ms * 1e-3, args.max_seconds_per_function,
                  keep_output=method != "dense")
  time_round_robin(list(runs.values()), args.repeats)
  check = {p: largest_relative_difference(runs[("pallas", p)].output,
                                          runs[("ragged_dot", p)].output)
           for p in ("fwd", "fwd_bwd")}
  record = gmm_record(routing, tokens_per_expert, num_experts, dim, sizes, runs, args)
  record["pallas_vs_ragged_dot_max_rel_diff"] = check
  record["check_pass"] = all(v is not None and v <= TOLERANCE["bfloat16"]
                             for v in check.values())
  return record


def gmm_record(routing, tokens_per_expert, num_experts, dim, sizes, runs, args):
  """Times, TFLOP/s, ratios and targets of one grid point."""
  rows = tokens_per_expert * num_experts
  flops = {"fwd": 2.0 * rows * dim * dim, "fwd_bwd": 6.0 * rows * dim * dim}
  ms = {m: {p: runs[(m, p)].median_ms() for p in flops} for m in ("pallas", "dense",
                                                                   "ragged_dot")}
  rate = {m: {p: tflops(flops[p], ms[m][p]) for p in flops} for m in ms}
  vs_dense = {p: ratio(rate["pallas"][p], rate["dense"][p]) for p in flops}
  vs_ragged = {p: ratio(rate["pallas"][p], rate["ragged_dot"][p]) for p in flops}
  dense_target = VS_DENSE_TARGET if tokens_per_expert == TARGET_TOKENS_PER_EXPERT else None
  return {
      "bench": "gmm_perf", "device_kind": device_kind(), "routing": routing,
      "tokens_per_expert": tokens_per_expert, "E": num_experts, "D": dim, "F": dim,
      "M": rows, "dtype": jnp.dtype(args.dtype).name,
      "group_sizes_min_max": [int(jnp.min(sizes)), int(jnp.max(sizes))],
      "flops": flops, "ms": ms, "tflops": rate,
      "pallas_vs_dense": vs_dense, "pallas_vs_ragged_dot": vs_ragged,
      "targets": {"vs_dense": dense_target, "vs_ragged_dot": VS_RAGGED_TARGET},
      "pass": {"vs_dense": {p: at_least(vs_dense[p], dense_target) for p in flops},
               "vs_ragged_dot": {p: at_least(vs_ragged[p], VS_RAGGED_TARGET) for p in flops}},
      "errors": {run.name: run.error for run in runs.values() if run.error},
      "inner": {run.name: run.inner for run in runs.values()},
      "repeats_done": {run.name: len(run.times) for run in runs.values()},
      "compile_s": {run.name: run.compile_s and round(run.compile_s, 2)
                    for run in runs.values()},
      "repeats": args.repeats, "kernel_settings": repr(args.settings)}


# ----------------------------------------------------------------------------
# Performance: the MoE layer against a dense FFN.


class DenseFFN(nn.Module):
  """x [B, L, D] -> [B, L, D]: one FFN of hidden width K F over every token."""

  hidden_dim: int
  expert_type: str
  dtype: Any

  @nn.compact
  def __call__(self, x):
    batch, length, model_dim = x.shape
    ffn = FFNWeights(self.hidden_dim, None, self.expert_type, "silu", self.dtype, self.dtype,
                     name="ffn")(model_dim)
    return ffn(x.reshape(batch * length, model_dim), dense_matmul).reshape(x.shape)


def sum_squares(y):
  return jnp.sum(jnp.square(y.astype(jnp.float32)))


def layer_step(module: nn.Module, moe: bool) -> Callable:
  """(params, x) -> (loss, grads wrt (params, x)); the MoE adds aux.loss."""
  def loss(params, x):
    if moe:
      y, aux = module.apply({"params": params}, x)
      return sum_squares(y) + aux.loss, aux.metrics["load"]
    return sum_squares(module.apply({"params": params}, x)), jnp.zeros((0,))
  return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)


def layer_run(name: str, module: nn.Module, moe: bool, x, seed: int) -> Timed:
  """The module's training step, initialised and compiled (errors are kept)."""
  try:
    params = jax.jit(module.init)(jax.random.PRNGKey(seed), x)["params"]
  except Exception as e:  # pylint: disable=broad-except
    return Timed(name, None, error=error_text(e))
  return Timed(name, layer_step(module, moe), (params, x))


def layer_case(num_experts: int, dim: int, backend: str, args, dense_matmul_tflops):
  """MoE (top-K, backend) against the dense FFN, forward+backward; returns its record."""
  top_k, hidden = args.top_k, dim
  tokens = args.layer_tokens_per_expert * num_experts // top_k
  record = {"bench": "layer_perf", "device_kind": device_kind(), "E": num_experts,
            "K": top_k, "T": tokens, "D": dim, "F": hidden, "expert_type": args.expert_type,
            "dtype": jnp.dtype(args.dtype).name, "engine": "sorted", "backend": backend,
            "tokens_per_expert": args.layer_tokens_per_expert, "repeats": args.repeats}
  matmuls = 3 if args.expert_type == "glu" else 2
  flops = 3 * 2.0 * tokens * top_k * dim * hidden * matmuls
  record["flops_fwd_bwd"] = flops
  try:
    moe = MoE(num_experts=num_experts, top_k=top_k, hidden_dim=hidden, engine="sorted",
              backend=backend, expert_type=args.expert_type, dtype=args.dtype,
              param_dtype=args.dtype)
  except Exception as e:  # pylint: disable=broad-except
    return {**record, "status": "error", "error": f"MoE(backend={backend!r}): {error_text(e)}"}
  x = jax.random.normal(jax.random.PRNGKey(args.seed + 1), (1, tokens, dim), args.dtype)
  runs = [layer_run("dense_ffn", DenseFFN(top_k * hidden, args.expert_type, args.dtype),
                    False, x, args.seed),
          layer_run("moe", moe, True, x, args.seed)]
  for run in runs:
    if run.ok:
      run.warm_up(args.warmup, args.min_repeat_ms * 1e-3, args.max_seconds_per_function)
  time_round_robin(runs, args.repeats)
  dense, layer = runs
  ms = {"moe": layer.median_ms(), "dense_ffn": dense.median_ms()}
  rate = {k: tflops(flops, v) for k, v in ms.items()}
  vs_ffn = ratio(rate["moe"], rate["dense_ffn"])
  vs_matmul = ratio(rate["moe"], dense_matmul_tflops)
  errors = {run.name: run.error for run in runs if run.error}
  record["repeats_done"] = {run.name: len(run.times) for run in runs}
  record.update(status="ok" if layer.ok else "error", ms=ms, tflops=rate,
                dense_matmul_fwd_bwd_tflops=dense_matmul_tflops,
                moe_vs_dense_ffn=vs_ffn, moe_vs_dense_matmul=vs_matmul, target=LAYER_TARGET,
                **{"pass": {"vs_dense_ffn": at_least(vs_ffn, LAYER_TARGET),
                            "vs_dense_matmul": at_least(vs_matmul, LAYER_TARGET)}})
  if errors:
    record["error"] = "; ".join(f"{k}: {v}" for k, v in errors.items())
  if layer.ok and layer.output is not None:
    load = np.asarray(layer.output[0][1])
    record["load_min_max"] = [int(load.min()), int(load.max())]
  return record


def run_perf(args) -> None:
  dense_fwd_bwd = {}
  for routing in args.routings:
    for tokens_per_expert in args.tokens_per_expert:
      for num_experts in args.experts:
        for dim in args.dims:
          log(f"[gmm] {routing} tokens/expert={tokens_per_expert} E={num_experts} D=F={dim}")
          record = gmm_case(routing, tokens_per_expert, num_experts, dim, args)
          emit(record)
          if routing == "balanced":
            dense_fwd_bwd[(tokens_per_expert * num_experts, dim)] = (
                record["tflops"]["dense"]["fwd_bwd"])
  for backend in args.layer_backends:
    for num_experts in args.layer_experts:
      for dim in args.layer_dims:
        log(f"[layer] {backend} E={num_experts} D=F={dim} {args.expert_type}")
        rows = args.layer_tokens_per_expert * num_experts
        emit(layer_case(num_experts, dim, backend, args, dense_fwd_bwd.get((rows, dim))))


# ----------------------------------------------------------------------------
# --summarize: JSON lines -> markdown


def read_records(paths: list[str]) -> list[dict[str, Any]]:
  """The JSON lines of the files at `paths`; a file not written yet (the GPU run's,
  before a GPU has run it) is skipped with a note on stderr."""
  records = []
  for path in paths:
    if not os.path.exists(path):
      log(f"{path}: no such file, summarized without it")
      continue
    with open(path, encoding="utf-8") as f:
      records += [json.loads(line) for line in f if line.startswith("{")]
  return records


def fmt(value, spec: str = ".2f") -> str:
  if value is None:
    return "-"
  return "non-finite" if math.isinf(value) else format(value, spec)


def verdict(value: Optional[bool]) -> str:
  return {True: "pass", False: "**fail**", None: "-"}[value]


def worse(a: float, b: Optional[float]) -> float:
  """The larger error; None (a non-finite result) counts as infinite."""
  return max(a, math.inf if b is None else b)


def source_label(header: dict[str, Any]) -> str:
  modified = header.get("pallas_kernels_modified")
  return header["commit"] + (" with uncommitted pallas_kernels changes" if modified else "")


def correctness_lines(records: list[dict[str, Any]]) -> list[str]:
  """The correctness table: per (op, target, dtype), worst error over the cases."""
  rows = [r for r in records if r["bench"] == "correctness"]
  if not rows:
    return ["No correctness run in the input.", ""]
  headers = [m for m in records if m["bench"] == "machine" and m.get("mode") == "correctness"]
  machines = {(m["device_kind"], m.get("cpu_model")) for m in headers}
  versions = sorted({source_label(m) for m in headers if m.get("commit")})
  modes = sorted({(r["target"], "interpret" if r["interpret"] else "compiled") for r in rows})
  cases = {r["case"]: r for r in rows}
  lines = [f"Device: {', '.join(f'{d} ({c})' if c else d for d, c in sorted(machines))}. "
           f"Targets: {', '.join(f'{t} ({m})' for t, m in modes)}. JAX "
           f"{', '.join(sorted({m['jax'] for m in headers}))}"
           + (f", source {', '.join(versions)}." if versions else "."),
           "",
           "Cases (R rows, lhs [R, D], W [E, D, F]; group sizes):", ""]
  lines += [f"- `{name}`: E={c['E']} R={c['R']} D={c['D']} F={c['F']}, sizes {c['sizes']}"
            for name, c in cases.items()]
  lines += ["",
            "Error = max |got - want| / max |want| against a float64 per-row reference; the "
            f"worst over the cases. Tolerance {TOLERANCE['float32']:g} (float32), "
            f"{TOLERANCE['bfloat16']:g} (bfloat16); `zeros` = rows in no local group and weight "
            "gradients of empty groups exactly zero in every case. On target mosaic, "
            "combine is an XLA segment sum (no kernel).", "",
            "| op | target | dtype | passed | out | d lhs / d rows | d W / d weight | zeros |",
            "|---|---|---|---|---|---|---|---|"]
  groups = {}
  for r in rows:
    groups.setdefault((r["op"], r["target"], r["dtype"]), []).append(r)
  for (op, target, dtype), group in groups.items():
    worst = {}
    for r in group:
      for name, e in r.get("errors", {}).items():
        worst[name] = worse(worst.get(name, 0.0), e["rel"])
    second = worst.get("d_lhs", worst.get("d_rows"))
    third = worst.get("d_rhs", worst.get("d_weight"))
    zeros = all(r.get("exact_zeros", False) for r in group)
    passed = sum(bool(r["pass"]) for r in group)
    lines.append(f"| {op} | {target} | {dtype} | {passed}/{len(group)} | "
                 f"{fmt(worst.get('out'), '.1e')} | {fmt(second, '.1e')} | "
                 f"{fmt(third, '.1e')} | {'yes' if zeros else '**no**'} |")
  failed = [r for r in rows if not r["pass"]]
  total = len(rows)
  lines += ["", f"{total - len(failed)} of {total} (case, op, target, dtype) lines pass."]
  for r in failed:
    lines.append(f"- failed: {r['case']} {r['op']} {r['target']} {r['dtype']}: "
                 f"{r.get('error') or r.get('errors')}")
  seconds = {}
  for r in rows:
    seconds[(r["case"], r["target"], r["dtype"])] = r.get("case_seconds") or 0.0
  lines += ["", f"Compile and run time of the kernels: {sum(seconds.values()):.0f} s "
            f"over {len(seconds)} (case, target, dtype) functions.", ""]
  return lines


def gmm_perf_lines(rows: list[dict[str, Any]]) -> list[str]:
  """The grid table: TFLOP/s and ratios, forward and forward+backward."""
  lines = ["| routing | tokens/expert | E | D=F | phase | pallas TFLOP/s | dense | ragged_dot | "
           "pallas/dense | pallas/ragged | targets met | max rel. diff vs ragged |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    for p, label in (("fwd", "fwd"), ("fwd_bwd", "fwd+bwd")):
      met = [verdict(r["pass"]["vs_dense"][p]), verdict(r["pass"]["vs_ragged_dot"][p])]
      lines.append(
          f"| {r['routing']} | {r['tokens_per_expert']} | {r['E']} | {r['D']} | {label} | "
          f"{fmt(r['tflops']['pallas'][p], '.1f')} | {fmt(r['tflops']['dense'][p], '.1f')} | "
          f"{fmt(r['tflops']['ragged_dot'][p], '.1f')} | {fmt(r['pallas_vs_dense'][p])} | "
          f"{fmt(r['pallas_vs_ragged_dot'][p])} | dense {met[0]}, ragged {met[1]} | "
          f"{fmt(r['pallas_vs_ragged_dot_max_rel_diff'][p], '.1e')} |")
  errors = [(r, name, e) for r in rows for name, e in r.get("errors", {}).items()]
  for r, name, e in errors:
    lines.append(f"\n- error at tokens/expert={r['tokens_per_expert']} E={r['E']} D={r['D']} "
                 f"{name}: {e}")
  return lines + [""]


def layer_perf_lines(rows: list[dict[str, Any]]) -> list[str]:
  lines = ["| backend | E | K | T | D=F | experts | MoE TFLOP/s | dense FFN | MoE/dense FFN | "
           "dense matmul (grid) | MoE/dense matmul | target 0.5 | status |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    rate = r.get("tflops", {})
    met = r.get("pass", {})
    status = r["status"] if r["status"] == "ok" else f"error: {r.get('error', '')[:160]}"
    lines.append(
        f"| {r['backend']} | {r['E']} | {r['K']} | {r['T']} | {r['D']} | {r['expert_type']} | "
        f"{fmt(rate.get('moe'), '.1f')} | {fmt(rate.get('dense_ffn'), '.1f')} | "
        f"{fmt(r.get('moe_vs_dense_ffn'))} | {fmt(r.get('dense_matmul_fwd_bwd_tflops'), '.1f')} | "
        f"{fmt(r.get('moe_vs_dense_matmul'))} | ffn {verdict(met.get('vs_dense_ffn'))}, "
        f"matmul {verdict(met.get('vs_dense_matmul'))} | {status} |")
  return lines + [""]


def perf_lines(records: list[dict[str, Any]]) -> list[str]:
  gmm_rows = [r for r in records if r["bench"] == "gmm_perf"]
  layer_rows = [r for r in records if r["bench"] == "layer_perf"]
  if not gmm_rows and not layer_rows:
    return ["**Not yet measured.** No H100/H200 was available to the run that wrote this "
            "file. On one, run", "", "```", PERF_COMMAND, SUMMARIZE_COMMAND, "```", "",
            f"Targets: pallas gmm >= {VS_DENSE_TARGET:.0%} of dense-matmul throughput at "
            f"{TARGET_TOKENS_PER_EXPERT} tokens per expert, >= {VS_RAGGED_TARGET}x "
            f"jax.lax.ragged_dot, and the MoE layer forward+backward >= {LAYER_TARGET:.0%} of "
            "the dense-matmul throughput.", ""]
  devices = sorted({r["device_kind"] for r in gmm_rows + layer_rows})
  dtypes = sorted({r["dtype"] for r in gmm_rows + layer_rows})
  lines = [f"Device: **{', '.join(devices)}**, {', '.join(dtypes)}. TFLOP/s = 2 M D F "
           "(forward) or 6 M D F (forward+backward) over the median time; dense = jnp.dot "
           "[M, D] @ [D, F], same FLOPs. Targets: pallas/dense >= "
           f"{VS_DENSE_TARGET} at {TARGET_TOKENS_PER_EXPERT} tokens per expert, pallas/ragged "
           f">= {VS_RAGGED_TARGET}.", ""]
  if gmm_rows:
    lines += gmm_perf_lines(gmm_rows)
  if layer_rows:
    lines += ["### MoE layer, forward+backward", "",
              "Throughput = active expert FLOPs (6 T K D F x 3 for glu, x 2 for mlp) over "
              "the median time; the dense FFN (hidden K F) does the same FLOPs; dense matmul "
              "= the grid's jnp.dot forward+backward at M = T K, D, F.", ""]
    lines += layer_perf_lines(layer_rows)
  return lines


def summarize(paths: list[str], out: Optional[str]) -> None:
  records = read_records(paths)
  lines = ["# Grouped-matmul kernels: interpret-mode correctness and GPU throughput", "",
           "`experiments/bench_kernels.py` (its docstring gives the method):", "", "```",
           CORRECTNESS_COMMAND, PERF_COMMAND + "    # on an H100/H200", SUMMARIZE_COMMAND,
           "```", "", "## Correctness", ""]
  lines += correctness_lines(records)
  lines += ["## GPU performance", ""]
  lines += perf_lines(records)
  if out:
    write_keeping_reading(out, lines)
  else:
    print("\n".join(lines))


# ----------------------------------------------------------------------------


def int_list(text: str) -> list[int]:
  return [int(v) for v in text.split(",") if v]


def str_list(text: str) -> list[str]:
  return [v for v in text.split(",") if v]


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--mode", choices=("correctness", "perf"), default=None,
                      help="default: perf on GPU and TPU, correctness on CPU")
  add_summary_arguments(parser, many=True)
  parser.add_argument("--seed", type=int, default=0)
  group = parser.add_argument_group("correctness")
  group.add_argument("--cases", type=str_list, default=list(CORRECTNESS_CASES))
  group.add_argument("--targets", type=str_list, default=list(pallas_kernels.TARGETS))
  group.add_argument("--dtypes", type=str_list, default=["float32", "bfloat16"])
  group = parser.add_argument_group("perf")
  group.add_argument("--allow-cpu", action="store_true",
                     help="run --mode perf on CPU (interpret mode: a smoke test, no timing)")
  group.add_argument("--tokens_per_expert", type=int_list, default=[128, 512, 2048])
  group.add_argument("--experts", type=int_list, default=[8, 64])
  group.add_argument("--dims", type=int_list, default=[1024, 4096], help="D = F")
  group.add_argument("--routings", type=str_list, default=["balanced"],
                     help="balanced, skewed (half the rows on expert 0)")
  group.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  group.add_argument("--repeats", type=int, default=10)
  group.add_argument("--warmup", type=int, default=2)
  group.add_argument("--min_repeat_ms", type=float, default=20.0,
                     help="calls per timed repeat are set so one repeat lasts this long")
  group.add_argument("--max_seconds_per_function", type=float, default=30.0,
                     help="fewer repeats for a function whose repeats would take longer")
  group.add_argument("--block_mkn", type=int_list, default=None,
                     help="uniform gmm tiles m,k,n for every pass (default: the target's)")
  group.add_argument("--num_warps", type=int, default=4)
  group.add_argument("--num_stages", type=int, default=3)
  group.add_argument("--layer_backends", type=str_list, default=["pallas"],
                     help="MoE backends of the layer case; empty to skip it")
  group.add_argument("--layer_experts", type=int_list, default=[8, 64])
  group.add_argument("--layer_dims", type=int_list, default=[1024, 4096], help="D = F")
  group.add_argument("--layer_tokens_per_expert", type=int, default=TARGET_TOKENS_PER_EXPERT)
  group.add_argument("--top_k", type=int, default=2)
  group.add_argument("--expert_type", default="glu", choices=("glu", "mlp"))
  args = parser.parse_args(argv)
  args.mode = args.mode or ("perf" if jax.default_backend() in NATIVE_TARGET else "correctness")
  for name in args.cases:
    if name not in CORRECTNESS_CASES:
      parser.error(f"--cases: {name!r} is not one of {list(CORRECTNESS_CASES)}")
  for target in args.targets:
    if target not in pallas_kernels.TARGETS:
      parser.error(f"--targets: {target!r} is not one of {pallas_kernels.TARGETS}")
  for dtype in args.dtypes:
    if dtype not in TOLERANCE:
      parser.error(f"--dtypes: {dtype!r} is not one of {list(TOLERANCE)}")
  for routing in args.routings:
    if routing not in ("balanced", "skewed"):
      parser.error(f"--routings: {routing!r} is not balanced or skewed")
  if args.repeats < 1:
    parser.error("--repeats must be >= 1")
  if args.block_mkn is not None and len(args.block_mkn) != 3:
    parser.error("--block_mkn takes three integers m,k,n")
  if (not args.summarize and args.mode == "perf" and jax.default_backend() == "cpu"
      and not args.allow_cpu):
    parser.error("--mode perf on CPU would time Pallas interpret mode, which measures "
                 "nothing about the kernels. Run it on a GPU (H100/H200) or TPU; pass "
                 "--allow-cpu with small sizes only to smoke-test the script.")
  args.dtype = jnp.dtype(args.dtype)
  tiling = (None if args.block_mkn is None else
            pallas_kernels.GmmTiling.uniform(*args.block_mkn))
  args.settings = pallas_kernels.KernelSettings(tiling=tiling, num_warps=args.num_warps,
                                                num_stages=args.num_stages)
  return args


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.summarize:
    summarize(args.summarize, args.out)
    return
  emit({"bench": "machine", "mode": args.mode, **machine(), **source_version()})
  if args.mode == "correctness":
    run_correctness(args)
  else:
    run_perf(args)


if __name__ == "__main__":
  main()

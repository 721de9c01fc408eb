"""The one command for a machine with an accelerator: is moejax right there, and how fast.

  PYTHONPATH=. python experiments/device_check.py                  # GPU or TPU, < 8 min
  PYTHONPATH=. python experiments/device_check.py --platform cpu   # tiny sizes, ~1 min

It needs only jax (with CUDA or TPU), flax, optax, numpy and this working tree (no
ml_collections, grain or tensorflow-datasets, no installs). Parts, in this order,
each written out as soon as it finishes (a cut-off run keeps what it measured):

  machine        device, jax/jaxlib, and the measured TFLOP/s of one dense bf16
                 matmul [N, N] @ [N, N]: the ceiling the rest is compared with
  kernels        every Pallas kernel (gmm plain, row-gathered, transposed, with a group
                 offset, all three; tgmm; combine; values and gradients) compiled for
                 the platform (interpret mode on CPU) on bench_kernels.py's
                 correctness grid, fp32 and bf16, against float64 references
  layer          the MoE layer's values and gradients (x and every parameter) with
                 the sorted engine's pallas, xla and ragged_dot backends against the
                 loop oracle: top-k dropless and with capacity, expert choice alone
                 and with capacity; fp32 at HIGHEST matmul precision
  kernel_perf    bf16 throughput grid, 256 to 8192 rows per expert: gmm forward and
                 forward+backward against jnp.dot on the same rows and
                 jax.lax.ragged_dot (bench_kernels.py's grid point), tgmm against
                 jnp.dot(x^T, g) and ragged_dot's weight gradient, combine against
                 an XLA segment sum
  layer_perf     the MoE layer forward+backward against a dense FFN of the same
                 active FLOPs, bf16, per backend (bench_kernels.py's layer case)
  training       100 steps of lm_small (configs/lm_small.py sizes: 8 blocks, D 512,
                 E 16 top-2 every other block, bf16, 64 x 512 tokens) on synthetic
                 token batches built in memory, per MoE backend, and its dense twin:
                 tokens/s and model FLOPs utilisation

Output: experiments/results/device_<device>_<date>.jsonl (one JSON object per line;
`pass` on every correctness line) and a markdown summary beside it (rewritten after
each part). The exit status is 1 if any correctness line fails, 2 if the platform
asked for is missing. A kernel that fails to compile is a failed line with its error,
and the run goes on. --summarize FILE.jsonl rewrites the summary of a run.
--size tiny (the default on CPU) shrinks every part so the script runs end to end
in interpret mode; its timings mean nothing.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import sys
import time
import types
from typing import Any, Callable, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("machine", "kernels", "layer", "kernel_perf", "layer_perf", "training")
PLATFORMS = ("cpu", "gpu", "tpu")
LAYER_BACKENDS = ("pallas", "xla", "ragged_dot")
LAYER_TOLERANCE = 1e-4          # fp32 values and gradients, relative to the largest entry
# Nominal dense bf16 peak, TFLOP/s, by device kind (SXM parts); MFU is also given
# against the measured matmul ceiling, which needs no table.
NOMINAL_BF16_TFLOPS = {"H100 80GB HBM3": 989.4, "H100 PCIe": 756.0, "H200": 989.4,
                       "H100": 989.4, "A100": 312.0, "TPU v4": 275.0, "TPU v5 lite": 197.0,
                       "TPU v5": 459.0, "TPU v6 lite": 918.0}

SIZES = {
    "full": dict(matmul_n=8192, kernel_cases=None, layer_tokens=512, layer_dim=256,
                 layer_hidden=512, layer_experts=8, grid_tokens=(2048, 8192, 256, 1024),
                 grid_shapes=((8, 4096), (64, 1024)), layer_perf_shapes=((8, 2048), (64, 1024)),
                 layer_perf_tokens_per_expert=2048, layer_cases=None, train_steps=100,
                 repeats=10,
                 min_repeat_ms=20.0, lm=None,
                 budget_s=dict(kernels=80, layer=50, kernel_perf=110, layer_perf=50,
                               training=100)),
    "tiny": dict(matmul_n=256, kernel_cases=("e4_empty_groups",), layer_tokens=24,
                 layer_dim=16, layer_hidden=12, layer_experts=4, grid_tokens=(8,),
                 grid_shapes=((4, 32),), layer_perf_shapes=((4, 32),),
                 layer_perf_tokens_per_expert=16,
                 # A plan with drops of each layout (the CPU run proves the part runs).
                 layer_cases=("topk_capacity", "expert_choice_capacity"), train_steps=3,
                 repeats=2,
                 min_repeat_ms=1.0, budget_s={},
                 lm=dict(model=dict(num_layers=2, model_dim=32, num_heads=2, mlp_dim=64,
                                    moe_every=2, dtype="bfloat16"),
                         moe=dict(num_experts=4, top_k=2, hidden_dim=32), seq_len=16,
                         batch_size=4)),
}


# ----------------------------------------------------------------------------
# Output: JSON lines flushed one by one, and the markdown summary.


class Results:
  """Appends records to the JSONL file (and stdout) as they come."""

  def __init__(self, path: str):
    self.path, self.records = path, []
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    self.file = open(path, "w", encoding="utf-8")

  def emit(self, record: dict[str, Any]) -> None:
    self.records.append(record)
    line = json.dumps(record, default=str)
    self.file.write(line + "\n")
    self.file.flush()
    print(line, flush=True)

  def failed(self) -> list[dict[str, Any]]:
    return failed_lines(self.records)


def correctness_lines(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Lines that can fail: kernels and layer parity, a part that stopped with an
  error, compiled kernels against ragged_dot in the throughput grid, training runs."""
  return [r for r in records if isinstance(r.get("pass"), bool) or "check_pass" in r
          or r.get("bench") == "training"]


def failed_lines(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """The correctness lines that failed (a training run fails when it did not run or
  its loss is not finite)."""
  return [r for r in correctness_lines(records)
          if r.get("pass") is False or r.get("check_pass") is False
          or (r.get("bench") == "training" and not r.get("finite", False))]


def auto_choice(records: list[dict[str, Any]]) -> dict[str, Any]:
  """The backends that passed every correctness line of this run, and among them the
  fastest by the layer's forward+backward throughput (median over the layer cases):
  what dispatch.gmm.AUTO_BACKEND should name for this platform."""
  kernels_ok = all(r["pass"] for r in records if r.get("part") == "kernels" and "pass" in r)
  grid_ok = all(r.get("check_pass", True) for r in records if r.get("part") == "kernel_perf")
  passed, speed = [], {}
  for backend in LAYER_BACKENDS:
    parity = [r for r in records if r.get("bench") == "layer_parity"
              and r["backend"] == backend]
    if parity and all(r["pass"] for r in parity) and (
        backend != "pallas" or (kernels_ok and grid_ok)):
      passed.append(backend)
    rates = sorted(r["tflops"]["moe"] for r in records if r.get("bench") == "layer_perf"
                   and r["backend"] == backend and (r.get("tflops") or {}).get("moe"))
    if rates:
      speed[backend] = rates[len(rates) // 2]
  timed = [b for b in passed if b in speed]
  return {"passed": passed, "layer_tflops": speed,
          "fastest": max(timed, key=speed.get) if timed else None}


def log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def slug(text: str) -> str:
  return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "device"


def error_text(e: BaseException) -> str:
  return f"{type(e).__name__}: {str(e)[:400]}"


def within_budget(part: str, items, budget_s: Optional[float], results: Results):
  """Yields `items` until the part's time budget (seconds from the first item; None:
  no limit) is spent; the first item always runs. What is left is recorded as one
  `skipped` line."""
  items = list(items)
  deadline = None if budget_s is None else time.perf_counter() + budget_s
  for i, item in enumerate(items):
    if i and deadline is not None and time.perf_counter() > deadline:
      results.emit({"part": part, "bench": "skipped",
                    "reason": f"the part's budget of {budget_s:g} s was spent",
                    "skipped": [str(x) for x in items[i:]]})
      return
    yield item


def run_part(name: str, results: Results, fn: Callable[[], None]) -> None:
  """Runs one part; an exception ends the part (not the run) with a failed line."""
  log(f"[{name}] start")
  start = time.perf_counter()
  try:
    fn()
  except Exception as e:  # pylint: disable=broad-except
    results.emit({"part": name, "bench": "part_error", "pass": False, "error": error_text(e)})
  results.emit({"part": name, "bench": "part_done",
                "seconds": round(time.perf_counter() - start, 1)})


# ----------------------------------------------------------------------------
# Part 1: the machine and the dense-matmul ceiling.


def header(m, args) -> dict[str, Any]:
  """The first line of every run: the machine, the versions and the source."""
  kind = m.jax.devices()[0].device_kind
  return {"part": "machine", "bench": "machine", **m.bench_layer.machine(),
          **m.bench_kernels.source_version(), "platform_asked": args.platform,
          "size": args.size, "parts": args.parts, "nominal_bf16_tflops": nominal_peak(kind)}


def part_machine(m, results: Results, size: dict[str, Any], args) -> Optional[float]:
  """The dense bf16 matmul ceiling, TFLOP/s."""
  jax, jnp = m.jax, m.jnp
  n = size["matmul_n"]
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.bfloat16)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.bfloat16)
  run = m.bench_kernels.Timed("dense_bf16_matmul", lambda a, b: a @ b, (a, b))
  if run.ok:
    run.warm_up(2, size["min_repeat_ms"] * 1e-3, 20.0, keep_output=False)
  m.bench_kernels.time_round_robin([run], size["repeats"])
  ms = run.median_ms()
  rate = m.bench_kernels.tflops(2.0 * n ** 3, ms)
  results.emit({"part": "machine", "bench": "matmul_ceiling", "matmul_n": n, "matmul_ms": ms,
                "matmul_tflops": rate, "error": run.error})
  return rate


def nominal_peak(device_kind: str) -> Optional[float]:
  for key, value in NOMINAL_BF16_TFLOPS.items():
    if key in device_kind:
      return value
  return None


# ----------------------------------------------------------------------------
# Part 2: the kernels on the correctness grid.


def native_target(platform: str) -> str:
  return "mosaic" if platform == "tpu" else "triton"


def part_kernels(m, results: Results, size: dict[str, Any], args) -> None:
  bk = m.bench_kernels
  cases = size["kernel_cases"] or tuple(bk.CORRECTNESS_CASES)
  target = native_target(args.platform)
  items = [(name, dtype) for name in cases for dtype in ("float32", "bfloat16")]
  for name, dtype in within_budget("kernels", items, args.budget("kernels"), results):
    log(f"[kernels] {name} {target} {dtype}")
    for record in bk.check_case(name, bk.CORRECTNESS_CASES[name], target, dtype, args.seed):
      results.emit({"part": "kernels", **record})


# ----------------------------------------------------------------------------
# Part 3: the layer against the loop oracle.


def layer_cases(size: dict[str, Any]) -> dict[str, dict[str, Any]]:
  base = dict(num_experts=size["layer_experts"], top_k=2, hidden_dim=size["layer_hidden"])
  cases = {
      "topk_dropless": dict(base),
      "topk_capacity": dict(base, capacity_factor=1.0),
      "expert_choice": dict(base, router="expert_choice"),
      "expert_choice_capacity": dict(base, router="expert_choice", capacity_factor=0.5),
  }
  chosen = size.get("layer_cases")
  return cases if chosen is None else {name: cases[name] for name in chosen}


def layer_loss(m, layer) -> Callable:
  jnp = m.jnp

  def loss(params, x):
    y, aux = layer.apply({"params": params}, x, deterministic=True)
    weights = jnp.arange(1, y.shape[-1] + 1, dtype=jnp.float32)
    return jnp.sum(jnp.tanh(y) * weights) + aux.loss, y
  return m.jax.jit(m.jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def tree_relative_error(m, got, want) -> Optional[float]:
  """max over leaves of max |got - want| / max |want|; None if got is not finite."""
  np = m.np
  worst = 0.0
  for a, b in zip(m.jax.tree.leaves(got), m.jax.tree.leaves(want)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not np.all(np.isfinite(a)):
      return None
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    worst = max(worst, float(np.max(np.abs(a - b))) / (scale if scale > 0 else 1.0)
                if b.size else 0.0)
  return worst


def part_layer(m, results: Results, size: dict[str, Any], args) -> None:
  jax, jnp = m.jax, m.jnp
  x = jax.random.normal(jax.random.PRNGKey(args.seed), (1, size["layer_tokens"],
                                                         size["layer_dim"]), jnp.float32)
  cases = layer_cases(size)
  with jax.default_matmul_precision("highest"):
    for case in within_budget("layer", cases, args.budget("layer"), results):
      kwargs = cases[case]
      oracle = m.MoE(engine="loop", **kwargs)
      # Traced once: an eager init would run the loop oracle op by op.
      params = jax.jit(lambda key: oracle.init(key, x))(  # pylint: disable=cell-var-from-loop
          jax.random.PRNGKey(args.seed + 1))["params"]
      (want_loss, want_y), want_grads = jax.device_get(layer_loss(m, oracle)(params, x))
      for backend in LAYER_BACKENDS:
        log(f"[layer] {case} {backend}")
        record = {"part": "layer", "bench": "layer_parity", "case": case, "backend": backend,
                  "tolerance": LAYER_TOLERANCE, **{k: str(v) for k, v in kwargs.items()}}
        try:
          layer = m.MoE(engine="sorted", backend=backend, **kwargs)
          (loss, y), grads = jax.device_get(layer_loss(m, layer)(params, x))
        except Exception as e:  # pylint: disable=broad-except
          results.emit({**record, "pass": False, "error": error_text(e)})
          continue
        errors = {"y": tree_relative_error(m, y, want_y),
                  "loss": tree_relative_error(m, loss, want_loss),
                  "grad_x": tree_relative_error(m, grads[1], want_grads[1]),
                  "grad_params": tree_relative_error(m, grads[0], want_grads[0])}
        results.emit({**record, "errors": errors,
                      "pass": all(e is not None and e <= LAYER_TOLERANCE
                                  for e in errors.values())})


# ----------------------------------------------------------------------------
# Part 4: kernel throughput.


def perf_args(m, size: dict[str, Any], args, **extra) -> types.SimpleNamespace:
  """The settings bench_kernels' grid and layer cases read."""
  return types.SimpleNamespace(
      dtype=m.jnp.dtype("bfloat16"), seed=args.seed, warmup=2, repeats=size["repeats"],
      min_repeat_ms=size["min_repeat_ms"], max_seconds_per_function=args.max_seconds,
      settings=m.pallas_kernels.KernelSettings(), top_k=2, expert_type="glu",
      layer_tokens_per_expert=size["layer_perf_tokens_per_expert"], **extra)


def tgmm_combine_case(m, tokens_per_expert: int, num_experts: int, dim: int, pargs):
  """tgmm and combine timings at one grid point (bf16)."""
  jax, jnp, bk = m.jax, m.jnp, m.bench_kernels
  rows, dtype = tokens_per_expert * num_experts, pargs.dtype
  keys = jax.random.split(jax.random.PRNGKey(pargs.seed), 4)
  lhs = jax.random.normal(keys[0], (rows, dim), dtype)
  grad = jax.random.normal(keys[1], (rows, dim), dtype)
  w = jax.random.normal(keys[2], (num_experts, dim, dim), dtype)
  sizes = jnp.asarray(bk.group_sizes_of("balanced", tokens_per_expert, num_experts))
  tokens = rows // 2                                            # K = 2 rows per token
  token_of_row = jax.random.permutation(keys[3], jnp.arange(rows) % tokens).astype(jnp.int32)
  weight = jnp.full((rows,), 0.5, jnp.float32)
  s = pargs.settings

  def ragged_weight_grad(lhs, grad, w, sizes):
    _, pullback = jax.vjp(lambda b: jax.lax.ragged_dot(lhs, b, sizes), w)
    return pullback(grad)[0]

  def segment_sum(rows_, index, weight_):
    return jax.ops.segment_sum((rows_.astype(jnp.float32) * weight_[:, None]), index,
                               num_segments=tokens).astype(rows_.dtype)

  runs = {
      "tgmm/pallas": bk.Timed("tgmm/pallas", lambda a, g, sz: m.pallas_kernels.tgmm(
          a, g, sz, settings=s), (lhs, grad, sizes)),
      "tgmm/dense": bk.Timed("tgmm/dense", lambda a, g: a.T @ g, (lhs, grad)),
      "tgmm/ragged_dot": bk.Timed("tgmm/ragged_dot", ragged_weight_grad,
                                  (lhs, grad, w, sizes)),
      "combine/pallas": bk.Timed("combine/pallas", lambda r, i, wt: m.pallas_kernels.combine(
          r, i, wt, tokens, settings=s), (lhs, token_of_row, weight)),
      "combine/segment_sum": bk.Timed("combine/segment_sum", segment_sum,
                                      (lhs, token_of_row, weight)),
  }
  for run in runs.values():
    if run.ok:
      run.warm_up(pargs.warmup, pargs.min_repeat_ms * 1e-3, pargs.max_seconds_per_function)
  bk.time_round_robin(list(runs.values()), pargs.repeats)
  ms = {k: r.median_ms() for k, r in runs.items()}
  tgmm_flops = 2.0 * rows * dim * dim
  combine_bytes = (rows * dim + tokens * dim) * jnp.dtype(dtype).itemsize
  check = {"tgmm": bk.largest_relative_difference(runs["tgmm/pallas"].output,
                                                  runs["tgmm/ragged_dot"].output),
           "combine": bk.largest_relative_difference(runs["combine/pallas"].output,
                                                     runs["combine/segment_sum"].output)}
  return {"part": "kernel_perf", "bench": "tgmm_combine_perf",
          "tokens_per_expert": tokens_per_expert, "E": num_experts, "D": dim, "F": dim,
          "M": rows, "T": tokens, "dtype": jnp.dtype(dtype).name, "ms": ms,
          "tgmm_tflops": {k.split("/")[1]: bk.tflops(tgmm_flops, v) for k, v in ms.items()
                          if k.startswith("tgmm")},
          "combine_gbps": {k.split("/")[1]: v and round(combine_bytes / (v * 1e-3) / 1e9, 1)
                           for k, v in ms.items() if k.startswith("combine")},
          "tgmm_vs_dense": bk.ratio(ms["tgmm/dense"], ms["tgmm/pallas"]),
          "tgmm_vs_ragged_dot": bk.ratio(ms["tgmm/ragged_dot"], ms["tgmm/pallas"]),
          "combine_vs_segment_sum": bk.ratio(ms["combine/segment_sum"], ms["combine/pallas"]),
          "max_rel_diff": check,
          "check_pass": all(v is not None and v <= bk.TOLERANCE["bfloat16"]
                            for v in check.values()),
          "errors": {r.name: r.error for r in runs.values() if r.error}}


def part_kernel_perf(m, results: Results, size: dict[str, Any], args, dense_fwd_bwd) -> None:
  pargs = perf_args(m, size, args)
  points = [(tokens_per_expert, num_experts, dim) for tokens_per_expert in size["grid_tokens"]
            for num_experts, dim in size["grid_shapes"]]
  for point in within_budget("kernel_perf", points, args.budget("kernel_perf"), results):
    tokens_per_expert, num_experts, dim = point
    log(f"[kernel_perf] tokens/expert={tokens_per_expert} E={num_experts} D=F={dim}")
    record = m.bench_kernels.gmm_case("balanced", tokens_per_expert, num_experts, dim, pargs)
    results.emit({"part": "kernel_perf", **record})
    dense_fwd_bwd[(tokens_per_expert * num_experts, dim)] = record["tflops"]["dense"]["fwd_bwd"]
    results.emit(tgmm_combine_case(m, tokens_per_expert, num_experts, dim, pargs))


# ----------------------------------------------------------------------------
# Part 5: the layer against a dense FFN of the same active FLOPs.


def part_layer_perf(m, results: Results, size: dict[str, Any], args, dense_fwd_bwd) -> None:
  pargs = perf_args(m, size, args)
  cases = [(num_experts, dim, backend) for num_experts, dim in size["layer_perf_shapes"]
           for backend in LAYER_BACKENDS]
  for num_experts, dim, backend in within_budget("layer_perf", cases, args.budget("layer_perf"),
                                                 results):
    log(f"[layer_perf] {backend} E={num_experts} D=F={dim}")
    rows = pargs.layer_tokens_per_expert * num_experts
    record = m.bench_kernels.layer_case(num_experts, dim, backend, pargs,
                                        dense_fwd_bwd.get((rows, dim)))
    results.emit({"part": "layer_perf", **record})


# ----------------------------------------------------------------------------
# Part 6: lm_small training on synthetic batches.


def lm_settings(size: dict[str, Any]) -> dict[str, Any]:
  if size["lm"] is not None:
    return size["lm"]
  import configs.lm_small as lm_small  # pylint: disable=g-import-not-at-top
  return dict(model=lm_small.MODEL, moe=lm_small.MOE, seq_len=lm_small.SEQ_LEN,
              batch_size=lm_small.BATCH_SIZE)


def model_flops_per_token(model, seq_len: int) -> float:
  """Training FLOPs per token (forward + backward = 3 x forward), counting the active
  matmul parameters N and attention: 6 N + 12 n_layers D L (PaLM, Chowdhery et al.
  2022, appendix B), N = per block 4 D^2 (q, k, v, o) + the FFN (3 D F_active for
  SwiGLU, plus D E for the router) + D V for the tied output projection."""
  d = model.model_dim
  per_ffn = 3 * d  # SwiGLU: gate, up, down
  n = model.vocab_size * d
  for layer in range(model.num_layers):
    n += 4 * d * d
    if model.is_moe_layer(layer):
      moe = model.moe
      n += per_ffn * moe.top_k * moe.hidden_dim + d * moe.num_experts
    else:
      n += per_ffn * model.mlp_dim
  return 6.0 * n + 12.0 * model.num_layers * d * seq_len


def synthetic_batch(m, key, batch_size: int, seq_len: int, vocab: int) -> dict[str, Any]:
  """Rows of L + 1 random tokens, one segment per row (all targets counted)."""
  jnp = m.jnp
  tokens = m.jax.random.randint(key, (batch_size, seq_len + 1), 3, vocab, jnp.int32)
  return {"tokens": tokens, "tokens_segment_ids": jnp.ones_like(tokens),
          "tokens_positions": jnp.broadcast_to(jnp.arange(seq_len + 1), tokens.shape)}


def train_run(m, name: str, moe: Optional[dict[str, Any]], lm: dict[str, Any], steps: int,
              ceiling: Optional[float], seed: int) -> dict[str, Any]:
  jax, jnp = m.jax, m.jnp
  from moejax.models import TransformerLM  # pylint: disable=g-import-not-at-top
  from moejax.train.state import TrainState, make_optimizer  # pylint: disable=g-import-not-at-top
  from moejax.train.step import make_train_step  # pylint: disable=g-import-not-at-top
  model_kwargs = dict(lm["model"], dtype=jnp.dtype(lm["model"]["dtype"]))
  model = TransformerLM(vocab_size=VOCAB_SIZE, moe=moe, parent=None, **model_kwargs)
  tx = make_optimizer(1e-3, 10, steps)
  seq_len, batch_size = lm["seq_len"], lm["batch_size"]
  batches = [synthetic_batch(m, jax.random.PRNGKey(seed + i), batch_size, seq_len,
                             VOCAB_SIZE) for i in range(4)]

  def init(key):
    variables = model.init(key, batches[0]["tokens"][:, :-1], deterministic=True)
    params = m.nn.meta.unbox(variables["params"])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), routing=variables.get("routing", {}))

  record = {"part": "training", "bench": "training", "name": name, "steps": steps,
            "batch_size": batch_size, "seq_len": seq_len, "model": dict(lm["model"]),
            "moe": moe}
  state = jax.jit(init)(jax.random.PRNGKey(seed))
  step = jax.jit(make_train_step(model, tx), donate_argnums=0)
  start = time.perf_counter()
  state, metrics = step(state, batches[0], jax.random.PRNGKey(0))
  first_loss = float(metrics["loss"])
  record["compile_and_first_step_s"] = round(time.perf_counter() - start, 2)
  start = time.perf_counter()
  for i in range(1, steps):
    state, metrics = step(state, batches[i % len(batches)], jax.random.PRNGKey(i))
  last_loss = float(jax.block_until_ready(metrics["loss"]))
  seconds = time.perf_counter() - start
  tokens_per_s = (steps - 1) * batch_size * seq_len / max(seconds, 1e-9)
  flops = model_flops_per_token(model, seq_len)
  achieved = tokens_per_s * flops / 1e12
  kind = jax.devices()[0].device_kind
  record.update(
      params=sum(int(p.size) for p in jax.tree.leaves(state.params)),
      model_flops_per_token=flops, tokens_per_s=round(tokens_per_s, 1),
      step_ms=round(1e3 * seconds / max(steps - 1, 1), 3), model_tflops=round(achieved, 3),
      mfu_vs_matmul=ceiling and round(achieved / ceiling, 4),
      mfu_vs_nominal=nominal_peak(kind) and round(achieved / nominal_peak(kind), 4),
      first_loss=first_loss, last_loss=last_loss,
      finite=bool(math.isfinite(first_loss) and math.isfinite(last_loss)))
  return record


VOCAB_SIZE = 259      # the byte tokenizer's (moejax.data.tokenizer.ByteTokenizer)


def part_training(m, results: Results, size: dict[str, Any], args, ceiling) -> None:
  lm = lm_settings(size)
  runs = dict([("dense", None)] + [(f"moe_{backend}", dict(lm["moe"], backend=backend))
                                   for backend in args.train_backends])
  for name in within_budget("training", runs, args.budget("training"), results):
    moe = runs[name]
    log(f"[training] {name}")
    try:
      record = train_run(m, name, moe, lm, size["train_steps"], ceiling, args.seed)
    except Exception as e:  # pylint: disable=broad-except
      record = {"part": "training", "bench": "training", "name": name, "error": error_text(e)}
    results.emit(record)


# ----------------------------------------------------------------------------
# The summary.


def summary_lines(m, records: list[dict[str, Any]]) -> list[str]:
  bk = m.bench_kernels
  head = next((r for r in records if r.get("bench") == "machine"), {})
  ceiling = next((r for r in records if r.get("bench") == "matmul_ceiling"), {})
  modified = " (pallas_kernels modified)" if head.get("pallas_kernels_modified") else ""
  lines = [f"# Device check: {head.get('device_kind', '?')}", "",
           f"`experiments/device_check.py` (its docstring gives the method). JAX "
           f"{head.get('jax')} / jaxlib {head.get('jaxlib')}, backend {head.get('backend')}, "
           f"{head.get('device_count')} device(s), size `{head.get('size')}`, source "
           f"{head.get('commit')}{modified}.",
           "", f"Dense bf16 matmul {ceiling.get('matmul_n', '-')}^3: "
           f"**{ceiling.get('matmul_tflops', '-')} TFLOP/s** (nominal peak "
           f"{head.get('nominal_bf16_tflops') or '-'}).", ""]
  failed, checked = failed_lines(records), correctness_lines(records)
  lines += [f"**Correctness: {len(checked) - len(failed)} of {len(checked)} lines pass.**", ""]
  for r in failed:
    lines.append(f"- failed: {r.get('part')} {r.get('case', r.get('name', ''))} "
                 f"{r.get('op', '')} {r.get('backend', r.get('target', ''))} "
                 f"{r.get('dtype', '')}: {r.get('error') or r.get('errors')}")
  choice = auto_choice(records)
  rates = ", ".join(f"{b} {v:g}" for b, v in choice["layer_tflops"].items()) or "not timed"
  lines += ["", f"Backends that passed every correctness line: "
            f"{', '.join(choice['passed']) or 'none'}; layer forward+backward TFLOP/s "
            f"(median): {rates}; `auto` for this platform: "
            + (f"**{choice['fastest'] or '-'}**." if head.get("size") == "full" else
               "not decided by a run at tiny sizes (their timings mean nothing).")]
  kernel_rows = [r for r in records if r.get("bench") == "correctness"]
  if kernel_rows and head:
    lines += ["", "## Kernels (compiled for the platform)", ""]
    lines += bk.correctness_lines(kernel_rows + [{**head, "mode": "correctness"}])
  parity = [r for r in records if r.get("bench") == "layer_parity"]
  if parity:
    lines += ["## MoE layer against the loop oracle (fp32, HIGHEST precision)", "",
              "| case | backend | y | loss | d x | d params | pass |",
              "|---|---|---|---|---|---|---|"]
  for r in parity:
    e = r.get("errors", {})
    lines.append(f"| {r['case']} | {r['backend']} | {bk.fmt(e.get('y'), '.1e')} | "
                 f"{bk.fmt(e.get('loss'), '.1e')} | {bk.fmt(e.get('grad_x'), '.1e')} | "
                 f"{bk.fmt(e.get('grad_params'), '.1e')} | "
                 f"{'pass' if r['pass'] else '**fail** ' + r.get('error', '')[:120]} |")
  gmm_rows = [r for r in records if r.get("bench") == "gmm_perf"]
  if gmm_rows:
    lines += ["", "## Kernel throughput (bf16)", ""] + bk.gmm_perf_lines(gmm_rows)
  extra = [r for r in records if r.get("bench") == "tgmm_combine_perf"]
  if extra:
    lines += ["| tokens/expert | E | D=F | tgmm TFLOP/s | dense x^T g | ragged_dot d W | "
              "tgmm/dense | tgmm/ragged | combine GB/s | segment sum | combine/segment sum |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in extra:
      t, c = r["tgmm_tflops"], r["combine_gbps"]
      lines.append(f"| {r['tokens_per_expert']} | {r['E']} | {r['D']} | "
                   f"{bk.fmt(t.get('pallas'), '.1f')} | "
                   f"{bk.fmt(t.get('dense'), '.1f')} | {bk.fmt(t.get('ragged_dot'), '.1f')} | "
                   f"{bk.fmt(r['tgmm_vs_dense'])} | {bk.fmt(r['tgmm_vs_ragged_dot'])} | "
                   f"{bk.fmt(c.get('pallas'), '.0f')} | {bk.fmt(c.get('segment_sum'), '.0f')} | "
                   f"{bk.fmt(r['combine_vs_segment_sum'])} |")
    lines.append("")
  layer_rows = [r for r in records if r.get("bench") == "layer_perf"]
  if layer_rows:
    lines += ["## MoE layer forward+backward against a dense FFN (bf16)", ""]
    lines += bk.layer_perf_lines(layer_rows)
  train_rows = [r for r in records if r.get("bench") == "training"]
  if train_rows:
    lines += ["## lm_small training, synthetic batches", "",
              "| run | tokens/s | step ms | model TFLOP/s | MFU vs matmul | MFU vs nominal | "
              "compile+first step s | loss first -> last |", "|---|---|---|---|---|---|---|---|"]
    for r in train_rows:
      if "error" in r:
        lines.append(f"| {r['name']} | error: {r['error'][:160]} | | | | | | |")
        continue
      lines.append(f"| {r['name']} | {r['tokens_per_s']:.0f} | {r['step_ms']:.1f} | "
                   f"{r['model_tflops']:.1f} | {bk.fmt(r['mfu_vs_matmul'], '.3f')} | "
                   f"{bk.fmt(r['mfu_vs_nominal'], '.3f')} | {r['compile_and_first_step_s']} | "
                   f"{r['first_loss']:.3f} -> {r['last_loss']:.3f} |")
    lines.append("")
  for r in records:
    if r.get("bench") == "part_error":
      lines.append(f"- part {r['part']} stopped: {r['error']}")
    elif r.get("bench") == "skipped":
      lines.append(f"- part {r['part']}: {r['reason']}; not run: {', '.join(r['skipped'])}")
  return lines + [""]


def write_summary(m, path: str, records: list[dict[str, Any]]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(summary_lines(m, records)))


# ----------------------------------------------------------------------------


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--platform", choices=PLATFORMS, default=None,
                      help="the platform to check (default: JAX's default backend)")
  parser.add_argument("--size", choices=tuple(SIZES), default=None,
                      help="full (default on GPU/TPU) or tiny (default on CPU)")
  parser.add_argument("--parts", default=",".join(PARTS),
                      help=f"comma-separated subset of {','.join(PARTS)}")
  parser.add_argument("--out_dir", default=os.path.join(REPO, "experiments", "results"))
  parser.add_argument("--out", default=None, help="JSONL path (default: "
                      "<out_dir>/device_<device>_<date>.jsonl)")
  parser.add_argument("--train_backends", default="pallas,xla",
                      help="MoE backends of the training part")
  parser.add_argument("--max_seconds", type=float, default=10.0,
                      help="timing budget of one function")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--no_budget", action="store_true",
                      help="let every part run all its items (at full size each part has a "
                      "time budget, so that the run ends within 8 minutes on an H100)")
  parser.add_argument("--summarize", metavar="JSONL", help="rewrite the summary of a run")
  args = parser.parse_args(argv)
  args.parts = [p for p in args.parts.split(",") if p]
  for part in args.parts:
    if part not in PARTS:
      parser.error(f"--parts: {part!r} is not one of {PARTS}")
  args.train_backends = [b for b in args.train_backends.split(",") if b]
  for backend in args.train_backends:
    if backend not in LAYER_BACKENDS:
      parser.error(f"--train_backends: {backend!r} is not one of {LAYER_BACKENDS}")
  return args


def load_modules(platform: Optional[str]) -> types.SimpleNamespace:
  """jax and the project, imported after JAX_PLATFORMS is set for `platform`."""
  if platform == "cpu":
    os.environ["JAX_PLATFORMS"] = "cpu"
  sys.path[:0] = [REPO, os.path.join(REPO, "experiments")]
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import bench_kernels  # pylint: disable=g-import-not-at-top
  import bench_layer  # pylint: disable=g-import-not-at-top
  import pallas_kernels  # pylint: disable=g-import-not-at-top
  from moejax import MoE  # pylint: disable=g-import-not-at-top
  return types.SimpleNamespace(jax=jax, jnp=jnp, np=np, nn=nn, bench_kernels=bench_kernels,
                               bench_layer=bench_layer, pallas_kernels=pallas_kernels, MoE=MoE)


def main(argv=None) -> int:
  args = parse_args(argv)
  m = load_modules(args.platform)
  if args.summarize:
    with open(args.summarize, encoding="utf-8") as f:
      records = [json.loads(line) for line in f if line.startswith("{")]
    write_summary(m, os.path.splitext(args.summarize)[0] + ".md", records)
    return 0
  try:
    backend = m.jax.default_backend()
  except RuntimeError as e:
    backend = f"none ({str(e).splitlines()[0][:160]})"
  if args.platform is None:
    args.platform = backend
  if backend != args.platform:
    print(f"device_check: --platform {args.platform}: no {args.platform} device on this "
          f"machine (JAX's backend is {backend})", file=sys.stderr)
    return 2
  args.size = args.size or ("tiny" if args.platform == "cpu" else "full")
  size = SIZES[args.size]
  args.budget = lambda part: None if args.no_budget else size["budget_s"].get(part)
  device = m.jax.devices()[0].device_kind
  path = args.out or os.path.join(
      args.out_dir, f"device_{slug(device)}_{datetime.date.today().isoformat()}.jsonl")
  results = Results(path)
  results.emit(header(m, args))
  summary = os.path.splitext(path)[0] + ".md"
  log(f"device_check: {device}, {args.size} sizes, parts {','.join(args.parts)} -> {path}")
  ceiling, dense_fwd_bwd = None, {}

  def machine_part():
    nonlocal ceiling
    ceiling = part_machine(m, results, size, args)

  steps = {"machine": machine_part,
           "kernels": lambda: part_kernels(m, results, size, args),
           "layer": lambda: part_layer(m, results, size, args),
           "kernel_perf": lambda: part_kernel_perf(m, results, size, args, dense_fwd_bwd),
           "layer_perf": lambda: part_layer_perf(m, results, size, args, dense_fwd_bwd),
           "training": lambda: part_training(m, results, size, args, ceiling)}
  for part in PARTS:
    if part in args.parts:
      run_part(part, results, steps[part])
      write_summary(m, summary, results.records)
  results.file.close()
  failed = results.failed()
  log(f"device_check: {len(failed)} failed correctness line(s); summary {summary}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())

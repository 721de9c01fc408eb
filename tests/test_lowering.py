"""The kernels and the MoE layer lowered for GPU and TPU, on a CPU machine.

jax.export lowers a function for a platform other than the one it runs on. With
KernelSettings(interpret=False) every pallas_call becomes its target's custom
call: for `cuda` a Triton kernel (`__gpu$xla.gpu.triton`), for `tpu` a Mosaic
kernel (`tpu_custom_call`). Export refuses custom calls it cannot promise to keep
stable, so that check is disabled for exactly these two targets (and for
`ragged_all_to_all` in the expert-parallel test). Nothing is compiled or run.

Lowered: every kernel entry point (gmm plain, with row gather, transposed, over
local groups at an offset; tgmm; combine), fp32 and bf16, forward and forward +
backward, then the MoE layer alone and expert-parallel on 8 simulated devices. A
kernel that no longer lowers fails here, and so does one that falls back to XLA
or drops out of a backward pass: each test counts the kernel calls in the lowered
module, by kernel name, against a count derived by hand from the custom VJPs of
pallas_kernels/ops.py. What lowering cannot see (the Triton and Mosaic compilers,
VMEM and register budgets, speed) is experiments/device_check.py's to check on
the hardware.

Shapes put several tiles of each target's default tiling (pallas_kernels/tiling.py)
along every dimension, and rows that are not a tile multiple, so the padding and
the multi-tile index maps lower too; lowering costs the same at any size.
"""
from __future__ import annotations

import collections
import contextlib
import re

import jax
import jax.numpy as jnp
import pytest

import pallas_kernels as pk
from moejax import MoE
from moejax.parallel import ExpertParallel, exchange, make_mesh

PLATFORMS = {   # export platform: (kernel target, custom call of its kernels)
    "cuda": ("triton", "__gpu$xla.gpu.triton"),
    "tpu": ("mosaic", "tpu_custom_call"),
}
# The pallas_call names (pallas_kernels/triton_*.py, mosaic_gmm.py) of each kind of
# kernel per platform; Mosaic has no combine kernel (ops.py sums in XLA there).
KERNEL_NAMES = {
    "cuda": {"gmm": "moejax_gmm", "tgmm": "moejax_tgmm", "combine": "moejax_combine"},
    "tpu": {"gmm": "moejax_gmm_tpu", "tgmm": "moejax_tgmm_tpu"},
}
# The device the `cuda` lowering targets. device_kind is what an H100 SXM reports
# as jax.Device.device_kind, and num_cores its streaming multiprocessors (what
# AbstractDevice takes from a real GPU's core_count).
H100 = dict(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")

ROWS, TOKENS, GROUPS, LOCAL = 1000, 384, 8, 2   # grouped rows, rows gathered from, E, G
DIM_K, DIM_N = 1024, 768                        # K contracted, N out


@contextlib.contextmanager
def lowering_device(platform: str):
  """Names the device `platform` lowers for, where JAX needs one to lower Pallas.

  JAX 0.12's Triton lowering reads the GPU generation (hence the compute
  capability) from the abstract device of the abstract mesh in context; on a
  machine without a GPU and without one it stops with "No supported GPU devices
  found, please specify an abstract GPU device". The abstract mesh in context is
  kept (the mesh of jax.set_mesh, whose axes shard_map needs) with its device
  replaced by an H100, via AbstractMesh.update(abstract_device=...); with no mesh
  in context, a 1-device abstract mesh with an Auto axis carries it (JAX 0.12
  makes new axes Explicit by default, which the layer refuses). JAX 0.10.2 has the same
  AbstractDevice and AbstractMesh.update, but its Triton lowering reads no abstract
  device: without a GPU it targets compute capability 9.0, an H100, by itself, and
  its kernels lower to the same operations with the H100 named or not (only
  source locations differ). Where AbstractDevice or the abstract_device argument
  is missing (older JAX), nothing is named and the lowering keeps its own
  default. Mosaic lowers without a device (`tpu`): the context is left as it is.
  """
  device_cls = getattr(jax.sharding, "AbstractDevice", None)
  if platform != "cuda" or device_cls is None:
    yield
    return
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    mesh = jax.sharding.AbstractMesh((1,), ("lowering",),
                                     axis_types=(jax.sharding.AxisType.Auto,))
  try:
    mesh = mesh.update(abstract_device=device_cls(**H100))
  except TypeError:   # an AbstractMesh without abstract_device
    yield
    return
  with jax.sharding.use_abstract_mesh(mesh):
    yield


def export(fn, platform: str, *args, custom_calls=()) -> jax.export.Exported:
  """fn jitted and lowered for `platform` (args: ShapeDtypeStructs or pytrees of
  them), allowing the platform's kernel call and `custom_calls`."""
  allowed = (PLATFORMS[platform][1], *custom_calls)
  with lowering_device(platform):
    return jax.export.export(
        jax.jit(fn), platforms=[platform],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(c) for c in allowed])(*args)


def kernel_calls(exported: jax.export.Exported, platform: str) -> dict[str, int]:
  """Calls of the platform's kernels in the lowered module, per kernel name.

  Each custom call is one line of the module's text and carries its pallas_call
  name once (`name = "..."` in Triton's backend config, `kernel_name = "..."` on
  Mosaic's call)."""
  custom_call = PLATFORMS[platform][1]
  counts = collections.Counter()
  for line in exported.mlir_module().splitlines():
    if f"stablehlo.custom_call @{custom_call}(" in line:
      names = re.findall(r'name = "([^"]+)"', line)
      assert len(names) == 1, f"a {custom_call} call without one kernel name: {names}"
      counts[names[0]] += 1
  return dict(counts)


def collectives(exported: jax.export.Exported) -> dict[str, int]:
  """Token-exchanging collectives in the lowered module, per op (ragged_all_to_all
  lowers to a custom call of that name)."""
  text = exported.mlir_module()
  ops = re.findall(r"\bstablehlo\.(all_to_all|all_gather|reduce_scatter)\b", text)
  ops += re.findall(r"\bstablehlo\.custom_call @(ragged_all_to_all)\(", text)
  return dict(collections.Counter(ops))


def expected(platform: str, gmm: int = 0, tgmm: int = 0, combine: int = 0) -> dict[str, int]:
  """Kernel calls per name from counts per kind; combine has no kernel on `tpu`."""
  kinds = {"gmm": gmm, "tgmm": tgmm, "combine": combine if platform == "cuda" else 0}
  return {KERNEL_NAMES[platform][kind]: n for kind, n in kinds.items() if n}


def settings(platform: str) -> pk.KernelSettings:
  """The platform's kernels compiled, not interpreted, at their default tiles."""
  return pk.KernelSettings(target=PLATFORMS[platform][0], interpret=False)


def spec(shape, dtype) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))


# ----------------------------------------------------------------------------
# Every kernel entry point, forward and forward + backward.
#
# Kernel calls per entry point, from ops.py. Forward: one gmm, in every mode and on
# both targets (with row_index, mosaic gathers the rows in XLA first). The gmm
# backward (_gmm_bwd) adds
#   d lhs  one gmm of the cotangent with rhs transposed (untransposed when the
#          forward was transposed), and with row_index one combine summing the
#          d rows per token (a kernel on triton, an XLA segment_sum on mosaic);
#   d rhs  one tgmm (rows gathered in the kernel on triton, by XLA on mosaic).
# Forward + backward (jax.value_and_grad over lhs and rhs), triton | mosaic:
#   plain, transposed, local   gmm 1 + 1 = 2, tgmm 1                  | the same
#   gather                     gmm 1 + 1 = 2, tgmm 1, combine 1 (= 4) | gmm 2, tgmm 1 (= 3)
GMM_MODES = {   # mode: (row gather, transposed rhs, local groups at an offset)
    "plain": (False, False, False), "gather": (True, False, False),
    "transposed": (False, True, False), "local": (False, False, True),
}
FORWARD = {mode: dict(gmm=1) for mode in GMM_MODES}
TRAIN = {mode: dict(gmm=2, tgmm=1, combine=1 if mode == "gather" else 0) for mode in GMM_MODES}
DTYPES = ["float32", "bfloat16"]


def _gmm_operands(mode: str, dtype):
  gathered, transposed, local = GMM_MODES[mode]
  groups = LOCAL if local else GROUPS
  lhs = spec((TOKENS if gathered else ROWS, DIM_K), dtype)
  rhs = spec((groups, DIM_N, DIM_K) if transposed else (groups, DIM_K, DIM_N), dtype)
  rest = (spec((GROUPS,), jnp.int32), spec((), jnp.int32), spec((ROWS,), jnp.int32),
          spec((ROWS, DIM_N), jnp.float32))   # group_sizes, offset, row_index, cotangent
  return lhs, rhs, rest


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", list(GMM_MODES))
@pytest.mark.parametrize("platform", list(PLATFORMS))
def test_gmm_lowers(platform, mode, dtype):
  gathered, transposed, local = GMM_MODES[mode]
  s = settings(platform)

  def forward(lhs, rhs, sizes, offset, row_index):
    return pk.gmm(lhs, rhs, sizes, offset if local else 0,
                  row_index=row_index if gathered else None, transpose_rhs=transposed,
                  settings=s)

  def train(lhs, rhs, sizes, offset, row_index, cot):
    def loss(lhs, rhs):
      out = forward(lhs, rhs, sizes, offset, row_index)
      return jnp.sum(out.astype(jnp.float32) * cot), out
    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(lhs, rhs)

  lhs, rhs, (sizes, offset, row_index, cot) = _gmm_operands(mode, dtype)
  got = kernel_calls(export(forward, platform, lhs, rhs, sizes, offset, row_index), platform)
  assert got == expected(platform, **FORWARD[mode]), "forward"
  got = kernel_calls(export(train, platform, lhs, rhs, sizes, offset, row_index, cot),
                     platform)
  assert got == expected(platform, **TRAIN[mode]), "forward + backward"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gathered", [False, True], ids=["plain", "gather_local"])
@pytest.mark.parametrize("platform", list(PLATFORMS))
def test_tgmm_lowers(platform, gathered, dtype):
  """tgmm has no VJP of its own (it is gmm's weight gradient): one tgmm call, over all
  groups, or over LOCAL groups at an offset with rows gathered by row_index."""
  s = settings(platform)

  def weight_grad(lhs, grad, sizes, offset, row_index):
    if gathered:
      return pk.tgmm(lhs, grad, sizes, offset, num_local=LOCAL, row_index=row_index,
                     settings=s)
    return pk.tgmm(lhs, grad, sizes, settings=s)

  args = (spec((TOKENS if gathered else ROWS, DIM_K), dtype), spec((ROWS, DIM_N), dtype),
          spec((GROUPS,), jnp.int32), spec((), jnp.int32), spec((ROWS,), jnp.int32))
  got = kernel_calls(export(weight_grad, platform, *args), platform)
  assert got == expected(platform, tgmm=1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("platform", list(PLATFORMS))
def test_combine_lowers(platform, dtype):
  """Forward: one combine kernel on triton, an XLA segment_sum on mosaic (no kernel).
  Backward (_combine_bwd): d rows and d weight are XLA gathers and products, so
  forward + backward is still 1 | 0."""
  s = settings(platform)

  def forward(rows, row_index, weight):
    return pk.combine(rows, row_index, weight, TOKENS, settings=s)

  def train(rows, row_index, weight, cot):
    def loss(rows, weight):
      y = forward(rows, row_index, weight)
      return jnp.sum(y.astype(jnp.float32) * cot), y
    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(rows, weight)

  args = (spec((ROWS, DIM_K), dtype), spec((ROWS,), jnp.int32), spec((ROWS,), jnp.float32))
  assert kernel_calls(export(forward, platform, *args), platform) == expected(
      platform, combine=1), "forward"
  got = kernel_calls(export(train, platform, *args, spec((TOKENS, DIM_K), jnp.float32)),
                     platform)
  assert got == expected(platform, combine=1), "forward + backward"


# ----------------------------------------------------------------------------
# The MoE layer, alone and expert-parallel.
#
# A GLU expert FFN on the sorted engine with backend `pallas` (dispatch/gmm.py):
#   forward   gather_gmm of x by W_gate and by W_up: 2 gmm with row_index;
#             gmm_scatter by W_o: 1 gmm, then 1 combine    = 3 gmm, 1 combine
#   backward  each gmm with row_index (x2): 1 gmm (d rows), 1 combine (d x), 1 tgmm;
#             the W_o gmm: 1 gmm, 1 tgmm; the combine: XLA = 3 gmm, 3 tgmm, 2 combine
#   total     triton 6 gmm + 3 tgmm + 3 combine = 12; mosaic (combines in XLA)
#             6 gmm + 3 tgmm = 9
# The gradient is taken with respect to x as well as the parameters, as in a model
# (x is the residual stream): without d x, the d rows gmm and the combine of both
# gathered products are dead code, and 4 triton calls (2 mosaic) fewer are lowered.
# Under expert parallelism each device runs the same engine on the rows it
# receives, inside shard_map: the same calls, once in the per-device program.
LAYER = dict(gmm=6, tgmm=3, combine=3)
B, L, D, E, F = 4, 32, 256, 8, 512


def _layer_and_variables(platform, dtype, expert_parallel=None):
  layer = MoE(num_experts=E, top_k=2, hidden_dim=F, backend="pallas",
              kernel_settings=settings(platform), dtype=jnp.dtype(dtype),
              deterministic=True, expert_parallel=expert_parallel)
  variables = jax.eval_shape(layer.clone(expert_parallel=None).init, jax.random.PRNGKey(0),
                             jnp.zeros((B, L, D), dtype))
  return layer, variables


def _train(layer):
  def loss(variables, x):
    y, aux = layer.apply(variables, x)
    return jnp.sum(y.astype(jnp.float32)) + aux.loss
  return jax.value_and_grad(loss, argnums=(0, 1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("platform", list(PLATFORMS))
def test_layer_lowers(platform, dtype):
  layer, variables = _layer_and_variables(platform, dtype)
  exported = export(_train(layer), platform, variables, spec((B, L, D), dtype))
  assert kernel_calls(exported, platform) == expected(platform, **LAYER)


# Expert parallelism, per exchange (moejax/parallel/exchange.py, expert_parallel.py):
#   fixed   all_to_all: forward rows, their local experts, their validity and the
#           outputs back = 4; backward the transposes for rows and outputs = 2 -> 6
#   ragged  ragged_all_to_all: forward rows, local experts, outputs back = 3;
#           backward rows and outputs = 2 -> 5. JAX's transpose of each of those two
#           exchanges its offsets with 2 all_to_all -> 4; all_gather: the [n] send
#           counts of the devices -> 1
#   gather  all_gather: forward x, token, expert, valid, weight = 5; backward the
#           transpose of the reduce-scatter = 1 -> 6. reduce_scatter: forward y = 1;
#           backward the transposes of x's and weight's gathers = 2 -> 3
EXCHANGES = {   # way: (ExpertParallel, collectives)
    "fixed": (ExpertParallel("all_to_all", transport="fixed"), {"all_to_all": 6}),
    "ragged": (ExpertParallel("all_to_all", transport="ragged"),
               {"ragged_all_to_all": 5, "all_to_all": 4, "all_gather": 1}),
    "gather": (ExpertParallel("all_gather"), {"all_gather": 6, "reduce_scatter": 3}),
}


@pytest.mark.parametrize("way", list(EXCHANGES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("platform", list(PLATFORMS))
def test_expert_parallel_layer_lowers(platform, dtype, way, monkeypatch):
  """On the 8 simulated devices, mesh data 2 x expert 4: jax.set_mesh gives shard_map
  its mesh and the export its 8 devices; lowering_device swaps only the abstract
  device. `ragged` lowers jax.lax.ragged_all_to_all, as on GPU and TPU (where the
  `auto` transport picks it), in place of the all_to_all emulation of CPU."""
  ep, want_collectives = EXCHANGES[way]
  monkeypatch.setattr(exchange, "has_ragged_all_to_all", lambda: True)
  layer, variables = _layer_and_variables(platform, dtype, ep)
  with jax.set_mesh(make_mesh(data=2, expert=4)):
    exported = export(_train(layer), platform, variables, spec((B, L, D), dtype),
                      custom_calls=("ragged_all_to_all",))
  assert exported.nr_devices == 8
  assert kernel_calls(exported, platform) == expected(platform, **LAYER)
  assert collectives(exported) == want_collectives

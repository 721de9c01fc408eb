"""From an experiment config to the objects the trainer runs, checked at start-up.

The config (an ml_collections ConfigDict, see configs/lm_tiny.py) has sections
`data`, `model`, `moe`, `train`, `mesh` and a `seed`. `check(config)` validates
every value that can be checked before data or compilation and raises ValueError
naming the field (`train.batch_size`, `moe.top_k`, ...).

MoE settings: the fields of `config.moe` are the MoE layer's attributes
(MOE_FIELDS, read off moejax.MoE itself), except that the router's own settings
live in a sub-section named after the router, e.g. `config.moe.topk.score` (only
the chosen router's section is used), and `expert_parallel` and
`kernel_settings` are sections turned into their objects. Loss weights left None
take the chosen router's defaults; MoE validates them (MoE.loss_weights).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp

from moejax import routers, validation
from moejax.data.pipeline import PipelineSpec, check_shards
from moejax.layer import MoE
from moejax.models import TransformerLM
from moejax.parallel import BATCH_AXES, ExpertParallel, make_mesh, sharded

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# MoE attributes the model and the train step set (dtypes, the model dimension,
# the tuple return, the rng streams, training or decoding) or that are not config
# values (linen's parent and name, initializers; router_kwargs come from the
# router section).
_MOE_SET_ELSEWHERE = ("parent", "name", "router_kwargs", "model_dim", "dtype",
                      "param_dtype", "deterministic", "decode", "aux", "rng_name",
                      "dropout_rng_name", "kernel_init", "bias_init", "expert_pool",
                      "pool_layers", "pool_position")
MOE_FIELDS = tuple(f.name for f in dataclasses.fields(MoE)
                   if f.name not in _MOE_SET_ELSEWHERE)
TILING_PASSES = ("forward", "lhs_grad", "rhs_grad")
# ExpertParallel's mesh axis names: the trainer's mesh is moejax's own.
MESH_NAMES = ("batch_axes", "expert_axis", "model_axis")


def config_from_file(path: str, sibling_of: Optional[str] = None):
  """get_config() of a config file; `sibling_of` resolves `path` next to that file.

  `file.py:arg` calls get_config("arg"), as ml_collections' --config flag does.
  """
  path, _, arg = path.partition(":")
  if sibling_of is not None:
    path = os.path.join(os.path.dirname(os.path.abspath(sibling_of)), path)
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f"moejax_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _plain(value: Any) -> Any:
  """ConfigDicts (and FrozenConfigDicts) to plain dicts, recursively."""
  if hasattr(value, "to_dict"):
    return {k: _plain(v) for k, v in value.to_dict().items()}
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  return value


def moe_settings(config) -> Optional[dict[str, Any]]:
  """MoE layer kwargs from config.moe, or None for a dense model (model.moe_every 0)."""
  if config.model.moe_every == 0:
    return None
  moe = _plain(config.moe)
  kwargs = {k: moe[k] for k in MOE_FIELDS if k in moe}
  unknown = sorted(set(moe) - set(MOE_FIELDS) - set(routers.names()))
  if unknown:
    raise ValueError(f"moe has unknown fields {unknown}; MoE fields: {list(MOE_FIELDS)}, "
                     f"router sections: {routers.names()}")
  if "expert_parallel" in kwargs:
    kwargs["expert_parallel"] = expert_parallel(kwargs["expert_parallel"])
  if "kernel_settings" in kwargs:
    kwargs["kernel_settings"] = kernel_settings(kwargs["kernel_settings"])
  kwargs["router_kwargs"] = moe.get(kwargs.get("router", "topk"), {}) or {}
  kwargs["router_kwargs"] = {k: v for k, v in kwargs["router_kwargs"].items() if v is not None}
  return kwargs


def expert_parallel_section():
  """config.moe.expert_parallel at its defaults: off (dispatch 'none')."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from ml_collections import config_dict  # pylint: disable=g-import-not-at-top
  fields = {f.name: f.default for f in dataclasses.fields(ExpertParallel)
            if f.name not in MESH_NAMES}
  fields["dispatch"] = "none"
  fields["capacity_factor"] = config_dict.placeholder(float)
  return ml_collections.ConfigDict(fields)


def expert_parallel(section: Optional[dict[str, Any]]) -> Optional[ExpertParallel]:
  """ExpertParallel from config.moe.expert_parallel; None when dispatch is 'none'."""
  if not section or section.get("dispatch", "none") == "none":
    return None
  known = {f.name for f in dataclasses.fields(ExpertParallel)} - set(MESH_NAMES)
  unknown = sorted(set(section) - known)
  if unknown:
    raise ValueError(f"moe.expert_parallel has unknown fields {unknown}; fields: "
                     f"{sorted(known)}")
  return ExpertParallel(**section)


def router_sections(exclude: tuple[str, ...] = ()) -> dict[str, Any]:
  """{router: ConfigDict of its settings at their defaults} for every registered
  router, so that any of them can be chosen and tuned from the command line
  (--config.moe.router=relu --config.moe.relu.target_sparsity=0.9)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from ml_collections import config_dict  # pylint: disable=g-import-not-at-top
  sections = {}
  for name in routers.names():
    if name in exclude:
      continue
    section = {}
    for field in dataclasses.fields(routers.get(name)):
      if (field.name in ("num_experts", "top_k", "parent", "name", "rng_name")
          or callable(field.default)):
        continue
      if field.default is None:
        kind = float if "float" in str(field.type) else int
        section[field.name] = config_dict.placeholder(kind)
      else:
        section[field.name] = field.default
    sections[name] = ml_collections.ConfigDict(section)
  return sections


def kernel_settings_section():
  """config.moe.kernel_settings at its defaults: the platform's (None everywhere).

  target (triton/mosaic), interpret, num_warps, num_stages; tiling.<pass> as
  (block_m, block_k, block_n) for the forward, lhs_grad and rhs_grad passes (a
  pass left None keeps the target's default tiles); combine_tiles as (block_t,
  block_s, block_d)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from ml_collections import config_dict  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict(dict(
      target=config_dict.placeholder(str), interpret=config_dict.placeholder(bool),
      num_warps=config_dict.placeholder(int), num_stages=config_dict.placeholder(int),
      tiling=ml_collections.ConfigDict({p: config_dict.placeholder(tuple)
                                        for p in TILING_PASSES}),
      combine_tiles=config_dict.placeholder(tuple)))


def kernel_settings(section: Optional[dict[str, Any]]):
  """pallas_kernels.KernelSettings from config.moe.kernel_settings; None when nothing
  is set (the platform's defaults). Errors name moe.kernel_settings.<field>."""
  section = {k: v for k, v in (section or {}).items() if v is not None}
  tiling = {k: v for k, v in (section.pop("tiling", None) or {}).items() if v is not None}
  if not section and not tiling:
    return None
  import pallas_kernels  # pylint: disable=g-import-not-at-top
  known = {"target", "interpret", "num_warps", "num_stages", "combine_tiles"}
  unknown = sorted(set(section) - known) + sorted(set(tiling) - set(TILING_PASSES))
  if unknown:
    raise ValueError(f"moe.kernel_settings has unknown fields {unknown}; fields: "
                     f"{sorted(known | {'tiling'})}, tiling: {list(TILING_PASSES)}")
  try:
    if tiling:
      target = section.get("target") or pallas_kernels.default_target()
      default = pallas_kernels.DEFAULT_TILING[target]
      section["tiling"] = pallas_kernels.GmmTiling(**{
          p: (pallas_kernels.Tiles(*tiling[p]) if p in tiling else getattr(default, p))
          for p in TILING_PASSES})
    if "combine_tiles" in section:
      section["combine_tiles"] = pallas_kernels.CombineTiles(*section["combine_tiles"])
    return pallas_kernels.KernelSettings(**section)
  except (TypeError, ValueError) as e:
    raise ValueError(f"moe.kernel_settings.{e}") from None


def build_model(config) -> TransformerLM:
  """The TransformerLM of config.model and config.moe (validated on construction)."""
  m = config.model
  validation.one_of("model.dtype", m.dtype, tuple(DTYPES))
  if m.moe_every != 0:
    validation.positive_int("model.moe_every", m.moe_every)
  try:
    return TransformerLM(
        vocab_size=vocab_size(config), num_layers=m.num_layers, model_dim=m.model_dim,
        num_heads=m.num_heads, head_dim=m.get("head_dim"), mlp_dim=m.mlp_dim,
        moe=moe_settings(config), moe_every=max(m.moe_every, 1),
        expert_type=m.expert_type, activation=m.activation,
        tie_embeddings=m.tie_embeddings, dtype=DTYPES[m.dtype],
        expert_reuse=m.get("expert_reuse", 1), parent=None)
  except ValueError as e:
    raise ValueError(_config_path(str(e), config)) from None


def _config_path(message: str, config) -> str:
  """Prefixes a module's error with the config section of its field: `model.`,
  `moe.`, or `moe.<router>.` for the router's own settings."""
  if message.startswith(("model.", "moe.")):
    return message
  if not config.model.moe_every:
    return f"model.{message}"
  router = config.moe.get("router", "topk")
  section = config.moe.get(router)
  field = message.split(" ", 1)[0]
  if section is not None and field in section:
    return f"moe.{router}.{message}"
  return f"moe.{message}"


def vocab_size(config) -> int:
  return tokenizer(config).vocab_size


def tokenizer(config):
  from moejax.data import tokenizer as make_tokenizer  # pylint: disable=g-import-not-at-top
  return make_tokenizer(config.data.tokenizer, config.data.get("tokenizer_model") or None)


def mesh_shape(config, num_devices: Optional[int] = None) -> tuple[int, int, int]:
  """(data, expert, model); data = -1 takes the devices left over."""
  num_devices = jax.device_count() if num_devices is None else num_devices
  data, expert, model = config.mesh.data, config.mesh.expert, config.mesh.model
  validation.positive_int("mesh.expert", expert)
  validation.positive_int("mesh.model", model)
  if data == -1:
    if num_devices % (expert * model):
      raise ValueError(f"mesh.expert * mesh.model = {expert * model} does not divide the "
                       f"{num_devices} devices")
    data = num_devices // (expert * model)
  validation.positive_int("mesh.data", data)
  if data * expert * model != num_devices:
    raise ValueError(f"mesh.data*expert*model = {data * expert * model}, but there are "
                     f"{num_devices} devices")
  return data, expert, model


def pipeline_spec(config, split: str, training: bool) -> PipelineSpec:
  """The global batches of `split`: train.batch_size rows (shuffled, repeated) in
  training, else train.eval_batch_size rows (one ordered pass)."""
  d, t = config.data, config.train
  return PipelineSpec(
      name=d.name, data_dir=d.data_dir, split=split, seq_len=d.seq_len,
      batch_size=t.batch_size if training else t.eval_batch_size,
      seed=config.seed, shuffle=training, text_key=d.text_key,
      domain_key=d.get("domain_key") or None, input_shards=d.input_shards)


def check_process_rows(mesh, rows: int) -> None:
  """Raises ValueError unless this process's devices hold rows [p·B/n, (p+1)·B/n)
  of a batch of B = `rows` split over the mesh's batch axes: the rows of its input
  shards, which jax.make_array_from_process_local_data fills from its batch."""
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
  sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
  held = set()
  for index in sharding.addressable_devices_indices_map((rows,)).values():
    held.update(range(*index[0].indices(rows)))
  n, p = jax.process_count(), jax.process_index()
  start, stop = p * rows // n, (p + 1) * rows // n
  if held != set(range(start, stop)):
    raise ValueError(f"mesh: the devices of process {p} of {n} hold batch rows "
                     f"{sorted(held)}, not rows [{start}, {stop}) of its input shards; "
                     "mesh.model must stay within a process")


def check(config, num_devices: Optional[int] = None,
          num_processes: Optional[int] = None) -> None:
  """Validates the config for `num_devices` devices over `num_processes` processes
  (default: this job's); raises ValueError naming the first bad field."""
  validation.positive_int("seed", config.seed, minimum=0)
  d, t = config.data, config.train
  if not d.name:
    raise ValueError("data.name must name a TFDS dataset")
  validation.positive_int("data.seq_len", d.seq_len)
  validation.one_of("data.tokenizer", d.tokenizer, ("byte", "sentencepiece"))
  for field in ("batch_size", "eval_batch_size", "num_microbatches", "steps", "log_every",
                "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints"):
    validation.positive_int(f"train.{field}", t[field])
  validation.positive_int("train.warmup_steps", t.warmup_steps, minimum=0)
  validation.positive_int("train.probe_every", t.get("probe_every", 0), minimum=0)
  validation.in_range("train.learning_rate", t.learning_rate, 0, 10, low_open=True)
  validation.in_range("train.weight_decay", t.weight_decay, 0, 10)
  validation.in_range("train.grad_clip", t.grad_clip, 0, float("inf"), low_open=True)
  if t.batch_size % t.num_microbatches:
    raise ValueError(f"train.num_microbatches ({t.num_microbatches}) must divide "
                     f"train.batch_size ({t.batch_size})")
  data, expert, model_axis = mesh_shape(config, num_devices)
  data_parallel = data * expert
  micro = t.batch_size // t.num_microbatches
  if micro % data_parallel:
    raise ValueError(f"train.batch_size / train.num_microbatches = {micro} rows must divide "
                     f"over mesh.data * mesh.expert = {data_parallel} devices")
  if t.eval_batch_size % data_parallel:
    raise ValueError(f"train.eval_batch_size ({t.eval_batch_size}) must divide over "
                     f"mesh.data * mesh.expert = {data_parallel} devices")
  num_processes = jax.process_count() if num_processes is None else num_processes
  check_shards(d.input_shards, t.batch_size, num_processes, "train.batch_size")
  check_shards(d.input_shards, t.eval_batch_size, num_processes, "train.eval_batch_size")
  if num_devices is None:
    check_process_rows(make_mesh(data, expert, model_axis), t.batch_size)
  model = build_model(config)
  layer = model.moe
  if layer is not None and layer.expert_parallel is not None:
    try:
      sharded.check_sizes({"data": data, "expert": expert, "model": model_axis},
                          micro * d.seq_len, layer.routed_experts * model.expert_reuse,
                          layer.expert_hidden_dim)
    except ValueError as e:
      raise ValueError(f"moe.{e}") from None

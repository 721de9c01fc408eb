"""Start-up checks of a workdir, before any data or model work, and its config.json.

  check_workdir(workdir)       a directory we can create files in (WorkdirError)
  check_run(config, workdir)   the config fits the workdir's checkpoints (ConfigError)
                               and its disk has room for them (WorkdirError)
  save_config(config, workdir, resumed)   <workdir>/config.json, written atomically

Fields that decide the state's shapes: a field of model.*, moe.* (router sections
included) or data.* whose value in config.json gives the train state (parameters,
optimizer state, `routing` collection) other shapes or dtypes than the new value,
found with jax.eval_shape of the state's initialisation (no data, no compilation).
So model.num_layers, model.model_dim, moe.num_experts, moe.hidden_dim,
moe.granularity, moe.num_shared_experts, moe.topk.aux_free (adds the `routing`
bias), moe.null_experts.num_null (widens the router) or data.tokenizer stop a
resume, while moe.engine, moe.backend, loss weights, capacity, data.seq_len or
data.name do not. Workdirs without config.json are checked against the
checkpoint's stored shapes when it is restored (moejax.train.checkpoints).

Disk room: a checkpoint holds every array of the train state, at most its
in-memory size (orbax compresses the arrays), and during a save the new checkpoint
is written before the oldest of train.keep_checkpoints is deleted. A run needs
state bytes x (keep + 1 - checkpoints already there, at most keep) free.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.train import setup
from moejax.train.checkpoints import flat_shapes, saved_steps
from moejax.train.errors import ConfigError, WorkdirError
from moejax.train.state import initializer, make_optimizer

CONFIG_FILE = "config.json"
SHAPE_SECTIONS = ("model", "moe", "data")


def check_workdir(workdir: str) -> None:
  """Raises WorkdirError unless `workdir` is (or can be made) a directory in which
  this process can create a file; probes by creating and deleting one."""
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(f"workdir {path} is a file, not a directory; give a directory "
                       "(existing or new) as --workdir")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"workdir {path} cannot be created: {_os_reason(e, path)}") from None
  checkpoints = os.path.join(path, "checkpoints")
  if os.path.exists(checkpoints) and not os.path.isdir(checkpoints):
    raise WorkdirError(f"workdir {path} holds a file named checkpoints where the "
                       "checkpoint directory goes; move it or give another workdir")
  probe = os.path.join(path, f".write_probe_{os.getpid()}_{jax.process_index()}")
  try:
    with open(probe, "wb") as f:
      f.write(b"0")
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(f"workdir {path} is not writable ({e.strerror or e}: a test file "
                       "could not be created there); give a writable directory") from None


def _os_reason(error: OSError, path: str) -> str:
  """The short reason of a failed makedirs, naming a file that stands in the path."""
  parent = path
  while parent and not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if parent and not os.path.isdir(parent):
    return f"{parent} is a file"
  return error.strerror or str(error)


def state_shapes(config) -> dict[str, tuple[tuple[int, ...], str]]:
  """{path: (shape, dtype)} of the train state of `config`, as the trainer's
  init_state builds it, from jax.eval_shape (no arrays are allocated)."""
  t = config.train
  tx = make_optimizer(t.learning_rate, t.warmup_steps, t.steps, t.weight_decay, t.grad_clip)
  init = initializer(setup.build_model(config), tx, t.batch_size // t.num_microbatches,
                     config.data.seq_len)
  return flat_shapes(nn.meta.unbox(jax.eval_shape(init, jax.random.PRNGKey(0))))


def state_bytes(shapes: dict[str, tuple[tuple[int, ...], str]]) -> int:
  """Bytes of the arrays of state_shapes, as they are held in memory."""
  total = 0
  for shape, dtype in shapes.values():
    count = 1
    for n in shape:
      count *= n
    total += count * jnp.dtype(dtype).itemsize
  return total


def format_bytes(n: float) -> str:
  """Decimal units: 497676 -> '497.7 kB'."""
  if n < 1000:
    return f"{n:.0f} B"
  for unit in ("kB", "MB", "GB"):
    n /= 1000
    if n < 999.95:
      return f"{n:.1f} {unit}"
  return f"{n / 1000:.1f} TB"


def check_disk(workdir: str, shapes: dict, keep: int) -> None:
  """Raises WorkdirError when the workdir's disk has less free space than the
  checkpoints still to be written need (see the module docstring)."""
  path = os.path.abspath(workdir)
  per_checkpoint = state_bytes(shapes)
  present = min(len(saved_steps(os.path.join(path, "checkpoints"))), keep)
  count = keep + 1 - present
  need = per_checkpoint * count
  free = shutil.disk_usage(path).free
  if free < need:
    raise WorkdirError(
        f"workdir {path} has {format_bytes(free)} free on its disk, but the checkpoints need "
        f"about {format_bytes(need)} more ({count} x {format_bytes(per_checkpoint)}: "
        f"train.keep_checkpoints={keep}, one more while saving, {present} there already); "
        "free space or give a workdir on another disk")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """{dotted key: value} of the leaves of nested dicts."""
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flatten(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: tree}


def _plain(config) -> dict[str, Any]:
  """The config as JSON values (what config.json holds)."""
  return json.loads(json.dumps(config.to_dict(), default=str))


def read_config(workdir: str) -> Optional[dict[str, Any]]:
  """<workdir>/config.json, or None where there is none."""
  path = os.path.join(os.path.abspath(workdir), CONFIG_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise WorkdirError(f"{path} cannot be read ({e}); restore it or delete it (the "
                       "checkpoints' shapes are then checked instead)") from None


def _with_values(config, values: dict[str, Any]):
  """A copy of `config` with the dotted fields set to `values` (TypeError or
  KeyError where a field cannot take its value)."""
  changed = copy.deepcopy(config)
  for key, value in values.items():
    node = changed
    *parents, leaf = key.split(".")
    for parent in parents:
      node = node[parent]
    if leaf not in node:
      raise KeyError(key)
    node[leaf] = value
  return changed


def _shapes_with(config, values: dict[str, Any]) -> Optional[dict]:
  """state_shapes of `config` with `values` set, or None where that config
  cannot be built."""
  try:
    return state_shapes(_with_values(config, values))
  except (KeyError, TypeError, ValueError, AttributeError):
    return None


def shape_fields(config, saved: dict[str, Any], shapes: dict) -> list[tuple[str, Any, Any]]:
  """(field, saved value, new value) for the fields of model.*, moe.*, data.* whose
  saved value gives the state other shapes than `shapes` (those of `config`)."""
  new = _flatten(_plain(config))
  old = _flatten(saved)
  differing = sorted(k for k in new if k.split(".")[0] in SHAPE_SECTIONS
                     and k in old and old[k] != new[k])
  if not differing:
    return []
  before = _shapes_with(config, {k: old[k] for k in differing})
  if before is None or before == shapes:
    return []
  culprits = [k for k in differing if _shapes_with(config, {k: old[k]}) not in (None, shapes)]
  return [(k, old[k], new[k]) for k in (culprits or differing)]


def check_config(config, workdir: str, shapes: dict) -> None:
  """Raises ConfigError when the workdir has checkpoints and its config.json has
  other values of fields that decide the state's shapes."""
  path = os.path.abspath(workdir)
  if not saved_steps(os.path.join(path, "checkpoints")):
    return
  saved = read_config(path)
  if saved is None:
    return
  fields = shape_fields(config, saved, shapes)
  if fields:
    changes = ", ".join(f"{k} {old!r} -> {new!r}" for k, old, new in fields)
    raise ConfigError(
        f"the config does not fit the checkpoints in {path}: {changes} "
        f"(the state's shapes change); use a new workdir, or the config saved in "
        f"{os.path.join(path, CONFIG_FILE)}")


def check_run(config, workdir: str) -> None:
  """The checks that need the state's shapes: config against config.json, then
  room for the checkpoints."""
  shapes = state_shapes(config)
  check_config(config, workdir, shapes)
  check_disk(workdir, shapes, config.train.keep_checkpoints)


def save_config(config, workdir: str, resumed: bool) -> None:
  """Writes <workdir>/config.json (process 0, atomically: a temporary file renamed)
  when the run starts from scratch, or resumes a workdir that has none."""
  path = os.path.join(os.path.abspath(workdir), CONFIG_FILE)
  if jax.process_index() != 0 or (resumed and os.path.exists(path)):
    return
  temporary = f"{path}.tmp{os.getpid()}"
  with open(temporary, "w", encoding="utf-8") as f:
    json.dump(_plain(config), f, indent=2, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(temporary, path)

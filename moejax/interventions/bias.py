"""The intervention bias: per-layer biases delta_l on a trained model's router logits.

Every router that takes it (routers/base.py, `takes_logit_bias`) adds delta to its
selection logits at apply time, read from the variable collection `logit_bias`:

  z'_t = z_t + delta_l        delta_l [E'] (every token) or [B, E'] (per sequence)

E' is the width of the router's logits: E, the pool's r E with expert reuse, or
E + N with null experts. The collection mirrors the model's module tree
({"block_<i>": {"moe": {"router": {"delta": ...}}}}); this module builds it
from per-layer deltas keyed like the model's aux ("layer_<i>"), so a caller
never spells a module path. A layer with several routers (a chain) gives each
the layer's delta. `params` are never read or written here; with a zero delta
the model's outputs are those of the plain model.

  zeros(model, variables, tokens)           the collection, every delta 0 [E']
  widths(collection)                        {"layer_<i>": E'}
  to_collection(zero, deltas)               the collection holding `deltas`
  with_bias(variables, collection)          variables to apply the model with
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Optional

import flax
import jax
import jax.numpy as jnp

from moejax.core import layer_key
from moejax.routers.base import LOGIT_BIAS

Array = jax.Array
_BLOCK = re.compile(r"block_(\d+)$")


def check_model(model) -> None:
  """ValueError unless `model` (a TransformerLM) has MoE layers whose router has
  logits to bias."""
  if getattr(model, "moe", None) is None:
    raise ValueError("model: a dense model has no routers to intervene on")
  spec = model.moe.router_spec
  if not spec.takes_logit_bias:
    raise ValueError(f"router {spec.router_name!r} has no logits to bias (it routes by a "
                     "fixed rule); interventions need a router with logits")


def zeros(model, variables: Mapping[str, Any], tokens: Array) -> dict:
  """The `logit_bias` collection of `model` with every delta zero [E'], found by
  one forward pass of tokens [B, L] with the collection mutable."""
  check_model(model)
  plain = {k: v for k, v in variables.items() if k != LOGIT_BIAS}
  _, state = jax.eval_shape(
      lambda v, t: model.apply(v, t, deterministic=True, mutable=[LOGIT_BIAS]), plain, tokens)
  collection = state.get(LOGIT_BIAS, {})
  if not collection:
    raise ValueError("model: no router took a logit bias in a forward pass")
  return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                flax.core.unfreeze(collection))


def _layer_of(path: tuple[str, ...]) -> str:
  match = _BLOCK.match(path[0])
  if match is None:
    raise ValueError(f"logit bias at {'/'.join(path)} is not inside a block_<i> of a "
                     "TransformerLM")
  return layer_key(int(match.group(1)))


def _leaves(collection: Mapping) -> dict[tuple[str, ...], Array]:
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(collection))
  return {path: value for path, value in flat.items() if path[-1] == "delta"}


def widths(collection: Mapping) -> dict[str, int]:
  """{"layer_<i>": E'}: each MoE layer's logit width, in layer order."""
  out: dict[str, int] = {}
  for path, value in _leaves(collection).items():
    out[_layer_of(path)] = int(value.shape[-1])
  return dict(sorted(out.items(), key=lambda kv: int(kv[0].split("_")[-1])))


def to_collection(zero: Mapping, deltas: Mapping[str, Array],
                  name: str = "deltas") -> dict:
  """The collection `zero` (from zeros()) with layer l's routers holding
  deltas["layer_<l>"], [E'] or [B, E']; layers not named keep zero. Errors name
  `name` and the layer."""
  width = widths(zero)
  for layer, delta in deltas.items():
    if layer not in width:
      raise ValueError(f"{name}[{layer!r}]: no such MoE layer; the model's are "
                       f"{', '.join(width)}")
    shape = tuple(jnp.shape(delta))
    if len(shape) not in (1, 2) or shape[-1] != width[layer]:
      raise ValueError(f"{name}[{layer!r}] has shape {shape}; the router of {layer} has "
                       f"{width[layer]} logits, so it takes [{width[layer]}] or "
                       f"[B, {width[layer]}]")
  flat = {}
  for path, value in _leaves(zero).items():
    layer = _layer_of(path)
    flat[path] = (jnp.asarray(deltas[layer], jnp.float32) if layer in deltas else value)
  return flax.traverse_util.unflatten_dict(flat)


def with_bias(variables: Mapping[str, Any], collection: Optional[Mapping]) -> dict:
  """`variables` with the `logit_bias` collection set (or removed, for None)."""
  out = {k: v for k, v in variables.items() if k != LOGIT_BIAS}
  if collection is not None:
    out[LOGIT_BIAS] = collection
  return out


def layer_deltas(collection: Mapping) -> dict[str, Array]:
  """{"layer_<i>": delta}: each layer's delta read back (its first router's)."""
  out: dict[str, Array] = {}
  for path, value in _leaves(collection).items():
    out.setdefault(_layer_of(path), value)
  return out

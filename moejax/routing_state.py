"""Router state in any model: find its MoE layers, update their `routing` state.

Routers with state that is not a parameter (the aux-free bias and its step
counts, ReLU routing's L1 coefficient) keep it in the `routing` collection,
which `init` returns beside `params` when such a router is used. A training step
carries it: apply with mutable=["routing"] (plus moejax.SOWN with aux="sow"),
keep the returned `routing`, and after the optimizer step let every router update
it:

  update = moejax.routing_updater(model, x)          # once: finds every MoE
  variables = update(variables)                      # after each optimizer step

`routing_updater` traces `model.init` abstractly (no compute) to find every MoE
layer by its module path, so it works on models written by others, compact or
not; `update` is a pure function of the variables tree (jit it with the step).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
from flax.core import unfreeze

from moejax.layer import MoE

STATE_COLLECTIONS = ("routing",)


def carried_collections(variables: Mapping[str, Any]) -> tuple[str, ...]:
  """The collections of `variables` (init's output) a training step must carry and
  pass as mutable, besides `params`."""
  return tuple(c for c in variables if c in STATE_COLLECTIONS)


def find_moe_layers(model: nn.Module, *args, **kwargs) -> dict[tuple[str, ...], MoE]:
  """{module path: the MoE layer, unbound} of every MoE that model(*args, **kwargs)
  calls, found by tracing model.init abstractly."""
  found = {}

  def record(next_fun, call_args, call_kwargs, context):
    module = context.module
    if isinstance(module, MoE) and context.method_name == "__call__":
      found[tuple(module.path)] = module.clone(parent=None, name=None)
    return next_fun(*call_args, **call_kwargs)

  def init():
    with nn.intercept_methods(record):
      return model.init(jax.random.key(0), *args, **kwargs)

  jax.eval_shape(init)
  return found


def _subtree(tree: Mapping[str, Any], path: tuple[str, ...]):
  for key in path:
    if not isinstance(tree, Mapping) or key not in tree:
      return None
    tree = tree[key]
  return tree


def _with_subtree(tree: dict, path: tuple[str, ...], value: Any) -> dict:
  out = dict(tree)
  if len(path) == 1:
    out[path[0]] = value
  else:
    out[path[0]] = _with_subtree(out[path[0]], path[1:], value)
  return out


def routing_updater(model: nn.Module, *args, **kwargs
                    ) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
  """A function variables -> variables that applies MoE.update_routing to the
  `routing` state of every MoE layer of model (found with find_moe_layers on the
  example arguments). Layers without routing state are left as they are."""
  layers = find_moe_layers(model, *args, **kwargs)

  def update(variables: Mapping[str, Any]) -> dict[str, Any]:
    variables = unfreeze(variables) if hasattr(variables, "unfreeze") else dict(variables)
    routing = variables.get("routing")
    if routing is None:
      return variables
    for path, layer in layers.items():
      state = _subtree(routing, path)
      if state is None:
        continue
      _, mutated = layer.apply({"routing": state}, method=MoE.update_routing,
                               mutable=["routing"])
      routing = _with_subtree(routing, path, unfreeze(mutated)["routing"])
    return {**variables, "routing": routing}

  return update

"""Router registry: `create(name, **kwargs)` and `names()`.

A router is a subclass of routers.Router (routers/base.py: the interface),
`router(x [B, L, D], ctx, deterministic) -> RouterOutput` with fields
`num_experts` and `top_k`, registered under a name with `@register`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn

from moejax.routers.base import check_declarations

_ROUTERS: dict[str, type[nn.Module]] = {}

# Fields every linen module has, and the rng stream the layer names; not router
# settings.
_MODULE_FIELDS = ("parent", "name", "rng_name")


def register(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
  """Class decorator registering a router (a subclass of routers.Router, whose
  declarations are checked) under `name`."""
  def wrap(cls):
    if name in _ROUTERS:
      raise ValueError(f"router {name!r} is already registered")
    check_declarations(cls)
    _ROUTERS[name] = cls
    cls.router_name = name
    return cls
  return wrap


def unregister(name: str) -> None:
  """Removes router `name` from the registry (a router registered for a while,
  e.g. by a test)."""
  get(name)
  del _ROUTERS[name]


def names() -> list[str]:
  """Registered router names, sorted."""
  return sorted(_ROUTERS)


def get(name: str) -> type[nn.Module]:
  if name not in _ROUTERS:
    raise ValueError(f"router must be one of {names()}, got {name!r}")
  return _ROUTERS[name]


def fields(name: str) -> list[str]:
  """The settings a router accepts."""
  return [f.name for f in dataclasses.fields(get(name)) if f.name not in _MODULE_FIELDS]


def create(name: str, /, **kwargs) -> nn.Module:
  """Builds router `name`, validating its settings before any tracing.

  Linen's `parent` and `name`, and the rng stream `rng_name`, may be passed through.

  Raises:
    ValueError: unknown router, unknown setting, or a bad value (the message
      names the field).
  """
  cls = get(name)
  allowed = fields(name) + list(_MODULE_FIELDS)
  for key in kwargs:
    if key not in allowed:
      raise ValueError(f"router {name!r} has no setting {key!r}; settings: {allowed}")
  return cls(**kwargs)

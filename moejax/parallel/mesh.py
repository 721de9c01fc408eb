"""Device mesh from axis sizes, and the logical-axis rules of moejax.

The batch is split over ('data', 'expert'): devices that hold different experts
also hold different tokens, so attention and the dense layers are data-parallel
over both axes, and expert parallelism exchanges tokens along 'expert'.

  mesh = make_mesh(data=2, expert=4)          # 8 devices
  shardings = param_shardings(abstract_variables, mesh)
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh

from moejax import validation

MESH_AXES = ("data", "expert", "model")
BATCH_AXES = ("data", "expert")

LOGICAL_RULES = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("embed", None),
    ("expert", "expert"),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv", None),
    ("vocab", "model"),
)



def expert_rules(expert_axis: str = "expert") -> tuple[tuple[str, str], ...]:
  """The logical-axis rule a model with its own rules adds for the MoE layer: the
  experts' stacking axis `expert` onto mesh axis `expert_axis`. The layer's other
  logical axes are the usual `embed` and `mlp`, which such a model already maps."""
  return (("expert", expert_axis),)


def make_mesh(data: int = 1, expert: int = 1, model: int = 1,
              devices: Optional[Sequence[Any]] = None) -> Mesh:
  """Mesh with axes ('data', 'expert', 'model') over `devices` (default: all).

  Raises:
    ValueError: an axis size below 1, or a product other than the device count.
  """
  for name, size in (("data", data), ("expert", expert), ("model", model)):
    validation.positive_int(f"mesh.{name}", size)
  devices = list(jax.devices() if devices is None else devices)
  if data * expert * model != len(devices):
    raise ValueError(f"mesh data*expert*model = {data}*{expert}*{model} = "
                     f"{data * expert * model}, but there are {len(devices)} devices")
  return Mesh(np.asarray(devices).reshape(data, expert, model), MESH_AXES)


def param_shardings(abstract_variables: Any, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
  """NamedShardings for a variables tree whose leaves carry logical axis names."""
  specs = nn.get_partition_spec(abstract_variables)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)

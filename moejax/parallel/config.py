"""How the MoE layer runs its experts over a mesh: the ExpertParallel settings.

  MoE(..., expert_parallel=ExpertParallel("all_to_all", llep=True))

and run under `jax.set_mesh(mesh)` with a mesh from `parallel.make_mesh` whose
`expert` axis shards the experts. Tokens are sharded over ('data', 'expert').

Dispatch:
  all_to_all  rows travel to their expert's device and back (GShard 2020); with
              `llep`, excess rows of overloaded devices are spilled, with their
              expert's weights, to the least-loaded devices (LLEP, 2026).
  all_gather  dropless: every device of the expert axis gathers the axis' tokens,
              runs its own experts on their assignments, and a reduce-scatter
              returns the sums (tokens x n_expert memory, no capacity).

Transport of all_to_all:
  fixed       a fixed capacity C per destination device (static buffers
              [n, C, D]); rows past C are dropped and counted.
  ragged      jax.lax.ragged_all_to_all: rows packed without per-destination
              padding into a receive buffer of fixed total size; rows past it
              are dropped and counted. XLA:CPU lacks the op.
  auto        ragged on GPU and TPU, fixed elsewhere.

Mesh axis names (your mesh, your names): tokens are sharded over `batch_axes`,
which must include `expert_axis`, the axis the experts are sharded over; the
experts' hidden axis F is sharded over `model_axis` (None: not split). The
defaults are moejax's own mesh ('data', 'expert', 'model'); on a mesh
('data', 'fsdp', 'tensor', 'expert') say batch_axes=('data', 'fsdp', 'expert'),
model_axis='tensor'.

capacity_factor: None is dropless (buffers sized for the worst case: every slot
of a device to one destination); a value c sets the per-destination capacity
C = ceil(c * A_local / n) (fixed) or the receive buffer ceil(c * A_local) rows
(ragged), A_local being a device's assignment slots.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from moejax import validation

DISPATCHES = ("all_to_all", "all_gather")
TRANSPORTS = ("auto", "fixed", "ragged")


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
  """Settings of expert-parallel execution (see the module docstring).

  Attributes:
    dispatch: `all_to_all` or `all_gather`.
    transport: `auto`, `fixed` or `ragged` (all_to_all only).
    capacity_factor: None (dropless) or c > 0.
    llep: spill overloaded devices' rows to the least-loaded ones (all_to_all).
    llep_threshold: lambda; spill only when max device load > lambda * mean.
    llep_alpha: alpha >= 1; a device takes at most ceil(alpha * mean) rows.
    llep_min_chunk: m; no spill of fewer than m rows (they stay home).
    llep_guest_slots: G; experts a device may host besides its own.
    batch_axes: mesh axes the tokens are sharded over (including expert_axis).
    expert_axis: mesh axis the experts are sharded over.
    model_axis: mesh axis the experts' hidden axis is sharded over, or None.
  """

  dispatch: str = "all_to_all"
  transport: str = "auto"
  capacity_factor: Optional[float] = None
  llep: bool = False
  llep_threshold: float = 1.3
  llep_alpha: float = 1.0
  llep_min_chunk: int = 1
  llep_guest_slots: int = 2
  batch_axes: tuple[str, ...] = ("data", "expert")
  expert_axis: str = "expert"
  model_axis: Optional[str] = "model"

  def __post_init__(self):
    if isinstance(self.batch_axes, str):
      object.__setattr__(self, "batch_axes", (self.batch_axes,))
    object.__setattr__(self, "batch_axes", tuple(self.batch_axes))
    if self.expert_axis not in self.batch_axes:
      raise ValueError(f"expert_parallel.batch_axes {self.batch_axes} must include "
                       f"expert_axis {self.expert_axis!r}: devices that hold different "
                       "experts hold different tokens")
    if self.model_axis is not None and self.model_axis in self.batch_axes:
      raise ValueError(f"expert_parallel.model_axis {self.model_axis!r} must not be one of "
                       f"batch_axes {self.batch_axes}")
    validation.one_of("expert_parallel.dispatch", self.dispatch, DISPATCHES)
    validation.one_of("expert_parallel.transport", self.transport, TRANSPORTS)
    if self.capacity_factor is not None:
      validation.in_range("expert_parallel.capacity_factor", self.capacity_factor, 0,
                          float("inf"), low_open=True)
    validation.in_range("expert_parallel.llep_threshold", self.llep_threshold, 1,
                        float("inf"))
    validation.in_range("expert_parallel.llep_alpha", self.llep_alpha, 1, float("inf"))
    validation.positive_int("expert_parallel.llep_min_chunk", self.llep_min_chunk)
    validation.positive_int("expert_parallel.llep_guest_slots", self.llep_guest_slots)
    if self.dispatch == "all_gather" and (self.llep or self.capacity_factor is not None):
      raise ValueError("expert_parallel.dispatch='all_gather' is dropless and balances "
                       "nothing: leave capacity_factor None and llep False")

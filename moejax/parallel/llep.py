"""Least-Loaded Expert Parallelism (LLEP).

"Least-Loaded Expert Parallelism: Load Balancing An Imbalanced Mixture-of-Experts",
Nguyen et al., 2026 (arXiv 2601.17111). Routing is left as it is; only where an
assignment runs changes. With n devices on the expert axis, expert e lives on
device h(e) = e // E_l, and the global counts c_e give device loads
L_d = sum_{h(e)=d} c_e and their mean M = sum_e c_e / n.

  trigger   spill only when max_d L_d > lambda * M (else plain EP)
  capacity  a device takes at most ceil(alpha * M) rows
  least-loaded assignment, experts in decreasing c_e:
            e's rows go home first, up to the home device's room; the rest is
            spilled, chunk by chunk, to the least-loaded device with room for
            at least m rows and a free guest slot, together with e's weights;
            a remainder below m stays home (no transfer is worth it).

Rows keep their global order inside an expert: the first rows of e (by source
device, then slot order) run at home, the next on the first helper, and so on.
Every spilled chunk has at least m rows, and a device never takes guest rows
past ceil(alpha * M). What cannot be spilled stays home, so with m = 1 and
enough guest slots (G per device) every device ends at most ceil(alpha * M).

Static shapes: an expert is split into at most S = n pieces, a device hosts at
most G guests, and the helpers' weights travel by one all_to_all of [n, G]
expert weights (zeros where nothing is sent), whose transpose returns the
guests' weight gradients to the home device.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from moejax.experts import ExpertFFN
from pallas_kernels.varying import vary_like

Array = jax.Array


class SpillPlan(flax.struct.PyTreeNode):
  """Where each expert's rows run.

  Attributes:
    piece_device: int32[E, S], device of each piece of an expert (piece 0: home).
    piece_rows: int32[E, S], rows in each piece (their sum is c_e).
    piece_slot: int32[E, S], index among the device's experts: e % E_l at home,
      E_l + g for the device's guest slot g.
    guest_expert: int32[n, G], global expert in each guest slot, -1 if free.
    device_load: int32[n], rows each device runs.
    triggered: bool, whether max load exceeded lambda times the mean.
  """

  piece_device: Array
  piece_rows: Array
  piece_slot: Array
  guest_expert: Array
  device_load: Array
  triggered: Array


def least_loaded_plan(counts: Array, num_devices: int, *, threshold: float, alpha: float,
                      min_chunk: int, guest_slots: int) -> SpillPlan:
  """The spill plan for global counts c [E] over `num_devices` (the module rule)."""
  num_experts = counts.shape[0]
  local_experts = num_experts // num_devices
  counts = counts.astype(jnp.int32)
  home = jnp.arange(num_experts, dtype=jnp.int32) // local_experts
  home_load = counts.reshape(num_devices, local_experts).sum(axis=1)
  mean = jnp.sum(counts) / num_devices
  triggered = jnp.max(home_load) > threshold * mean
  room_cap = jnp.ceil(alpha * mean).astype(jnp.int32)
  cap = jnp.where(triggered, room_cap, jnp.iinfo(jnp.int32).max // 2)
  pieces = num_devices
  devices = jnp.arange(num_devices, dtype=jnp.int32)
  big = jnp.iinfo(jnp.int32).max

  init = SpillPlan(
      piece_device=jnp.broadcast_to(home[:, None], (num_experts, pieces)),
      piece_rows=jnp.zeros((num_experts, pieces), jnp.int32),
      piece_slot=jnp.broadcast_to((jnp.arange(num_experts) % local_experts)[:, None],
                                  (num_experts, pieces)).astype(jnp.int32),
      guest_expert=jnp.full((num_devices, guest_slots), -1, jnp.int32),
      device_load=jnp.zeros((num_devices,), jnp.int32),
      triggered=triggered)
  init = vary_like(init, counts)

  def place(i, plan):
    e = order[i]
    rows, h = counts[e], home[e]
    load = plan.device_load
    stay = jnp.clip(cap - load[h], 0, rows)
    load = load.at[h].add(stay)
    rest = rows - stay
    piece_device, piece_rows = plan.piece_device, plan.piece_rows.at[e, 0].set(stay)
    piece_slot, guest_expert = plan.piece_slot, plan.guest_expert
    used = jnp.sum(guest_expert >= 0, axis=1)
    for p in range(1, pieces):
      eligible = ((devices != h) & (used < guest_slots) & (cap - load >= min_chunk)
                  & (rest >= min_chunk))
      d = jnp.argmin(jnp.where(eligible, load, big)).astype(jnp.int32)
      go = eligible[d]
      chunk = jnp.where(go, jnp.minimum(rest, cap - load[d]), 0)
      slot = jnp.where(go, used[d], 0)
      piece_device = piece_device.at[e, p].set(jnp.where(go, d, h))
      piece_rows = piece_rows.at[e, p].set(chunk)
      piece_slot = piece_slot.at[e, p].set(jnp.where(go, local_experts + slot,
                                                     piece_slot[e, 0]))
      guest_expert = guest_expert.at[d, slot].set(jnp.where(go, e, guest_expert[d, slot]))
      used = used.at[d].add(go.astype(jnp.int32))
      load = load.at[d].add(chunk)
      rest = rest - chunk
    piece_rows = piece_rows.at[e, 0].add(rest)            # below m, or nowhere to go: home
    load = load.at[h].add(rest)
    return plan.replace(piece_device=piece_device, piece_rows=piece_rows,
                        piece_slot=piece_slot, guest_expert=guest_expert, device_load=load)

  order = jnp.argsort(-counts, stable=True)
  return jax.lax.fori_loop(0, num_experts, place, init)


def slot_destinations(plan: SpillPlan, expert: Array, rank: Array) -> tuple[Array, Array]:
  """(device, index among that device's experts) of each slot, from its expert
  [A] and its rank [A] among all rows of that expert in the expert-axis group."""
  ends = jnp.cumsum(plan.piece_rows, axis=1)[expert]                # [A, S]
  piece = jnp.minimum(jnp.sum(rank[:, None] >= ends, axis=1), ends.shape[1] - 1)
  return plan.piece_device[expert, piece], plan.piece_slot[expert, piece]


def with_guests(ffn: ExpertFFN, plan: SpillPlan, axis_name: str) -> ExpertFFN:
  """This device's experts followed by its G guests' weights, [E_l + G, ...].

  Every home device puts, for each (device d, guest slot g) hosting one of its
  experts, that expert's weights at [d, g] of a zero buffer [n, G, ...]; one
  all_to_all delivers them, and the sum over sources is each guest's weights.
  """
  me = jax.lax.axis_index(axis_name)
  local_experts = ffn.num_experts
  guest = plan.guest_expert                                          # [n, G]
  mine = (guest >= 0) & (guest // local_experts == me)
  index = jnp.where(mine, guest - me * local_experts, 0)

  def deliver(w):
    out = jnp.where(mine.reshape(mine.shape + (1,) * (w.ndim - 1)), w[index], 0)
    received = jax.lax.all_to_all(out, axis_name, 0, 0, tiled=True)  # [n, G, ...] by source
    return jnp.concatenate([w, jnp.sum(received, axis=0).astype(w.dtype)], axis=0)
  return ffn.replace(weights={k: deliver(w) for k, w in ffn.weights.items()})

"""Moving assignment rows to their devices and back, inside shard_map.

Both transports take, per device, its tokens x [T_l, D] and its A_l slots with a
destination device `dest`, the expert index at that device `local_expert`, and a
`keep` mask, and return a Received: the rows that arrived [R, D] with their local
expert and validity, the slots that were kept, and `give_back(out [R, D])`, which
returns each kept slot's output to its source, in slot order [A_l, D] (zeros for
slots not kept). What does not fit is dropped and counted, never silently.

  fixed_exchange   a fixed capacity C per destination: send buffer [n, C, D],
                   one all_to_all each way (GShard 2020; Switch, MaxText).
  ragged_exchange  rows sorted by destination, packed without padding:
                   jax.lax.ragged_all_to_all into a receive buffer of R rows;
                   the offsets come from an all_gather of the [n] send counts.
"""
from __future__ import annotations

from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp

from moejax import grouping

Array = jax.Array


class Received(flax.struct.PyTreeNode):
  """Rows delivered to this device, and the way back.

  Attributes:
    rows: [R, D] token rows.
    expert: int32[R], expert of each row among this device's experts.
    valid: bool[R].
    kept: bool[A_l], this device's slots that were sent.
    give_back: [R, D] outputs -> [A_l, D], each kept slot's output at its slot.
  """

  rows: Array
  expert: Array
  valid: Array
  kept: Array
  give_back: Callable[[Array], Array] = flax.struct.field(pytree_node=False)


def _all_to_all(a: Array, axis_name: str) -> Array:
  return jax.lax.all_to_all(a, axis_name, 0, 0, tiled=True)



def fixed_exchange(x: Array, token: Array, dest: Array, local_expert: Array, keep: Array,
                   capacity: int, axis_name: str) -> Received:
  """Each device sends at most `capacity` rows to each device of the axis; a
  slot's place is its rank among the kept slots for its destination, and slots
  ranked >= capacity are dropped."""
  num_devices = jax.lax.axis_size(axis_name)
  position = grouping.position_in_expert(dest, keep, num_devices)
  kept = keep & (position < capacity)
  slots = num_devices * capacity
  flat = jnp.where(kept, dest * capacity + position, slots)       # not kept: a dummy row

  def to_buffer(values, fill):
    buffer = jnp.full((slots + 1,) + values.shape[1:], fill, values.dtype)
    return buffer.at[flat].set(values)[:slots].reshape((num_devices, capacity) + values.shape[1:])

  rows = grouping.read_rows(x, to_buffer(token, x.shape[0]))                # [n, C, D], no [A, D] copy
  rows = _all_to_all(rows, axis_name).reshape(slots, x.shape[-1])
  expert = _all_to_all(to_buffer(local_expert, 0), axis_name).reshape(slots)
  valid = _all_to_all(to_buffer(kept, False), axis_name).reshape(slots)

  def give_back(out):
    back = _all_to_all(out.reshape(num_devices, capacity, -1), axis_name)
    return grouping.read_rows(back.reshape(slots, -1), flat)
  return Received(rows, expert.astype(jnp.int32), valid, kept, give_back)


def ragged_exchange(x: Array, token: Array, dest: Array, local_expert: Array, keep: Array,
                    receive_rows: int, axis_name: str) -> Received:
  """Rows packed by destination; device d receives the sources' rows one after
  another in source order, and rows past `receive_rows` are dropped."""
  num_devices = jax.lax.axis_size(axis_name)
  me = jax.lax.axis_index(axis_name)
  num_slots = dest.shape[0]
  counts = grouping.expert_counts(dest, keep, num_devices).astype(jnp.int32)   # [n]
  table = jax.lax.all_gather(counts, axis_name)                   # [source, dest]
  offset = grouping.exclusive_cumsum(table, 0)                             # place at the receiver
  sent = jnp.clip(receive_rows - offset, 0, table)                 # what fits there
  start = grouping.exclusive_cumsum(table, 1)                              # place at the sender
  position = grouping.position_in_expert(dest, keep, num_devices)
  safe_dest = jnp.where(keep, dest, 0)
  kept = keep & (position < sent[me, safe_dest])
  packed = jnp.where(keep, start[me, safe_dest] + position, num_slots)

  def pack(values, fill):
    buffer = jnp.full((num_slots + 1,) + values.shape[1:], fill, values.dtype)
    return buffer.at[packed].set(values)[:num_slots]

  def exchange(operand, out_rows, reverse=False):
    output = jnp.zeros((out_rows,) + operand.shape[1:], operand.dtype)
    if not reverse:
      return ragged_all_to_all(operand, output, start[me], sent[me], offset[me],
                               sent[:, me], axis_name)
    return ragged_all_to_all(operand, output, offset[:, me], sent[:, me], start[:, me],
                             sent[me], axis_name)

  rows = exchange(grouping.read_rows(x, pack(token, x.shape[0])), receive_rows)
  expert = exchange(pack(local_expert, 0), receive_rows)
  valid = jnp.arange(receive_rows) < jnp.sum(sent[:, me])

  def give_back(out):
    return grouping.read_rows(exchange(out, num_slots, reverse=True), jnp.where(kept, packed, num_slots))
  return Received(rows, expert.astype(jnp.int32), valid, kept, give_back)


def has_ragged_all_to_all() -> bool:
  """Whether the default backend compiles jax.lax.ragged_all_to_all (XLA:CPU does not)."""
  return jax.default_backend() in ("gpu", "cuda", "rocm", "tpu")


def ragged_all_to_all(operand: Array, output: Array, input_offsets: Array,
                      send_sizes: Array, output_offsets: Array, recv_sizes: Array,
                      axis_name: str) -> Array:
  """jax.lax.ragged_all_to_all, or on a backend without it an equivalent built
  from one padded all_to_all (n times the operand's memory; for CPU tests).

  Device i sends operand[input_offsets[j] : + send_sizes[j]] to device j, which
  writes it at output[output_offsets[j] : ...] (offsets given by the sender);
  recv_sizes[j] is what i receives from j. Rows of `output` nobody writes keep
  their value.
  """
  if has_ragged_all_to_all():
    return jax.lax.ragged_all_to_all(operand, output, input_offsets, send_sizes,
                                     output_offsets, recv_sizes, axis_name=axis_name)
  num_devices = jax.lax.axis_size(axis_name)
  rows = operand.shape[0]
  i = jnp.arange(rows)
  index = jnp.where(i[None, :] < send_sizes[:, None], input_offsets[:, None] + i[None, :], rows)
  chunks = _all_to_all(grouping.read_rows(operand, index), axis_name)                 # [n, rows, ...]
  where = _all_to_all(output_offsets.reshape(num_devices, 1), axis_name)      # [n, 1]
  target = jnp.where(i[None, :] < recv_sizes[:, None], where + i[None, :], output.shape[0])
  return output.at[target.reshape(-1)].set(
      chunks.reshape((-1,) + operand.shape[1:]), mode="drop")

"""The grain input pipeline over TFDS array_record data, read as S input shards.

  source   builder.as_data_source(split): random access, no TensorFlow
  shards   S logical input shards (data.input_shards); shard s is source[s::S]
  shuffle  per shard, a shuffle per epoch (train), then repeat
  tokenize text -> [bos] ids [eos]; `domain`, when the dataset has one, per token
  pack     per shard, concatenate and cut into rows of seq_len + 1 tokens with
           segment ids and positions (grain ConcatThenSplit); documents may
           continue into the next row, each piece with its own segment
  batch    per shard B/S rows; a process reads only its own S/n consecutive
           shards (`owned_shards`) and its batch is theirs, concatenated in
           shard order: [B/n, seq_len + 1]

Process p of n thus holds rows [p·B/n, (p+1)·B/n) of a global batch that depends
on S but not on n: the batch sequence, and a checkpointed data position (one
grain state per shard), are the same for every process count that divides S.

A batch holds `tokens`, `tokens_segment_ids` (0 is padding), `tokens_positions`
and, for labelled datasets, `domain` (with its own segment ids and positions).
Without shuffling (evaluation) each shard makes one ordered pass; a short last
batch of a shard, or a shard that has run out while others have not, gives
padding rows (segment 0) so that every shard keeps its place in the batch.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np

from moejax import validation
from moejax.data import builders
from moejax.data.tokenizer import ByteTokenizer

# Shard s shuffles with seed + s·GOLDEN (mod 2^32): far from seed + epoch, the
# seeds grain gives the epochs of shard 0.
GOLDEN = 0x9E3779B9


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
  """What to read and how to cut it.

  Attributes:
    name: TFDS dataset name (e.g. `stdlib_text`, `lm1b`).
    data_dir: TFDS data directory.
    split: split name, or a TFDS slice like `train[:90%]`.
    seq_len: model sequence length L; rows hold L + 1 tokens (inputs and targets).
    batch_size: rows per global batch B, over all processes.
    seed: shuffle seed.
    shuffle: shuffle (and repeat forever) for training; one ordered pass if False.
    text_key: the feature that holds the text.
    domain_key: a feature with the example's domain id, or None.
    input_shards: S, the number of independent input streams; it must divide
      batch_size and be a multiple of the process count. 1 reads the source as
      one stream.
  """

  name: str
  data_dir: str
  split: str
  seq_len: int
  batch_size: int
  seed: int = 0
  shuffle: bool = True
  text_key: str = "text"
  domain_key: Optional[str] = None
  input_shards: int = 1


def _process_slice() -> tuple[int, int]:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index(), jax.process_count()


def check_shards(input_shards: int, batch_size: int, process_count: int,
                 batch_field: str = "the batch size") -> None:
  """Raises ValueError, naming data.input_shards, unless S is a positive multiple
  of the process count that divides the batch size."""
  validation.positive_int("data.input_shards", input_shards)
  if input_shards % process_count:
    raise ValueError(f"data.input_shards ({input_shards}) must be a multiple of the "
                     f"process count ({process_count})")
  if batch_size % input_shards:
    raise ValueError(f"data.input_shards ({input_shards}) must divide {batch_field} "
                     f"({batch_size})")


def owned_shards(input_shards: int, process_index: int, process_count: int) -> range:
  """The input shards process `process_index` of `process_count` reads: S/n
  consecutive ones, so that its rows [p·B/n, (p+1)·B/n) are theirs in order."""
  per_process = input_shards // process_count
  return range(process_index * per_process, (process_index + 1) * per_process)


def num_domains(spec: PipelineSpec) -> Optional[int]:
  """Number of classes of the dataset's domain label, or None without one."""
  if spec.domain_key is None:
    return None
  feature = builders.load(spec.name, spec.data_dir).info.features[spec.domain_key]
  return getattr(feature, "num_classes", None)


class ShardedIterator:
  """This process's batches: its shards' grain iterators, read in step.

  `get_state()` is {shard: grain state} and `set_state` takes the same, so a data
  position saved under one process count restores under any other that divides
  S. Without shuffling, a shard that has run out gives padding rows until all
  of this process's shards have (then StopIteration); `padding()` is a batch of
  padding rows only, for a process whose shards have run out before another's.
  """

  def __init__(self, datasets: dict[int, Any], empty: dict[str, np.ndarray],
               num_shards: int):
    self.num_shards = num_shards                      # S, over all processes
    self._iterators = {s: iter(d) for s, d in datasets.items()}
    self._empty = empty                               # one shard's slot of padding
    self._done: set[int] = set()

  @property
  def shards(self) -> tuple[int, ...]:
    """The input shards this iterator reads, in the order of its batch rows."""
    return tuple(self._iterators)

  def __iter__(self) -> "ShardedIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    """The next batch of this process, [B/n, seq_len + 1] per feature."""
    parts = {}
    for shard, iterator in self._iterators.items():
      if shard not in self._done:
        part = next(iterator, None)
        if part is None:
          self._done.add(shard)
        else:
          parts[shard] = part
    if not parts:
      raise StopIteration
    return {key: np.concatenate([_pad_rows(parts[s][key], empty) if s in parts else empty
                                 for s in self._iterators])
            for key, empty in self._empty.items()}

  def padding(self) -> dict[str, np.ndarray]:
    """A batch of padding rows only, [B/n, seq_len + 1] per feature."""
    return {key: np.concatenate([empty] * len(self._iterators))
            for key, empty in self._empty.items()}

  def get_state(self) -> dict[int, Any]:
    return {shard: iterator.get_state() for shard, iterator in self._iterators.items()}

  def set_state(self, states: dict[int, Any]) -> None:
    for shard, iterator in self._iterators.items():
      iterator.set_state(states[shard])
    self._done.clear()


def _pad_rows(part: np.ndarray, empty: np.ndarray) -> np.ndarray:
  """A shard's short last batch [r, ...] completed with padding rows to empty's shape."""
  have = part.shape[0]
  return part if have == empty.shape[0] else np.concatenate([part, empty[have:]])


class ShardedDataset:
  """The input shards a process reads; iterating gives a ShardedIterator."""

  def __init__(self, datasets: dict[int, Any], empty: dict[str, np.ndarray],
               num_shards: int):
    self._datasets, self._empty, self.num_shards = datasets, empty, num_shards

  @property
  def shards(self) -> tuple[int, ...]:
    """The input shards this process reads, in the order of its batch rows."""
    return tuple(self._datasets)

  def __iter__(self) -> ShardedIterator:
    return ShardedIterator(self._datasets, self._empty, self.num_shards)


def _empty_slot(spec: PipelineSpec, rows: int) -> dict[str, np.ndarray]:
  """Padding rows [rows, seq_len + 1] for every feature of a packed batch."""
  features = ("tokens",) + (("domain",) if spec.domain_key is not None else ())
  shape = (rows, spec.seq_len + 1)
  return {f"{feature}{suffix}": np.zeros(shape, np.int32) for feature in features
          for suffix in ("", "_positions", "_segment_ids")}


def make_dataset(spec: PipelineSpec, tokenizer=None, prepare: bool = True,
                 process: Optional[tuple[int, int]] = None) -> ShardedDataset:
  """This process's batches [B/n, seq_len + 1]; see the module docstring.

  process: (index, count) of the reading process; default jax's.
  """
  tokenizer = tokenizer or ByteTokenizer()
  index, count = process or _process_slice()
  check_shards(spec.input_shards, spec.batch_size, count)
  builder = builders.load(spec.name, spec.data_dir, prepare=prepare)
  features = builder.info.features
  if spec.text_key not in features:
    raise ValueError(f"data.text_key {spec.text_key!r} is not a feature of {spec.name}; "
                     f"features: {list(features)}")
  if spec.domain_key is not None and spec.domain_key not in features:
    raise ValueError(f"data.domain_key {spec.domain_key!r} is not a feature of {spec.name}; "
                     f"features: {list(features)}")
  source = builders.data_source(builder, spec.split)
  rows = spec.batch_size // spec.input_shards
  datasets = {s: _shard_dataset(spec, source, s, rows, tokenizer)
              for s in owned_shards(spec.input_shards, index, count)}
  return ShardedDataset(datasets, _empty_slot(spec, rows), spec.input_shards)


def _shard_dataset(spec: PipelineSpec, source, shard: int, rows: int, tokenizer):
  """Input shard `shard` of S as a grain IterDataset of [rows, seq_len + 1] batches."""
  import grain  # pylint: disable=g-import-not-at-top
  from grain.experimental import ConcatThenSplitIterDataset  # pylint: disable=g-import-not-at-top

  domain_key = spec.domain_key
  dataset = grain.MapDataset.source(source)[shard::spec.input_shards]
  if spec.shuffle:
    dataset = dataset.shuffle(seed=(spec.seed + shard * GOLDEN) % 2**32).repeat()

  def tokenize(example: dict[str, Any]) -> dict[str, np.ndarray]:
    ids = tokenizer.encode(example[spec.text_key])
    ids = np.concatenate([[tokenizer.bos_id], ids, [tokenizer.eos_id]]).astype(np.int32)
    out = {"tokens": ids}
    if domain_key is not None:
      out["domain"] = np.full(ids.shape, int(example[domain_key]), np.int32)
    return out

  dataset = dataset.map(tokenize).to_iter_dataset()
  row = spec.seq_len + 1
  lengths = {"tokens": row, **({"domain": row} if domain_key is not None else {})}
  dataset = ConcatThenSplitIterDataset(dataset, length_struct=lengths)
  return dataset.batch(rows, drop_remainder=spec.shuffle)

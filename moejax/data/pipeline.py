"""The grain input pipeline over TFDS array_record data.

  source   builder.as_data_source(split): random access, no TensorFlow
  shard    this process's slice, source[process_index::process_count]
  shuffle  a global shuffle per epoch (train), then repeat
  tokenize text -> [bos] ids [eos]; `domain`, when the dataset has one, per token
  pack     concatenate and cut into rows of seq_len + 1 tokens with segment ids
           and positions (grain ConcatThenSplit); documents may continue into
           the next row, each piece with its own segment
  batch    rows of this process, [batch, seq_len + 1]

A batch holds `tokens`, `tokens_segment_ids` (0 is padding), `tokens_positions`
and, for labelled datasets, `domain`. The iterator is a grain DatasetIterator,
whose state the trainer checkpoints with the model.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np

from moejax.data import builders
from moejax.data.tokenizer import ByteTokenizer


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
  """What to read and how to cut it.

  Attributes:
    name: TFDS dataset name (e.g. `stdlib_text`, `lm1b`).
    data_dir: TFDS data directory.
    split: split name, or a TFDS slice like `train[:90%]`.
    seq_len: model sequence length L; rows hold L + 1 tokens (inputs and targets).
    batch_size: rows per batch for this process.
    seed: shuffle seed.
    shuffle: shuffle (and repeat forever) for training; one ordered pass if False.
    text_key: the feature that holds the text.
    domain_key: a feature with the example's domain id, or None.
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


def _process_slice() -> tuple[int, int]:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index(), jax.process_count()


def num_domains(spec: PipelineSpec) -> Optional[int]:
  """Number of classes of the dataset's domain label, or None without one."""
  if spec.domain_key is None:
    return None
  feature = builders.load(spec.name, spec.data_dir).info.features[spec.domain_key]
  return getattr(feature, "num_classes", None)


def make_dataset(spec: PipelineSpec, tokenizer=None, prepare: bool = True):
  """A grain IterDataset of packed batches; see the module docstring."""
  import grain  # pylint: disable=g-import-not-at-top
  from grain.experimental import ConcatThenSplitIterDataset  # pylint: disable=g-import-not-at-top

  tokenizer = tokenizer or ByteTokenizer()
  builder = builders.load(spec.name, spec.data_dir, prepare=prepare)
  features = builder.info.features
  if spec.text_key not in features:
    raise ValueError(f"data.text_key {spec.text_key!r} is not a feature of {spec.name}; "
                     f"features: {list(features)}")
  domain_key = spec.domain_key
  if domain_key is not None and domain_key not in features:
    raise ValueError(f"data.domain_key {domain_key!r} is not a feature of {spec.name}; "
                     f"features: {list(features)}")
  source = builders.data_source(builder, spec.split)
  index, count = _process_slice()
  dataset = grain.MapDataset.source(source)[index::count]
  if spec.shuffle:
    dataset = dataset.shuffle(seed=spec.seed).repeat()

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
  return dataset.batch(spec.batch_size, drop_remainder=spec.shuffle)

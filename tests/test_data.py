"""Tokenizers, the embedded TFDS builders and the grain pipeline."""
from __future__ import annotations

import hashlib
import json
import threading

import numpy as np
import pytest

from moejax import data
from moejax.data import builders, stdlib_text, synthetic_domains


def test_byte_tokenizer_round_trip_and_bytes():
  tok = data.ByteTokenizer()
  ids = tok.encode("héllo")                      # 'é' is two UTF-8 bytes
  np.testing.assert_array_equal(ids, np.frombuffer("héllo".encode(), np.uint8) + 3)
  assert tok.decode(ids) == "héllo"
  np.testing.assert_array_equal(tok.token_bytes([0, 1, 2, 3, 258]), [0, 0, 0, 1, 1])
  np.testing.assert_array_equal(tok.encode(np.array([0, 255], np.uint8)), [3, 258])


def test_tokenizer_factory_errors_name_the_field():
  with pytest.raises(ValueError, match="data.tokenizer"):
    data.tokenizer("wordpiece")
  with pytest.raises(ValueError, match="data.tokenizer_model"):
    data.tokenizer("sentencepiece")


def _digest(source, keys):
  h = hashlib.sha256()
  for i in range(len(source)):
    for k in keys:
      v = source[i][k]
      h.update(np.asarray(v).tobytes() if not isinstance(v, bytes) else v)
  return h.hexdigest()


def test_builders_are_deterministic(tfds_dir, tmp_path):
  """Building again elsewhere gives the same examples in the same order."""
  for name, keys in (("synthetic_domains", ("text", "domain")),
                     ("stdlib_text", ("text", "path", "domain"))):
    first, second = builders.load(name, tfds_dir), builders.prepare(name, str(tmp_path))
    for split in ("train", "validation"):
      a, b = first.as_data_source(split), second.as_data_source(split)
      assert len(a) == len(b) > 0
      assert _digest(a, keys) == _digest(b, keys), (name, split)


def test_synthetic_domain_labels_are_right_by_construction(tfds_dir):
  """Each sequence walks only transitions of its labelled chain, and its tokens
  outside the shared set belong to that domain alone."""
  chains = synthetic_domains.domain_chains()
  source = builders.load("synthetic_domains", tfds_dir).as_data_source("validation")
  shared = set(synthetic_domains.ALPHABET[:synthetic_domains.SHARED_TOKENS].tolist())
  counts = np.zeros(synthetic_domains.NUM_DOMAINS, int)
  for i in range(len(source)):
    text, domain = source[i]["text"], int(source[i]["domain"])
    counts[domain] += 1
    chain = chains[domain]
    index = {int(v): j for j, v in enumerate(chain.support)}
    assert synthetic_domains.MIN_LENGTH <= len(text) <= synthetic_domains.MAX_LENGTH
    states = np.array([index[int(v)] for v in text])
    assert np.all(chain.transitions[states[:-1], states[1:]] > 0)
    own = set(map(int, text)) - shared
    for other in range(synthetic_domains.NUM_DOMAINS):
      if other != domain:
        assert not own & set(map(int, chains[other].support)), (i, domain, other)
  assert np.all(counts > 0)          # every domain appears among 400 sequences


def test_synthetic_entropy_rates_are_recorded(tfds_dir):
  rates = builders.load("synthetic_domains", tfds_dir).info.metadata["entropy_rate_nats"]
  assert len(rates) == synthetic_domains.NUM_DOMAINS
  # BRANCHING = 4 successors: entropy rate strictly between 0 and ln 4.
  assert all(0 < r < np.log(4) for r in rates)


def test_stdlib_split_and_domains_follow_the_path(tfds_dir):
  builder = builders.load("stdlib_text", tfds_dir)
  names = builder.info.features["domain"].names
  for split in ("train", "validation"):
    source = builder.as_data_source(split)
    for i in range(0, len(source), max(len(source) // 50, 1)):
      path = source[i]["path"].decode()
      assert stdlib_text.split_of(path) == split
      assert names[int(source[i]["domain"])] == stdlib_text.domain_of(path)
  assert stdlib_text.domain_of("json/decoder.py") == "json"
  assert stdlib_text.domain_of("os.py") == "os"


def test_missing_dataset_is_one_clear_error(tmp_path):
  with pytest.raises(data.DatasetNotReady, match="tfds build lm1b"):
    builders.load("lm1b", str(tmp_path))
  with pytest.raises(data.DatasetNotReady, match="no_such_dataset_xyz"):
    builders.load("no_such_dataset_xyz", str(tmp_path))


def _spec(tfds_dir, **overrides):
  kwargs = dict(name="synthetic_domains", data_dir=tfds_dir, split="train", seq_len=31,
                batch_size=4, seed=3, domain_key="domain")
  kwargs.update(overrides)
  return data.PipelineSpec(**kwargs)


def test_packed_batches_have_segments_positions_and_domains(tfds_dir):
  batch = next(iter(data.make_dataset(_spec(tfds_dir))))
  assert batch["tokens"].shape == (4, 32)
  tokens, segments, positions = (batch["tokens"], batch["tokens_segment_ids"],
                                 batch["tokens_positions"])
  for row in range(4):
    for segment in np.unique(segments[row]):
      where = np.flatnonzero(segments[row] == segment)
      # A segment is contiguous and its positions count from 0.
      np.testing.assert_array_equal(where, np.arange(where[0], where[-1] + 1))
      np.testing.assert_array_equal(positions[row, where], np.arange(len(where)))
      # One domain per segment.
      assert len(np.unique(batch["domain"][row, where])) == 1
  assert np.all(tokens[segments > 0] > 0)


def test_pipeline_is_deterministic_and_resumable(tfds_dir):
  first = [b["tokens"] for _, b in zip(range(5), data.make_dataset(_spec(tfds_dir)))]
  second = [b["tokens"] for _, b in zip(range(5), data.make_dataset(_spec(tfds_dir)))]
  np.testing.assert_array_equal(first, second)
  other = next(iter(data.make_dataset(_spec(tfds_dir, seed=4))))["tokens"]
  assert not np.array_equal(first[0], other)
  iterator = iter(data.make_dataset(_spec(tfds_dir)))
  next(iterator)
  state = iterator.get_state()
  expected = [next(iterator)["tokens"] for _ in range(3)]
  restored = iter(data.make_dataset(_spec(tfds_dir)))
  restored.set_state(state)
  np.testing.assert_array_equal([next(restored)["tokens"] for _ in range(3)], expected)


@pytest.mark.parametrize("input_shards", [1, 4])
def test_eval_pass_reads_every_token_once(tfds_dir, input_shards):
  """Without shuffling, the pipeline packs each validation document exactly once;
  shards that run out before others give padding rows (segment 0)."""
  spec = _spec(tfds_dir, split="validation", shuffle=False, seq_len=255, batch_size=8,
               input_shards=input_shards)
  source = builders.load("synthetic_domains", tfds_dir).as_data_source("validation")
  expected = sum(len(source[i]["text"]) + 2 for i in range(len(source)))  # + bos, eos
  iterator = iter(data.make_dataset(spec))
  batches = list(iterator)
  assert sum(int(np.sum(b["tokens_segment_ids"] > 0)) for b in batches) == expected
  padding = iterator.padding()
  for key, value in batches[0].items():
    assert padding[key].shape == value.shape == (8, 256) and padding[key].dtype == value.dtype
    assert not padding[key].any()
  assert sorted(padding) == sorted(batches[-1])


class _RecordingSource:
  """A data source that records which records are read. The pipeline's prefetch
  threads keep reading after the test has its batches: `snapshot()` copies the
  indices read so far under the lock they add with."""

  def __init__(self, source):
    self.source, self._read, self._lock = source, set(), threading.Lock()

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    with self._lock:
      self._read.add(int(index))
    return self.source[index]

  def snapshot(self) -> set[int]:
    with self._lock:
      return set(self._read)


def _read(spec, process, monkeypatch, batches: int = 3):
  """(shards, first batches, indices of the records read) of one process."""
  sources = []

  def recording(builder, split, real=builders.data_source):
    sources.append(_RecordingSource(real(builder, split)))
    return sources[-1]

  monkeypatch.setattr(builders, "data_source", recording)
  dataset = data.make_dataset(spec, process=process)
  return dataset.shards, [b for _, b in zip(range(batches), dataset)], sources[0].snapshot()


@pytest.mark.parametrize("shuffle", [True, False])
def test_processes_read_their_own_shards_into_one_global_batch(tfds_dir, monkeypatch,
                                                               shuffle):
  """S = 4 input shards of a batch of 8 rows: process p of n reads only records
  s::4 of its shards s in [4p/n, 4(p+1)/n), and the processes' batches, stacked
  in process order, are the batches of a single process."""
  spec = _spec(tfds_dir, split="train" if shuffle else "validation", shuffle=shuffle,
               batch_size=8, input_shards=4)
  _, whole, _ = _read(spec, (0, 1), monkeypatch)
  for count in (2, 4):
    reads, parts = [], []
    for index in range(count):
      shards, batches, read = _read(spec, (index, count), monkeypatch)
      assert shards == tuple(range(4 * index // count, 4 * (index + 1) // count))
      assert read and {i % 4 for i in read} == set(shards)
      assert all(b["tokens"].shape == (8 // count, 32) for b in batches)
      reads.append(read)
      parts.append(batches)
    assert sum(map(len, reads)) == len(set().union(*reads))        # disjoint
    for step, batch in enumerate(whole):
      for key, value in batch.items():
        np.testing.assert_array_equal(np.concatenate([p[step][key] for p in parts]), value)


def test_shard_positions_restore_under_another_process_count(tfds_dir):
  """The positions two processes reach (one grain state per shard, through JSON as
  in a checkpoint) put a single process at the same next global batch."""
  spec = _spec(tfds_dir, batch_size=8, input_shards=4)
  halves = [iter(data.make_dataset(spec, process=(i, 2))) for i in range(2)]
  for iterator in halves:
    next(iterator)
    next(iterator)
  states = {int(s): v for h in halves for s, v in json.loads(json.dumps(h.get_state())).items()}
  one = iter(data.make_dataset(spec, process=(0, 1)))
  one.set_state(states)
  for _ in range(2):
    batch, parts = next(one), [next(h) for h in halves]
    for key, value in batch.items():
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), value)


@pytest.mark.parametrize("input_shards,process_count,message", [
    (3, 1, r"data\.input_shards \(3\) must divide the batch size \(4\)"),
    (1, 2, r"data\.input_shards \(1\) must be a multiple of the process count \(2\)"),
    (0, 1, r"data\.input_shards must be an integer >= 1"),
])
def test_bad_input_shards_name_the_field(tfds_dir, input_shards, process_count, message):
  with pytest.raises(ValueError, match=message):
    data.make_dataset(_spec(tfds_dir, input_shards=input_shards), process=(0, process_count))


def test_unknown_text_key_names_the_field(tfds_dir):
  with pytest.raises(ValueError, match="data.text_key"):
    data.make_dataset(_spec(tfds_dir, text_key="body"))


def test_sentencepiece_tokenizer_counts_bytes(tfds_dir, tmp_path):
  """A SentencePiece model trained on stdlib text: round trip, and token_bytes sums
  to the UTF-8 length of the text (the '▁' word marker counts as the space).
  Code needs whitespace kept: identity normalisation, no dummy prefix."""
  import sentencepiece  # pylint: disable=g-import-not-at-top
  source = builders.load("stdlib_text", tfds_dir).as_data_source("validation")
  corpus = tmp_path / "corpus.txt"
  corpus.write_bytes(b"\n".join(source[i]["text"] for i in range(20)))
  prefix = str(tmp_path / "sp")
  sentencepiece.SentencePieceTrainer.train(
      input=str(corpus), model_prefix=prefix, vocab_size=600, model_type="bpe",
      pad_id=0, unk_id=3, bos_id=1, eos_id=2, minloglevel=2, byte_fallback=True,
      normalization_rule_name="identity", remove_extra_whitespaces=False,
      add_dummy_prefix=False)
  tok = data.tokenizer("sentencepiece", prefix + ".model")
  assert tok.vocab_size == 600 and (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  text = "def add(a, b):\n    return a + b"
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert int(np.sum(tok.token_bytes(ids))) == len(text.encode())
  spec = _spec(tfds_dir, name="stdlib_text", split="validation", shuffle=False)
  batch = next(iter(data.make_dataset(spec, tok)))
  assert batch["tokens"].max() < 600

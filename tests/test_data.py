"""Tokenizers, the embedded TFDS builders and the grain pipeline."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from moejax import data
from moejax.data import builders, pipeline, stdlib_text, synthetic_domains


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


def test_eval_pass_reads_every_token_once(tfds_dir):
  """Without shuffling, the pipeline packs each validation document exactly once."""
  spec = _spec(tfds_dir, split="validation", shuffle=False, seq_len=255, batch_size=8)
  source = builders.load("synthetic_domains", tfds_dir).as_data_source("validation")
  expected = sum(len(source[i]["text"]) + 2 for i in range(len(source)))  # + bos, eos
  seen = sum(int(np.sum(b["tokens_segment_ids"] > 0)) for b in data.make_dataset(spec))
  assert seen == expected


def test_processes_read_disjoint_shards(tfds_dir, monkeypatch):
  rows = {}
  for index in range(2):
    monkeypatch.setattr(pipeline, "_process_slice", lambda index=index: (index, 2))
    spec = _spec(tfds_dir, split="validation", shuffle=False, seq_len=1023, batch_size=1)
    rows[index] = {b["tokens"][0, :40].tobytes() for b in data.make_dataset(spec)}
  assert rows[0] and rows[1] and not rows[0] & rows[1]


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

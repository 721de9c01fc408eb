"""Tokenizers: bytes by default, a SentencePiece model as an option.

Both give ids in [0, vocab_size) with pad = 0 and expose `token_bytes(ids)`, the
number of UTF-8 bytes each token stands for, so that evaluation reports bits per
byte whatever the tokenizer.
"""
from __future__ import annotations

from typing import Optional, Union

import numpy as np

Text = Union[str, bytes, np.ndarray]


def _as_bytes(text: Text) -> bytes:
  if isinstance(text, str):
    return text.encode("utf-8")
  if isinstance(text, np.ndarray):
    if text.dtype == np.uint8:
      return text.tobytes()
    return text.item() if text.ndim == 0 else bytes(text.tolist())
  return bytes(text)


class ByteTokenizer:
  """UTF-8 bytes as tokens: pad 0, bos 1, eos 2, byte b -> b + 3 (V = 259)."""

  pad_id, bos_id, eos_id, offset = 0, 1, 2, 3
  vocab_size = 259

  def encode(self, text: Text) -> np.ndarray:
    return np.frombuffer(_as_bytes(text), dtype=np.uint8).astype(np.int32) + self.offset

  def decode(self, ids) -> str:
    ids = np.asarray(ids)
    data = (ids[ids >= self.offset] - self.offset).astype(np.uint8).tobytes()
    return data.decode("utf-8", errors="replace")

  def token_bytes(self, ids: np.ndarray) -> np.ndarray:
    """1 for byte tokens, 0 for pad, bos and eos."""
    return (np.asarray(ids) >= self.offset).astype(np.int32)


class SentencePieceTokenizer:
  """A trained SentencePiece model file; needs the `sentencepiece` package."""

  def __init__(self, model_path: str):
    try:
      import sentencepiece  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError("data.tokenizer='sentencepiece' needs `pip install sentencepiece`") from e
    self._sp = sentencepiece.SentencePieceProcessor(model_file=model_path)
    self.vocab_size = self._sp.get_piece_size()
    self.pad_id = max(self._sp.pad_id(), 0)
    self.bos_id = self._sp.bos_id()
    self.eos_id = self._sp.eos_id()
    pieces = [self._sp.id_to_piece(i) for i in range(self.vocab_size)]
    # Control and unknown pieces stand for no text, byte-fallback pieces (<0x0A>)
    # for one byte, others for their UTF-8 length with '▁' as one space.
    self._bytes = np.array(
        [0 if self._sp.is_control(i) or self._sp.is_unknown(i)
         else 1 if self._sp.is_byte(i)
         else len(p.replace("\u2581", " ").encode("utf-8")) for i, p in enumerate(pieces)],
        np.int32)

  def encode(self, text: Text) -> np.ndarray:
    return np.asarray(self._sp.encode(_as_bytes(text).decode("utf-8", errors="replace")),
                      np.int32)

  def decode(self, ids) -> str:
    return self._sp.decode([int(i) for i in np.asarray(ids) if i != self.pad_id])

  def token_bytes(self, ids: np.ndarray) -> np.ndarray:
    return self._bytes[np.asarray(ids)]


def create(name: str = "byte", model_path: Optional[str] = None):
  """`byte`, or `sentencepiece` with `model_path`."""
  if name == "byte":
    return ByteTokenizer()
  if name == "sentencepiece":
    if not model_path:
      raise ValueError("data.tokenizer='sentencepiece' needs data.tokenizer_model (a .model file)")
    return SentencePieceTokenizer(model_path)
  raise ValueError(f"data.tokenizer must be 'byte' or 'sentencepiece', got {name!r}")

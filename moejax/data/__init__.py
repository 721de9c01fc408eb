"""Data: TFDS builders of the embedded corpora, tokenizers and the grain pipeline.

Needs the `data` extra (tensorflow-datasets, array-record, grain); the core of
moejax does not import this package.
"""
from moejax.data.builders import EMBEDDED, DatasetNotReady, load, prepare
from moejax.data.pipeline import PipelineSpec, make_dataset
from moejax.data.tokenizer import ByteTokenizer, SentencePieceTokenizer, create as tokenizer

__all__ = ["EMBEDDED", "ByteTokenizer", "DatasetNotReady", "PipelineSpec",
           "SentencePieceTokenizer", "load", "make_dataset", "prepare", "tokenizer"]

"""Finding, preparing and opening TFDS datasets in array_record format.

The two embedded datasets (`stdlib_text`, `synthetic_domains`) are built here on
first use. Any other TFDS dataset (lm1b, wikitext, c4, or one of your own) must
already be prepared in `data_dir` with `--file_format=array_record`; if it is
not, `load` raises DatasetNotReady with the one command that prepares it.
"""
from __future__ import annotations

import importlib
import os
import sys
import time

EMBEDDED = {
    "stdlib_text": "moejax.data.stdlib_text",
    "synthetic_domains": "moejax.data.synthetic_domains",
}


class DatasetNotReady(RuntimeError):
  """A dataset that is not prepared (or not in array_record format)."""


def _prepare_hint(name: str, data_dir: str) -> str:
  return (f"prepare it with: tfds build {name} --data_dir={data_dir} "
          "--file_format=array_record")


def load(name: str, data_dir: str, prepare: bool = True):
  """The TFDS builder of `name` in `data_dir`, prepared.

  Raises:
    DatasetNotReady: unknown name, not prepared, or not array_record.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = os.path.abspath(os.path.expanduser(data_dir))
  if name.split("/")[0].split(":")[0] in EMBEDDED:
    importlib.import_module(EMBEDDED[name.split("/")[0].split(":")[0]])
  try:
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  except tfds.core.registered.DatasetNotFoundError:
    raise DatasetNotReady(f"dataset {name!r} is neither a TFDS builder nor prepared in "
                          f"{data_dir}; {_prepare_hint(name, data_dir)}") from None
  if not builder.is_prepared():
    if not (prepare and name.split("/")[0] in EMBEDDED):
      raise DatasetNotReady(f"dataset {name!r} is not prepared in {data_dir}; "
                            f"{_prepare_hint(name, data_dir)}")
    start = time.time()
    print(f"preparing {name} in {data_dir} (first use) ...", file=sys.stderr, flush=True)
    builder.download_and_prepare(file_format="array_record")
    print(f"prepared {name} in {time.time() - start:.0f} s: " + ", ".join(
        f"{s} {v.num_examples} examples" for s, v in builder.info.splits.items()),
          file=sys.stderr, flush=True)
  file_format = str(getattr(builder.info.file_format, "value", builder.info.file_format))
  if "array_record" not in file_format:
    raise DatasetNotReady(f"dataset {name!r} in {data_dir} is stored as {file_format}, "
                          f"not array_record; {_prepare_hint(name, data_dir)}")
  return builder


def data_source(builder, split: str):
  """Random-access source of one split (or TFDS slice, e.g. 'train[:1%]')."""
  return builder.as_data_source(split=split)


def prepare(name: str, data_dir: str):
  """Builds an embedded dataset in data_dir (no-op when already prepared)."""
  return load(name, data_dir, prepare=True)

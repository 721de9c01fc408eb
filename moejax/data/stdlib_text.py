"""TFDS builder `stdlib_text`: the Python standard library's source files as text.

Every machine with Python has it: tens of MB of real English (comments,
docstrings) and code, no download. One example per `.py` file under the running
interpreter's stdlib directory (site-packages excluded):

  text    the file's contents (UTF-8, undecodable bytes replaced)
  path    the path relative to the stdlib directory
  domain  the top-level module (`json/decoder.py` -> `json`, `os.py` -> `os`)

Split by a hash of the path, so it is stable across machines and runs: about 5%
of files go to `validation`, the rest to `train`. Which files exist depends on
the Python version; the builder's version string records it.

  python -c "import moejax.data; moejax.data.prepare('stdlib_text', 'DATA_DIR')"
"""
from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from typing import Iterator

import tensorflow_datasets as tfds

VALIDATION_PERCENT = 5


def stdlib_dir() -> str:
  return sysconfig.get_paths()["stdlib"]


def source_files(root: str) -> list[str]:
  """Sorted relative paths of the stdlib's .py files, site-packages excluded."""
  paths = []
  for directory, subdirs, files in os.walk(root):
    subdirs[:] = sorted(d for d in subdirs if d not in ("site-packages", "__pycache__"))
    for name in files:
      if name.endswith(".py"):
        paths.append(os.path.relpath(os.path.join(directory, name), root))
  return sorted(paths)


def domain_of(path: str) -> str:
  top = path.split(os.sep)[0]
  return top[:-3] if top.endswith(".py") else top


def split_of(path: str) -> str:
  bucket = int(hashlib.sha256(path.encode("utf-8")).hexdigest(), 16) % 100
  return "validation" if bucket < VALIDATION_PERCENT else "train"


class StdlibText(tfds.core.GeneratorBasedBuilder):
  """Source files of the Python standard library, labelled by top-level module."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Python stdlib .py files, split by path hash."}

  def _info(self) -> tfds.core.DatasetInfo:
    domains = sorted({domain_of(p) for p in source_files(stdlib_dir())})
    return self.dataset_info_from_configs(
        description=(f"Python {sys.version_info.major}.{sys.version_info.minor} standard "
                     "library source files"),
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "path": tfds.features.Text(),
            "domain": tfds.features.ClassLabel(names=domains),
        }),
        supervised_keys=None,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in ("train", "validation")}

  def _generate_examples(self, split: str) -> Iterator[tuple[str, dict]]:
    root = stdlib_dir()
    for path in source_files(root):
      if split_of(path) != split:
        continue
      with open(os.path.join(root, path), "rb") as f:
        text = f.read().decode("utf-8", errors="replace")
      yield path, {"text": text, "path": path, "domain": domain_of(path)}

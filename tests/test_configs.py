"""Every config in configs/ validates and builds its model."""
from __future__ import annotations

import glob
import os

import pytest

from moejax.train import setup

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
CONFIGS = sorted(p for p in glob.glob(os.path.join(CONFIG_DIR, "*.py"))
                 if not os.path.basename(p).startswith("_"))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_is_valid_and_documented(path):
  config = setup.config_from_file(path)
  setup.check(config)
  model = setup.build_model(config)
  assert model.vocab_size == 259
  text = open(path, encoding="utf-8").read()
  assert "python -m moejax.main --config=configs/" in text   # how to run it
  assert "Expected" in text                                   # what to expect


def test_dense_tiny_matches_lm_tiny_active_width():
  moe = setup.config_from_file(os.path.join(CONFIG_DIR, "lm_tiny.py"))
  dense = setup.config_from_file(os.path.join(CONFIG_DIR, "dense_tiny.py"))
  assert setup.build_model(dense).moe is None
  assert dense.model.mlp_dim == moe.moe.top_k * moe.moe.hidden_dim
  for section in ("data", "train"):
    assert dense[section].to_dict() == moe[section].to_dict()

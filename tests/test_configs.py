"""Every config in configs/ validates and builds its model."""
from __future__ import annotations

import glob
import os

import pytest

from moejax.train import setup

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
CONFIGS = sorted(p for p in glob.glob(os.path.join(CONFIG_DIR, "*.py"))
                 if not os.path.basename(p).startswith("_"))
BALANCE = os.path.join(CONFIG_DIR, "balance.py")


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_is_valid_and_documented(path):
  config = setup.config_from_file(path)
  setup.check(config, num_devices=1)
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


def _balance(method):
  return setup.config_from_file(f"{BALANCE}:{method}")


@pytest.mark.parametrize("method", ["none", "switch_microbatch", "switch_global",
                                    "switch_sequence", "aux_free", "aux_free_sequence", "erc"])
def test_every_balance_method_is_valid_and_documented(method):
  config = _balance(method)
  setup.check(config, num_devices=1)
  with pytest.raises(ValueError, match=r"mesh\.data \* mesh\.expert = 8"):   # 4-row micro-batches
    setup.check(config, num_devices=8)
  assert f"  {method} " in open(BALANCE, encoding="utf-8").read()
  assert config.train.num_microbatches == 4


def test_balance_methods_set_what_they_name():
  weights = lambda m: _balance(m).moe.loss_weights
  topk = lambda m: _balance(m).moe.topk
  assert weights("none").switch == 0 and weights("none").z == 0
  for scope in ("microbatch", "global", "sequence"):
    assert topk(f"switch_{scope}").balance_scope == scope and weights(f"switch_{scope}").switch > 0
  assert topk("aux_free").aux_free and weights("aux_free").switch == 0
  assert topk("aux_free").score == "softmax"
  # DeepSeek-V3: sigmoid gates, bias, and a small sequence-wise loss.
  deepseek = _balance("aux_free_sequence")
  assert deepseek.moe.topk.aux_free and deepseek.moe.topk.score == "sigmoid"
  assert deepseek.moe.topk.balance_scope == "sequence" and deepseek.moe.loss_weights.switch == 1e-4
  assert weights("erc").erc > 0 and topk("erc").balance_scope == "microbatch"
  with pytest.raises(ValueError, match="balance method"):
    _balance("switch_batch")


@pytest.mark.parametrize("arm", ["topk", "recurrent", "similarity", "attention_aware", "coe",
                                 "rexmoe"])
def test_every_router_zoo_2_arm_runs_two_expert_rows_per_token(arm):
  path = os.path.join(CONFIG_DIR, "router_zoo_2.py")
  config = setup.config_from_file(f"{path}:{arm}")
  setup.check(config, num_devices=1)
  model = setup.build_model(config)
  assert model.moe.top_k * model.moe.chain == 2 and model.moe.num_experts == 8
  assert (model.expert_reuse, model.moe.chain) == {"rexmoe": (2, 1), "coe": (1, 2)}.get(
      arm, (1, 1))
  assert f"  {arm} " in open(path, encoding="utf-8").read()
  with pytest.raises(ValueError, match="arm must be one of"):
    setup.config_from_file(f"{path}:nothing")

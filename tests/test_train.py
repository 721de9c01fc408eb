"""End-to-end training: learning, determinism, kill and resume, data parallelism,
datasets by name, and start-up errors."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from moejax.train import setup, train
from tests.helpers import main_command, subprocess_env, tiny_config, train_losses
from tests.test_resume import assert_logs_hold_each_step_once

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



@pytest.fixture(scope="module")
def seed0_run(tfds_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("seed0"))
  evaluation = train(tiny_config(tfds_dir), workdir, progress=False)
  return workdir, evaluation


def test_loss_decreases_and_run_leaves_its_outputs(seed0_run):
  workdir, evaluation = seed0_run
  losses = train_losses(workdir)
  assert sorted(losses) == list(range(1, 21))
  # Initial loss is about ln(259) = 5.56 nats (uniform over the byte vocabulary).
  assert 5.0 < losses[1] < 6.5
  assert np.mean([losses[s] for s in (18, 19, 20)]) < losses[1] - 1.0
  assert evaluation["loss"] < losses[1]
  assert evaluation["bits_per_byte"] > 0
  for name in ("routing_report.md", "routing_load.png", "metrics.jsonl", "tensorboard"):
    assert os.path.exists(os.path.join(workdir, name)), name
  report = open(os.path.join(workdir, "routing_report.md"), encoding="utf-8").read()
  assert "layer_0" in report and "layer_1" in report and "bits per byte" in report
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "20"]


def test_run_logs_the_load_and_specialisation_metrics(seed0_run):
  workdir, evaluation = seed0_run
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  train_record = [r for r in records if r["split"] == "train"][-1]
  for layer in ("layer_0", "layer_1"):
    # Per-expert load of one step: 8 rows * 32 tokens * K = 2 assignments over E = 4.
    load = train_record[f"layers/{layer}/load"]
    assert len(load) == 4 and sum(load) == 8 * 32 * 2
    mean = sum(load) / 4
    np.testing.assert_allclose(train_record[f"layers/{layer}/step_max_violation"],
                               (max(load) - mean) / mean, rtol=1e-5)
    for key in ("max_violation", "load_cv", "router_entropy", "router_marginal_entropy",
                "loss_switch", "loss_z"):
      assert np.isfinite(train_record[f"layers/{layer}/{key}"]), key
    # synthetic_domains is labelled: I(domain; expert) in [0, log 8] nats (0 here
    # when the 16 evaluated rows, read in order, hold a single document).
    assert 0.0 <= evaluation["layers"][layer]["domain_expert_mi"] <= np.log(8)
  for key in ("mean_max_violation", "mean_step_max_violation", "mean_load_cv"):
    assert key in train_record
  report = open(os.path.join(workdir, "routing_report.md"), encoding="utf-8").read()
  assert "MI(domain; expert)" in report


def test_rerunning_a_finished_run_evaluates_it_again(seed0_run, tfds_dir, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "copy")
  shutil.copytree(seed0_run[0], workdir)
  before = len(open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8").readlines())
  evaluation = train(tiny_config(tfds_dir, **{"train.eval_batches": 4}), workdir,
                     progress=False)
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  assert len(records) == before             # no training; the evaluation at 20 replaced
  assert [r["step"] for r in records if r["split"] == "eval"] == [10, 20]
  assert records[-1]["split"] == "eval" and records[-1]["step"] == 20
  # Four batches of 8 rows x 32 targets, against the run's own two (targets that
  # cross a document boundary are not counted).
  assert records[-1]["tokens"] == evaluation["tokens"]
  assert 2 * 256 < evaluation["tokens"] <= 4 * 256 and seed0_run[1]["tokens"] <= 2 * 256


def test_other_seed_other_losses(seed0_run, tfds_dir, tmp_path):
  """Another seed gives other losses at every step. That the same seed gives the same
  losses is checked by test_killed_run_resumes_with_identical_losses, whose straight
  and killed runs agree from step 1."""
  workdir, _ = seed0_run
  first = train_losses(workdir)
  other = str(tmp_path / "other")
  train(tiny_config(tfds_dir, seed=1), other, progress=False)
  assert all(train_losses(other)[s] != first[s] for s in range(1, 21))


@pytest.mark.slow
def test_killed_run_resumes_with_identical_losses(tfds_dir, tmp_path):
  """With the aux-free bias on (a large rate, so routing depends on it), identical
  losses after the resume also show that the `routing` collection was restored.
  The steps logged after the last checkpoint are dropped and logged again: each
  step appears once in metrics.jsonl and in TensorBoard, as in the straight run."""
  overrides = {"train.steps": 24, "train.checkpoint_every": 5, "train.eval_every": 24,
               "moe.topk.aux_free": True, "moe.topk.bias_rate": 0.05}
  straight = str(tmp_path / "straight")
  subprocess.run(main_command(straight, tfds_dir, **overrides), env=subprocess_env(),
                 cwd=REPO, check=True, capture_output=True)
  killed = str(tmp_path / "killed")
  command = main_command(killed, tfds_dir, **overrides)
  process = subprocess.Popen(command, env=subprocess_env(), cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  metrics = os.path.join(killed, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and process.poll() is None:
    if os.path.exists(metrics) and max(train_losses(killed), default=0) >= 8:
      process.send_signal(signal.SIGKILL)
      break
    time.sleep(0.02)
  assert process.wait() == -signal.SIGKILL, "the run ended before it could be killed"
  interrupted_at = max(train_losses(killed))
  assert interrupted_at < 24
  resumed = subprocess.run(command, env=subprocess_env(), cwd=REPO, check=True,
                           capture_output=True, text=True)
  assert "resumed from checkpoint at step" in resumed.stderr
  want, got = train_losses(straight), train_losses(killed)
  assert sorted(got) == list(range(1, 25))
  assert all(got[s] == want[s] for s in range(1, 25)), [
      (s, got[s], want[s]) for s in range(1, 25) if got[s] != want[s]]
  assert_logs_hold_each_step_once(killed, {"train": list(range(1, 25)), "eval": [24]},
                                  reference=straight)


TINY_BUILDER = """
import tensorflow_datasets as tfds


class LocalTinyText(tfds.core.GeneratorBasedBuilder):
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(40), "validation": self._generate_examples(8)}

  def _generate_examples(self, count):
    for i in range(count):
      yield i, {"text": f"example {i}: " + "the quick brown fox " * (i % 5 + 1)}
"""


def test_trains_from_a_local_tfds_dataset_by_name(tmp_path):
  """A user's own TFDS dataset, prepared by its own code in another process; the
  trainer, which has never seen that code, finds the files by name."""
  package = tmp_path / "tinytext"
  package.mkdir()
  (package / "__init__.py").write_text(TINY_BUILDER)
  data_dir = str(tmp_path / "tfds")
  env = subprocess_env()
  env["PYTHONPATH"] = str(tmp_path) + os.pathsep + env["PYTHONPATH"]
  subprocess.run([sys.executable, "-c",
                  "import tinytext; tinytext.LocalTinyText(data_dir=%r)"
                  ".download_and_prepare(file_format='array_record')" % data_dir],
                 env=env, check=True, capture_output=True)
  workdir = str(tmp_path / "run")
  overrides = {"train.steps": 4, "train.eval_every": 4, "train.checkpoint_every": 4,
               "data.domain_key": ""}
  result = subprocess.run(main_command(workdir, data_dir, name="local_tiny_text", **overrides),
                          env=subprocess_env(), cwd=REPO, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-2000:]
  assert sorted(train_losses(workdir)) == [1, 2, 3, 4]


# The command line's path from a bad field to one line and exit status 1, for a
# trainer field and a router's own field; test_setup_check_names_the_field covers
# the fields in-process.
@pytest.mark.parametrize("flag,field", [
    ("--config.train.batch_size=0", "train.batch_size"),
    ("--config.moe.topk.score=relu", "score"),
])
def test_bad_config_fails_at_start_with_the_field(flag, field, tfds_dir, tmp_path):
  command = main_command(str(tmp_path), tfds_dir) + [flag]
  result = subprocess.run(command, env=subprocess_env(), cwd=REPO, capture_output=True,
                          text=True)
  assert result.returncode != 0
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("config error:") and field in last, result.stderr[-1000:]
  assert "Traceback" not in result.stderr


def test_missing_dataset_is_one_line(tmp_path):
  empty = str(tmp_path / "empty")
  command = main_command(str(tmp_path / "run"), empty, name="lm1b")
  result = subprocess.run(command, env=subprocess_env(), cwd=REPO, capture_output=True,
                          text=True)
  assert result.returncode != 0 and "Traceback" not in result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("data error:") and "tfds build lm1b" in last


@pytest.mark.parametrize("overrides,field", [
    ({"train.batch_size": 6, "train.num_microbatches": 4}, "train.num_microbatches"),
    ({"train.num_microbatches": 3}, "train.num_microbatches"),
    ({"moe.top_k": 9}, "top_k"),
    ({"model.dtype": "float8"}, "model.dtype"),
    ({"train.probe_every": -1}, "train.probe_every"),
    ({"mesh.expert": 3}, "mesh.expert"),
    ({"train.learning_rate": 0.0}, "train.learning_rate"),
    ({"data.seq_len": 0}, "data.seq_len"),
    ({"moe.num_experts": 0}, "num_experts"),
    ({"model.num_heads": 5}, "model.num_heads"),
    ({"data.input_shards": 3}, "data.input_shards"),
    ({"data.input_shards": 16}, "data.input_shards"),
    ({"moe.chain": 0}, "moe.chain"),
    ({"model.expert_reuse": 3}, "model.expert_reuse"),
    ({"moe.router": "rexmoe", "moe.rexmoe.psr_steps": -1}, "moe.rexmoe.psr_steps"),
    ({"moe.router": "similarity", "moe.similarity.mix": 2.0}, "moe.similarity.mix"),
])
def test_setup_check_names_the_field(overrides, field):
  with pytest.raises(ValueError, match=field.replace(".", r"\.")):
    setup.check(tiny_config("/nonexistent", **overrides))


def test_input_shards_must_be_a_multiple_of_the_process_count():
  config = tiny_config("/nonexistent", **{"data.input_shards": 2})
  setup.check(config, num_devices=8, num_processes=2)
  with pytest.raises(ValueError, match=r"data\.input_shards \(2\) must be a multiple of "
                                       r"the process count \(4\)"):
    setup.check(config, num_devices=8, num_processes=4)


def test_data_position_saved_by_two_processes_restores_in_one(tfds_dir, tmp_path):
  """Each process writes the positions of its own input shards; one process that
  reads all shards restores them and continues with the same global batches. A
  checkpoint of another shard count fails naming data.input_shards."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  from moejax.data import make_dataset  # pylint: disable=g-import-not-at-top
  from moejax.train import checkpoints  # pylint: disable=g-import-not-at-top
  config = tiny_config(tfds_dir, **{"data.input_shards": 4})
  spec = setup.pipeline_spec(config, "train", training=True)
  handler, directory = checkpoints.InputShardsHandler(), epath.Path(tmp_path)
  halves = [iter(make_dataset(spec, process=(i, 2))) for i in range(2)]
  for half in halves:
    next(half)
    handler.save(directory, checkpoints.InputShardsSave(half))
  assert sorted(p.name for p in directory.iterdir()) == [
      f"shard_0000{s}-of-00004.json" for s in range(4)]
  one = handler.restore(directory, checkpoints.InputShardsRestore(
      iter(make_dataset(spec, process=(0, 1)))))
  batch, parts = next(one), [next(half) for half in halves]
  for key, value in batch.items():
    np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), value)
  other = setup.pipeline_spec(tiny_config(tfds_dir, **{"data.input_shards": 2}), "train",
                              training=True)
  with pytest.raises(ValueError, match=r"data\.input_shards: .* no position for input shard 0 "
                                       r"of 2"):
    handler.restore(directory, checkpoints.InputShardsRestore(iter(make_dataset(other))))


def test_gradient_accumulation_equals_the_full_batch(tfds_dir):
  """Four micro-batches give the full batch's loss and update. The switch loss is
  weighted 0: at micro-batch scope it is computed per micro-batch by definition."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from moejax.data import make_dataset  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from moejax.train.state import TrainState  # pylint: disable=g-import-not-at-top
  from moejax.train.step import make_train_step  # pylint: disable=g-import-not-at-top

  config = tiny_config(tfds_dir, **{"moe.loss_weights.switch": 0.0})
  model = setup.build_model(config)
  # Plain SGD, so that parameter updates compare gradients (Adam's first step,
  # about lr * sign(g), would magnify rounding in near-zero gradients).
  tx = optax.sgd(1.0)
  batch = next(iter(make_dataset(setup.pipeline_spec(config, "train", training=True))))
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0),
                                             jnp.asarray(batch["tokens"][:, :-1]))["params"])
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     opt_state=tx.init(params), routing={})
  results = {m: jax.jit(make_train_step(model, tx, m))(state, batch, jax.random.PRNGKey(1))
             for m in (1, 4)}
  (full, full_metrics) = results[1]
  for m in (4,):
    state_m, metrics_m = results[m]
    np.testing.assert_allclose(metrics_m["loss"], full_metrics["loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics_m["grad_norm"], full_metrics["grad_norm"], rtol=1e-5)
    for a, b, p in zip(jax.tree_util.tree_leaves(state_m.params),
                       jax.tree_util.tree_leaves(full.params),
                       jax.tree_util.tree_leaves(params)):
      np.testing.assert_allclose(a - p, b - p, rtol=1e-4, atol=1e-7)

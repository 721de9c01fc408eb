"""Runs that survive damage and mistakes: unreadable checkpoints are moved aside and
the newest readable one is used, unfinished saves are ignored, a config that does
not fit the workdir's checkpoints stops the run naming the fields, and a workdir
that cannot hold the run stops it before any data or model work."""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess

import pytest

from moejax.train import train
from moejax.train import workdir as workdirs
from moejax.train.errors import CheckpointError, ConfigError, WorkdirError
from tests.helpers import main_command, subprocess_env, tiny_config, train_losses

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Reports of TensorStore reads that a failed restore abandoned are dropped, not shown.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")

# 20 steps, checkpoints every 5 and keep 2: the workdir ends with checkpoints 15 and 20.
RUN = {"train.steps": 20, "train.checkpoint_every": 5, "train.eval_every": 20,
       "train.keep_checkpoints": 2}

# Train state of tiny_config, 4-byte floats: embedding 259 x 32 = 8288 (tied), final
# norm 32; per block attention q, k, v 32 x 2 x 16 and out 2 x 16 x 32 = 4096, two
# norms 64, router 32 x 4 = 128, experts 3 x 4 x 32 x 32 = 12288; two blocks: 33152.
# 41472 parameters, times 3 with Adam's mu and nu = 124416 floats = 497664 bytes, plus
# three int32 counters (step, Adam's count, the schedule's count) = 497676 bytes.
STATE_BYTES = 497676


def config(tfds_dir, **overrides):
  return tiny_config(tfds_dir, **{**RUN, **overrides})


@pytest.fixture(scope="module")
def finished(tfds_dir, tmp_path_factory):
  """An uninterrupted run: its workdir and its losses by step."""
  workdir = str(tmp_path_factory.mktemp("finished") / "run")
  train(config(tfds_dir), workdir, progress=False)
  return workdir, train_losses(workdir)


def copy_of(finished, tmp_path) -> str:
  workdir = str(tmp_path / "run")
  shutil.copytree(finished[0], workdir)
  return workdir


def files_of(directory: str) -> list[tuple[str, int]]:
  """(path relative to `directory`, size) of every file under it."""
  return sorted((os.path.relpath(os.path.join(root, name), directory),
                 os.path.getsize(os.path.join(root, name)))
                for root, _, names in os.walk(directory) for name in names)


def listing(workdir: str) -> dict[str, list[str]]:
  return {name: sorted(os.listdir(os.path.join(workdir, name)))
          for name in ("checkpoints", "checkpoints_unreadable")
          if os.path.isdir(os.path.join(workdir, name))}


def truncate_tensor_files(step_dir: str) -> None:
  """Cuts every data file of the state to half its size. (Which arrays one file holds
  varies from save to save; halving only the largest did not always break a
  restore.)"""
  files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
  assert files
  for path in files:
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)


def empty_tree_metadata(step_dir: str) -> None:
  open(os.path.join(step_dir, "state", "_METADATA"), "w").close()


def remove_data_item(step_dir: str) -> None:
  shutil.rmtree(os.path.join(step_dir, "data"))


@pytest.mark.parametrize("damage,reason", [
    (truncate_tensor_files, "is not valid for value of size"),
    (empty_tree_metadata, "state/_METADATA is empty"),
    (remove_data_item, "data is missing"),
])
def test_unreadable_latest_checkpoint_is_moved_aside_and_the_previous_one_used(
    damage, reason, finished, tfds_dir, tmp_path, capsys):
  workdir = copy_of(finished, tmp_path)
  damage(os.path.join(workdir, "checkpoints", "20"))
  damaged = files_of(os.path.join(workdir, "checkpoints", "20"))
  capsys.readouterr()
  train(config(tfds_dir), workdir, progress=False)
  err = capsys.readouterr().err
  warnings = [line for line in err.splitlines() if line.startswith("warning:")]
  aside = os.path.join(workdir, "checkpoints_unreadable", "20")
  assert len(warnings) == 1 and "checkpoint 20" in warnings[0] and reason in warnings[0]
  assert f"moved to {aside}; resuming from checkpoint 15" in warnings[0]
  assert "resumed from checkpoint at step 15" in err and "Traceback" not in err
  # Steps 16..20 trained again compute the uninterrupted run's losses.
  losses = train_losses(workdir)
  assert [losses[s] for s in range(16, 21)] == [finished[1][s] for s in range(16, 21)]
  # The damaged checkpoint is kept aside as it was; step 20 is saved anew.
  assert listing(workdir) == {"checkpoints": ["15", "20"], "checkpoints_unreadable": ["20"]}
  assert files_of(aside) == damaged


def test_save_killed_midway_leaves_the_previous_checkpoint_latest(
    finished, tfds_dir, tmp_path, capsys):
  """Orbax writes step 20 as 20.orbax-checkpoint-tmp and renames it when done: a
  run killed before the rename leaves that directory, which the step listing
  ignores (here half written: no data item, no commit file)."""
  workdir = copy_of(finished, tmp_path)
  checkpoints = os.path.join(workdir, "checkpoints")
  unfinished = os.path.join(checkpoints, "20.orbax-checkpoint-tmp")
  os.rename(os.path.join(checkpoints, "20"), unfinished)
  shutil.rmtree(os.path.join(unfinished, "data"))
  os.remove(os.path.join(unfinished, "commit_success.txt"))
  capsys.readouterr()
  train(config(tfds_dir), workdir, progress=False)
  err = capsys.readouterr().err
  assert f"warning: {unfinished} is a save that did not finish" in err
  assert "resumed from checkpoint at step 15" in err and "Traceback" not in err
  losses = train_losses(workdir)
  assert [losses[s] for s in range(16, 21)] == [finished[1][s] for s in range(16, 21)]
  assert listing(workdir) == {"checkpoints": ["15", "20"]}   # replaced by the new save


def test_no_readable_checkpoint_stops_in_one_line_and_moves_nothing(
    finished, tfds_dir, tmp_path):
  workdir = copy_of(finished, tmp_path)
  empty_tree_metadata(os.path.join(workdir, "checkpoints", "20"))
  truncate_tensor_files(os.path.join(workdir, "checkpoints", "15"))
  before = listing(workdir)
  with pytest.raises(CheckpointError) as error:
    train(config(tfds_dir), workdir, progress=False)
  message = str(error.value)
  assert "\n" not in message
  assert message.startswith(f"no checkpoint in {os.path.join(workdir, 'checkpoints')} can be "
                            "restored (step 20: state/_METADATA is empty; step 15: ")
  assert "nothing was moved" in message
  assert listing(workdir) == before == {"checkpoints": ["15", "20"]}


def test_config_json_is_written_at_the_first_start(finished, tfds_dir):
  with open(os.path.join(finished[0], "config.json"), encoding="utf-8") as f:
    saved = json.load(f)
  assert saved["moe"]["num_experts"] == 4 and saved["train"]["steps"] == 20
  assert sorted(n for n in os.listdir(finished[0]) if n.startswith("config.json")) == [
      "config.json"]


def test_config_that_changes_the_state_shapes_stops_naming_the_fields(
    finished, tfds_dir, tmp_path):
  workdir = copy_of(finished, tmp_path)
  before = listing(workdir)
  with pytest.raises(ConfigError) as error:
    train(config(tfds_dir, **{"moe.num_experts": 8, "moe.engine": "einsum"}), workdir,
          progress=False)
  message = str(error.value)
  assert "\n" not in message
  assert f"does not fit the checkpoints in {workdir}: moe.num_experts 4 -> 8 (" in message
  assert "engine" not in message and "use a new workdir" in message
  assert listing(workdir) == before       # a config change is not damage: nothing moved


def test_entry_point_reports_the_mismatch_in_one_line(finished, tfds_dir, tmp_path):
  workdir = copy_of(finished, tmp_path)
  result = subprocess.run(main_command(workdir, tfds_dir, **{**RUN, "moe.num_experts": 8}),
                          env=subprocess_env(), cwd=REPO, capture_output=True, text=True)
  assert result.returncode == 1
  assert result.stderr.splitlines() == [
      f"config error: the config does not fit the checkpoints in {workdir}: moe.num_experts "
      f"4 -> 8 (the state's shapes change); use a new workdir, or the config saved in "
      f"{os.path.join(workdir, 'config.json')}"]


def test_shape_fields_are_those_whose_value_changes_the_state(tfds_dir):
  base = config(tfds_dir)
  saved = json.loads(json.dumps(base.to_dict()))
  cases = [({"moe.engine": "einsum", "data.seq_len": 64, "moe.loss_weights.switch": 0.1},
            []),
           ({"moe.num_experts": 8, "moe.engine": "einsum"}, [("moe.num_experts", 4, 8)]),
           ({"moe.topk.aux_free": True}, [("moe.topk.aux_free", False, True)]),
           ({"model.num_layers": 3, "train.steps": 40}, [("model.num_layers", 2, 3)])]
  for overrides, expected in cases:
    changed = config(tfds_dir, **overrides)
    assert workdirs.shape_fields(changed, saved, workdirs.state_shapes(changed)) == expected


def test_workdir_without_config_json_is_checked_against_the_stored_shapes(
    finished, tfds_dir, tmp_path):
  workdir = copy_of(finished, tmp_path)
  os.remove(os.path.join(workdir, "config.json"))
  before = listing(workdir)
  with pytest.raises(ConfigError) as error:
    train(config(tfds_dir, **{"moe.num_experts": 8}), workdir, progress=False)
  message = str(error.value)
  assert "\n" not in message
  assert message.startswith(
      f"checkpoint 20 in {os.path.join(workdir, 'checkpoints')} does not fit the config's "
      "model: params/block_0/moe/experts/wi_gate saved (4, 32, 32) float32, now "
      "(8, 32, 32) float32; ")
  assert "more); the config differs from the one that wrote it" in message
  assert listing(workdir) == before
  assert not os.path.exists(os.path.join(workdir, "config.json"))   # not from a failed start


def test_state_bytes_by_hand(tfds_dir):
  assert workdirs.state_bytes(workdirs.state_shapes(config(tfds_dir))) == STATE_BYTES


def test_full_disk_stops_before_any_data_or_model_work(tfds_dir, tmp_path, monkeypatch):
  """A fresh run needs room for keep + 1 = 3 checkpoints (the new one is written
  before the oldest is deleted); a workdir already holding two needs one more."""
  free = {"bytes": 1_000_000}
  usage = shutil.disk_usage(tmp_path)
  monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=free["bytes"]))
  workdir = str(tmp_path / "run")
  with pytest.raises(WorkdirError) as error:
    train(config("/nonexistent"), workdir, progress=False)   # no data: it stops before
  message = str(error.value)
  assert "\n" not in message
  assert message.startswith(f"workdir {workdir} has 1.0 MB free on its disk, but the "
                            "checkpoints need about 1.5 MB more (3 x 497.7 kB: ")
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))
  shapes = workdirs.state_shapes(config(tfds_dir))
  for present, needed in ((0, 3 * STATE_BYTES), (2, STATE_BYTES)):
    for step in (15, 20)[:present]:
      os.makedirs(os.path.join(workdir, "checkpoints", str(step)), exist_ok=True)
    free["bytes"] = needed
    workdirs.check_disk(workdir, shapes, keep=2)
    free["bytes"] = needed - 1
    with pytest.raises(WorkdirError, match=f"train.keep_checkpoints=2, one more while "
                                           f"saving, {present} there already"):
      workdirs.check_disk(workdir, shapes, keep=2)


def test_disk_full_during_a_save_stops_in_one_line_and_the_rerun_continues(
    finished, tfds_dir, tmp_path, monkeypatch):
  import errno  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  workdir = copy_of(finished, tmp_path)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "20"))
  save = ocp.CheckpointManager.save

  def full_at_20(manager, step, *args, **kwargs):
    if step == 20:
      raise OSError(errno.ENOSPC, "No space left on device")
    return save(manager, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", full_at_20)
  with pytest.raises(CheckpointError) as error:
    train(config(tfds_dir), workdir, progress=False)
  checkpoints = os.path.join(workdir, "checkpoints")
  assert str(error.value) == (
      f"checkpoint 20 could not be written to {checkpoints}: the disk is full (No space "
      "left on device); checkpoint 15 is intact and stays the latest; free space and "
      "rerun the same command")
  assert listing(workdir) == {"checkpoints": ["15"]}
  monkeypatch.setattr(ocp.CheckpointManager, "save", save)
  train(config(tfds_dir), workdir, progress=False)
  got = train_losses(workdir)
  assert [got[s] for s in range(16, 21)] == [finished[1][s] for s in range(16, 21)]


def _unwritable_directory(tmp_path, kind: str) -> str:
  """A directory this process cannot create files in, or a skip."""
  if kind == "chmod":
    if os.geteuid() == 0:
      pytest.skip("running as root: a read-only mode does not stop root from writing")
    path = tmp_path / "readonly"
    path.mkdir()
    path.chmod(0o555)
    return str(path)
  path = "/sys/fs"    # sysfs takes no new files, even from root
  try:
    open(os.path.join(path, ".probe"), "w").close()
  except OSError:
    return path
  os.remove(os.path.join(path, ".probe"))
  pytest.skip("/sys/fs takes files here")


@pytest.mark.parametrize("kind", ["chmod", "sysfs"])
def test_unwritable_workdir_stops_in_one_line(kind, tmp_path):
  path = _unwritable_directory(tmp_path, kind)
  with pytest.raises(WorkdirError) as error:
    train(config("/nonexistent"), path, progress=False)
  assert str(error.value).startswith(f"workdir {path} is not writable (")
  assert "\n" not in str(error.value)


def test_workdir_that_is_a_file_stops_in_one_line(tmp_path):
  path = tmp_path / "file"
  path.write_text("not a directory")
  with pytest.raises(WorkdirError, match=f"^workdir {path} is a file, not a directory; "):
    train(config("/nonexistent"), str(path), progress=False)
  with pytest.raises(WorkdirError, match=f"^workdir {path}/run cannot be created: {path} "
                                         "is a file$"):
    train(config("/nonexistent"), str(path / "run"), progress=False)

"""Resuming: logs that agree with the restored checkpoint, and preemption.

A run resumed from step s logs each step once, in order, in metrics.jsonl and in
TensorBoard (read here as TensorBoard reads it, purges included). SIGTERM stops a
run at the next step boundary with a checkpoint there, one line on stderr and exit
status 75; the rerun continues and reproduces the uninterrupted losses bitwise.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import numpy as np
import pytest

from moejax.train import preemption, train, trainer
from moejax.train.writers import MetricWriter
from tests.helpers import main_command, subprocess_env, tiny_config, train_losses

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 120
# Fields that depend on the wall clock, not on the computation.
TIMING_FIELDS = ("tokens_per_s",)


def read_records(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def tensorboard_view(workdir: str):
  """The workdir's TensorBoard events as TensorBoard shows them: all event files
  in name order, a SessionLog START at step p discarding the events at steps >= p
  read before it (EventAccumulator's purge), every event kept (no sampling)."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  accumulator = event_accumulator.EventAccumulator(
      os.path.join(workdir, "tensorboard"),
      size_guidance={event_accumulator.SCALARS: 0, event_accumulator.HISTOGRAMS: 0})
  accumulator.Reload()
  return accumulator


def assert_logs_hold_each_step_once(workdir: str, want: dict[str, list[int]],
                                    reference: str | None = None) -> None:
  """metrics.jsonl holds the steps `want[split]` of each split, once and in order;
  TensorBoard shows the same steps with the same values; with a `reference` run,
  every record equals its record (but for the timing fields)."""
  records, view = read_records(workdir), tensorboard_view(workdir)
  for split, steps in want.items():
    logged = [r for r in records if r["split"] == split]
    assert [r["step"] for r in logged] == steps, split
    scalars = view.Scalars(f"{split}/loss")
    assert [e.step for e in scalars] == steps, split
    assert [e.value for e in scalars] == [float(np.float32(r["loss"])) for r in logged]
    load = f"{split}/layers/layer_0/load"
    assert [e.step for e in view.Histograms(load)] == steps, load
  if reference is not None:
    strip = lambda r: {k: v for k, v in r.items() if k not in TIMING_FIELDS}
    assert [strip(r) for r in records] == [strip(r) for r in read_records(reference)]


def test_writer_resumed_drops_later_records_and_tensorboard_purges_them(tmp_path):
  workdir = str(tmp_path)
  load = [1.0, 2.0, 3.0, 4.0]
  first = MetricWriter(workdir)
  for step in range(1, 6):
    first.write(step, "train", {"loss": float(step), "layers": {"layer_0": {"load": load}}})
  first.write(2, "eval", {"loss": 0.5, "layers": {"layer_0": {"load": load}}})
  first.write(4, "eval", {"loss": 0.25, "layers": {"layer_0": {"load": load}}})
  first.close()
  with open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8") as f:
    f.write('{"step": 6, "split": "tra')          # a line cut short by a kill

  # Resumed from a checkpoint at step 3: steps 4 and 5 (train), 4 (eval) and the
  # cut line go; steps 4 and 5 come again with other values.
  resumed = MetricWriter(workdir, resume_step=3)
  for step in (4, 5):
    resumed.write(step, "train", {"loss": 10.0 * step, "layers": {"layer_0": {"load": load}}})
  resumed.write(5, "eval", {"loss": 0.125, "layers": {"layer_0": {"load": load}}})
  resumed.close()
  records = read_records(workdir)
  assert [(r["step"], r["split"], r["loss"]) for r in records] == [
      (1, "train", 1.0), (2, "train", 2.0), (3, "train", 3.0), (2, "eval", 0.5),
      (4, "train", 40.0), (5, "train", 50.0), (5, "eval", 0.125)]
  assert_logs_hold_each_step_once(workdir, {"train": [1, 2, 3, 4, 5], "eval": [2, 5]})
  view = tensorboard_view(workdir)
  assert [e.value for e in view.Scalars("train/loss")] == [1.0, 2.0, 3.0, 40.0, 50.0]

  # A finished run (last step 5), rerun: its new evaluation replaces the one at 5,
  # and the train record at 5 stays in both logs.
  rerun = MetricWriter(workdir, resume_step=5)
  rerun.write(5, "eval", {"loss": 0.0625, "layers": {"layer_0": {"load": load}}}, replace=True)
  rerun.close()
  assert [(r["step"], r["split"], r["loss"]) for r in read_records(workdir)] == [
      (1, "train", 1.0), (2, "train", 2.0), (3, "train", 3.0), (2, "eval", 0.5),
      (4, "train", 40.0), (5, "train", 50.0), (5, "eval", 0.0625)]
  assert_logs_hold_each_step_once(workdir, {"train": [1, 2, 3, 4, 5], "eval": [2, 5]})
  view = tensorboard_view(workdir)
  assert [e.value for e in view.Scalars("eval/loss")] == [0.5, 0.0625]
  assert [e.value for e in view.Scalars("train/loss")] == [1.0, 2.0, 3.0, 40.0, 50.0]
  # Nothing left behind by the atomic rewrites.
  assert sorted(os.listdir(workdir)) == ["metrics.jsonl", "tensorboard"]


def test_fresh_writer_appends_after_what_a_kill_left(tmp_path):
  """A fresh run (no checkpoint) keeps the records there, but for a line cut short,
  and completes a last line whose newline was not written."""
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "split": "train", "loss": 1.0}\n'
                  '{"step": 2, "split": "train", "loss": 2.0}')
  writer = MetricWriter(str(tmp_path))
  writer.write(3, "train", {"loss": 3.0})
  writer.close()
  with open(path, "a", encoding="utf-8") as f:
    f.write('{"step": 4, "spl')
  writer = MetricWriter(str(tmp_path))
  writer.write(5, "train", {"loss": 5.0})
  writer.close()
  assert [(r["step"], r["loss"]) for r in read_records(str(tmp_path))] == [
      (1, 1.0), (2, 2.0), (3, 3.0), (5, 5.0)]


# ----------------------------------------------------------------------------
# Runs of 16 steps compared with an uninterrupted one in this process: runs started
# by the command line get the same 8 simulated devices, so the same numbers.

RUN = {"train.steps": 16, "train.eval_every": 4, "train.checkpoint_every": 8}
STEPS, EVALS = list(range(1, 17)), [4, 8, 12, 16]


@pytest.fixture(scope="module")
def uninterrupted(tfds_dir, tmp_path_factory) -> str:
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  train(tiny_config(tfds_dir, **RUN), workdir, progress=False)
  return workdir


def _start(workdir: str, tfds_dir: str) -> subprocess.Popen:
  return subprocess.Popen(main_command(workdir, tfds_dir, **RUN), env=subprocess_env(8),
                          cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)


def _finish(process: subprocess.Popen) -> str:
  """Waits for the process (killed after TIMEOUT_S); returns its stderr."""
  try:
    return process.communicate(timeout=TIMEOUT_S)[1]
  finally:
    if process.poll() is None:
      process.kill()
      process.wait()


def test_sigterm_saves_at_the_next_step_and_the_rerun_continues(tfds_dir, tmp_path,
                                                                uninterrupted):
  workdir = str(tmp_path)
  process = _start(workdir, tfds_dir)
  deadline = time.monotonic() + TIMEOUT_S
  while process.poll() is None and time.monotonic() < deadline:
    if os.path.exists(os.path.join(workdir, "metrics.jsonl")) and max(
        train_losses(workdir), default=0) >= 3:
      process.send_signal(signal.SIGTERM)
      break
    time.sleep(0.02)
  stderr = _finish(process)
  assert process.returncode == preemption.EXIT_STATUS, stderr[-2000:]
  assert "Traceback" not in stderr
  last = stderr.strip().splitlines()[-1]
  assert last.startswith("preempted: stopped at step "), stderr[-2000:]
  step = int(last.split()[4])
  assert 3 <= step < 16
  assert last.endswith(f"step {step} with its checkpoint in "
                       f"{os.path.join(workdir, 'checkpoints')}; rerunning the same command "
                       f"continues from there (exit status 75)")
  # The checkpoint at the step it reported (and the regular one at 8 when it got
  # that far); the logs end at that step.
  assert str(step) in os.listdir(os.path.join(workdir, "checkpoints"))
  assert max(train_losses(workdir)) == step

  rerun = _start(workdir, tfds_dir)
  stderr = _finish(rerun)
  assert rerun.returncode == 0, stderr[-2000:]
  assert f"resumed from checkpoint at step {step} " in stderr
  want, got = train_losses(uninterrupted), train_losses(workdir)
  assert [got[s] for s in STEPS] == [want[s] for s in STEPS]
  assert_logs_hold_each_step_once(workdir, {"train": STEPS, "eval": EVALS},
                                  reference=uninterrupted)


# ----------------------------------------------------------------------------
# SIGTERM at chosen points of in-process runs: before and during the first step,
# during an evaluation. The test process sends the signal to itself from inside
# the run, so that it lands at a known point.

def _sigterm_self() -> None:
  assert threading.current_thread() is threading.main_thread()
  os.kill(os.getpid(), signal.SIGTERM)


class _SignalledWatch(preemption.PreemptionWatch):
  """The trainer's watch, with SIGTERM sent as soon as its handler is installed:
  before the first step."""

  def __enter__(self):
    watch = super().__enter__()
    _sigterm_self()
    return watch


class _SignalOnFirstBatch:
  """A training iterator that sends SIGTERM to this process as its first batch is
  read (get_state and the rest are the wrapped iterator's)."""

  def __init__(self, iterator):
    self._iterator, self._sent = iterator, False

  def __getattr__(self, name):
    return getattr(self._iterator, name)

  def __iter__(self):
    return self

  def __next__(self):
    if not self._sent:
      self._sent = True
      _sigterm_self()
    return next(self._iterator)


class _SignallingDataset:
  def __init__(self, dataset):
    self.dataset = dataset

  def __iter__(self):
    return _SignalOnFirstBatch(iter(self.dataset))


def _run_preempted(config, workdir: str, capfd) -> tuple[int, str]:
  """Trains until the Preempted exit; returns (its step, the last stderr line),
  and checks that the SIGTERM handler from before is back."""
  before = signal.getsignal(signal.SIGTERM)
  with pytest.raises(preemption.Preempted) as stopped:
    train(config, workdir, progress=False)
  assert stopped.value.code == preemption.EXIT_STATUS
  assert signal.getsignal(signal.SIGTERM) is before
  return stopped.value.step, capfd.readouterr().err.strip().splitlines()[-1]


def _checkpoints(workdir: str) -> list[str]:
  return sorted(os.listdir(os.path.join(workdir, "checkpoints")), key=int)


def test_sigterm_before_and_during_the_first_step_and_during_evaluation(
    tfds_dir, tmp_path, monkeypatch, capfd, uninterrupted):
  config, workdir = tiny_config(tfds_dir, **RUN), str(tmp_path)

  # Before the first step of a fresh run: nothing trained, nothing saved.
  with monkeypatch.context() as patch:
    patch.setattr(trainer, "PreemptionWatch", _SignalledWatch)
    step, last = _run_preempted(config, workdir, capfd)
  assert step == 0 and last.startswith("preempted before the first step: nothing to save")
  assert _checkpoints(workdir) == [] and read_records(workdir) == []

  # While the first batch is read (compilation follows): the step completes and
  # its checkpoint is saved.
  make_dataset = trainer.make_dataset
  with monkeypatch.context() as patch:
    patch.setattr(trainer, "make_dataset", lambda spec, *args, **kwargs: (
        _SignallingDataset(make_dataset(spec, *args, **kwargs)) if spec.shuffle
        else make_dataset(spec, *args, **kwargs)))
    step, last = _run_preempted(config, workdir, capfd)
  assert step == 1 and last.startswith("preempted: stopped at step 1 with its checkpoint")
  assert _checkpoints(workdir) == ["1"]

  # Before the first step of the resumed run: the checkpoint at 1 stands.
  with monkeypatch.context() as patch:
    patch.setattr(trainer, "PreemptionWatch", _SignalledWatch)
    step, last = _run_preempted(config, workdir, capfd)
  assert step == 1 and last.startswith("preempted: stopped at step 1 with its checkpoint")
  assert _checkpoints(workdir) == ["1"]
  assert [(r["step"], r["split"]) for r in read_records(workdir)] == [(1, "train")]

  # During the evaluation at step 4: it completes and is logged, and the run stops
  # at step 4 with a checkpoint there.
  evaluate = trainer.evaluate
  with monkeypatch.context() as patch:
    def signalling_evaluate(*args, **kwargs):
      patch.setattr(trainer, "evaluate", evaluate)
      _sigterm_self()
      return evaluate(*args, **kwargs)
    patch.setattr(trainer, "evaluate", signalling_evaluate)
    step, last = _run_preempted(config, workdir, capfd)
  assert step == 4 and last.startswith("preempted: stopped at step 4 with its checkpoint")
  assert _checkpoints(workdir) == ["1", "4"]
  assert [(r["step"], r["split"]) for r in read_records(workdir)][-2:] == [
      (4, "train"), (4, "eval")]

  # The rerun does not evaluate step 4 again, and the logs are the uninterrupted run's.
  train(config, workdir, progress=False)
  assert _checkpoints(workdir) == ["8", "16"]           # keep_checkpoints=2
  assert_logs_hold_each_step_once(workdir, {"train": STEPS, "eval": EVALS},
                                  reference=uninterrupted)

"""Start-up mistakes are one line on stderr (the traceback with --verbose), for
`python -m moejax.main` and `python -m moejax.demo`."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from moejax import demo, routers
from moejax import main as moejax_main
from moejax.data import DatasetNotReady
from moejax.train import errors
from tests.helpers import main_command, subprocess_env, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs a main.py whose trainer raises errors.<kind>(<message>), through absl.
FAILING_TRAINER = """
import moejax.train
from moejax.train import errors

def train(*args, **kwargs):
  raise errors.{kind}({message!r})

moejax.train.train = train
from absl import app
from moejax import main
app.run(main.main, flags_parser=main.parse_flags)
"""


def stderr_lines(text: str) -> list[str]:
  return [line for line in text.splitlines() if line.strip()]


def run_main(tmp_path, *flags: str) -> subprocess.CompletedProcess:
  """`python -m moejax.main` on the tiny config plus `flags`, which must fail before
  the data is read."""
  command = main_command(str(tmp_path / "run"), str(tmp_path / "data")) + list(flags)
  return subprocess.run(command, env=subprocess_env(), cwd=REPO, capture_output=True,
                        text=True, timeout=300)


@pytest.mark.parametrize("flag,line", [
    ("--config.moe.num_expert=16",
     "config error: --config.moe.num_expert: config.moe has no field num_expert; "
     "did you mean num_experts?"),
    ("--config.mo.top_k=1",
     "config error: --config.mo.top_k: config has no field mo; did you mean moe?"),
    ("--config.moe.topk.scor=sigmoid",
     "config error: --config.moe.topk.scor: config.moe.topk has no field scor; "
     "did you mean score?"),
    ("--config.train.steps=abc",
     "config error: --config.train.steps: config.train.steps must be of type int, got 'abc'"),
    ("--config.moe.topk.normalize=maybe",
     "config error: --config.moe.topk.normalize: config.moe.topk.normalize must be of type "
     "bool, got 'maybe'"),
    ("--config=configs/no_such_config.py",
     "config error: --config=configs/no_such_config.py: [Errno 2] No such file or directory: "
     "'configs/no_such_config.py'"),
    ("--workdri=/tmp", "flag error: Unknown command line flag 'workdri'. Did you mean: workdir ?"),
])
def test_flag_mistake_is_one_line(flag, line, tmp_path):
  result = run_main(tmp_path, flag)
  assert result.returncode == 1, result.stderr[-2000:]
  assert stderr_lines(result.stderr) == [line]
  assert not os.path.exists(tmp_path / "run")


def test_verbose_keeps_the_traceback_of_a_flag_mistake(tmp_path):
  result = run_main(tmp_path, "--config.moe.num_expert=16", "--verbose")
  assert result.returncode == 1
  lines = stderr_lines(result.stderr)
  assert lines[0] == "Traceback (most recent call last):" and len(lines) > 5
  assert lines[-1] == ("config error: --config.moe.num_expert: config.moe has no field "
                       "num_expert; did you mean num_experts?")


def test_bad_value_from_setup_check_is_one_line_and_verbose_has_its_traceback(tmp_path):
  line = "config error: moe.top_k (9) must be <= num_experts (4)"
  result = run_main(tmp_path, "--config.moe.top_k=9")
  assert result.returncode == 1
  assert stderr_lines(result.stderr) == [line]
  verbose = run_main(tmp_path, "--config.moe.top_k=9", "--verbose")
  assert verbose.returncode == 1
  lines = stderr_lines(verbose.stderr)
  assert "Traceback (most recent call last):" in lines and lines[-1] == line
  assert any(l.startswith("moejax.train.errors.ConfigError: moe.top_k (9)") for l in lines)


@pytest.mark.parametrize("error,line", [
    (errors.WorkdirError("/tmp/x is a file; give a directory as --workdir"),
     "workdir error: /tmp/x is a file; give a directory as --workdir"),
    (errors.CheckpointError("no checkpoint in /tmp/x/checkpoints can be restored (step 40: "
                            "truncated)"),
     "checkpoint error: no checkpoint in /tmp/x/checkpoints can be restored (step 40: "
     "truncated)"),
    (errors.ConfigError("moe.num_experts is 16, but the workdir holds a run with 8"),
     "config error: moe.num_experts is 16, but the workdir holds a run with 8"),
    (errors.RunError("the run stopped"), "run error: the run stopped"),
    (DatasetNotReady("dataset 'lm1b' is not prepared"),
     "data error: dataset 'lm1b' is not prepared"),
])
def test_trainer_errors_are_one_line(error, line, monkeypatch, capsys, tmp_path):
  def train(*args, **kwargs):
    raise error
  import moejax.train  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(moejax.train, "train", train, raising=False)
  config = tiny_config(str(tmp_path / "data"))
  with pytest.raises(SystemExit) as exit_info:
    moejax_main.run(config, str(tmp_path / "run"), progress=False)
  assert exit_info.value.code == 1
  assert capsys.readouterr().err == line + "\n"
  with pytest.raises(SystemExit):
    moejax_main.run(config, str(tmp_path / "run"), progress=False, verbose=True)
  lines = stderr_lines(capsys.readouterr().err)
  assert lines[0] == "Traceback (most recent call last):" and lines[-1] == line
  assert any(type(error).__name__ in l for l in lines[1:-1])


def test_setup_check_value_error_is_a_config_error_in_process(capsys, tmp_path):
  config = tiny_config(str(tmp_path / "data"), **{"train.num_microbatches": 3})
  with pytest.raises(SystemExit) as exit_info:
    moejax_main.run(config, str(tmp_path / "run"), progress=False)
  assert exit_info.value.code == 1
  assert capsys.readouterr().err == ("config error: train.num_microbatches (3) must divide "
                                     "train.batch_size (8)\n")


def test_trainer_error_through_absl_is_one_line(tmp_path):
  script = FAILING_TRAINER.format(kind="CheckpointError", message="step 20 is unreadable")
  command = main_command(str(tmp_path / "run"), str(tmp_path / "data"))[3:]
  result = subprocess.run([sys.executable, "-c", script, *command], env=subprocess_env(),
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1, result.stderr[-2000:]
  assert stderr_lines(result.stderr) == ["checkpoint error: step 20 is unreadable"]


@pytest.mark.parametrize("argv,verbose", [
    (["main"], False),
    (["main", "--verbose"], True),
    (["main", "-verbose"], True),
    (["main", "--verbose=false"], False),
    (["main", "--verbose", "--noverbose"], False),
    (["main", "--", "--verbose"], False),
    (["main", "--verbosity=1"], False),
])
def test_verbose_is_read_before_the_flags_parse(argv, verbose):
  assert moejax_main.verbose_requested(argv) is verbose


def test_field_error_suggests_the_closest_field():
  config = tiny_config("/nonexistent")
  assert moejax_main.field_error(config, "moe.num_experts") is None
  assert moejax_main.field_error(config, "train.stpes") == (
      "config.train has no field stpes; did you mean steps?")
  assert moejax_main.field_error(config, "mesh.zzz") == (
      "config.mesh has no field zzz; its fields: data, expert, model")
  assert moejax_main.field_error(config, "seed.x") == (
      "config.seed is a value (int), not a section with field x")


# ----------------------------------------------------------------------------
# python -m moejax.demo

SMALL = ["--tokens", "16", "--model_dim", "8", "--hidden_dim", "8", "--experts", "4"]


@pytest.mark.parametrize("argv,line", [
    (["--experts", "0"], "argument --experts: must be >= 1, got 0"),
    (["--experts", "four"], "argument --experts: invalid int value: 'four'"),
    (["--top_k", "0"], "argument --top_k: must be >= 1, got 0"),
    (["--top_k", "5"], "argument --top_k: must be <= --experts (4), got 5"),
    (["--tokens", "0"], "argument --tokens: must be >= 1, got 0"),
    (["--model_dim", "-8"], "argument --model_dim: must be >= 1, got -8"),
    (["--hidden_dim", "0"], "argument --hidden_dim: must be >= 1, got 0"),
    (["--seed", "-1"], "argument --seed: must be >= 0, got -1"),
    (["--router", "top2"], f"argument --router: must be one of {routers.names()}, got 'top2'"),
    (["--capacity_factor", "0"], "argument --capacity_factor: must be finite and > 0, got 0.0"),
    (["--capacity_factor", "-1.5"],
     "argument --capacity_factor: must be finite and > 0, got -1.5"),
    (["--capacity_factor", "inf"], "argument --capacity_factor: must be finite and > 0, got inf"),
    (["--capacity_factor", "1", "--router", "soft"],
     "capacity_factor must be None for router 'soft': its rows mix tokens (a fixed number "
     "of slots) and nothing is dropped"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_demo_bad_argument_is_one_line(argv, line, capsys):
  with pytest.raises(SystemExit) as exit_info:
    demo.main(SMALL + argv)
  assert exit_info.value.code == 2
  out, err = capsys.readouterr()
  assert out == "" and err == f"python -m moejax.demo: error: {line}\n"


@pytest.mark.parametrize("router", ["hash", "random", "selective_sinkhorn"])
def test_demo_runs_routers_that_read_token_ids_or_draw_noise(router, capsys):
  demo.main(SMALL + ["--router", router])
  out = capsys.readouterr().out
  gaps = [float(l.split("=")[1].split()[0]) for l in out.splitlines() if "y_loop|" in l]
  assert len(gaps) == 3 and max(gaps) < 1e-5                     # loop, einsum, sorted
  loads = [int(l.split()[2]) for l in out.splitlines() if l.strip().startswith("expert ")]
  assert sum(loads) == 16 * 2                                    # T = 16 tokens x K = 2

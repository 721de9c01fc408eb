"""Entry point: train a model from an ml_collections config.

  python -m moejax.main --config=configs/lm_tiny.py --workdir=/tmp/lm_tiny \\
      [--config.moe.router=topk --config.moe.num_experts=16 ...]

Every config field can be overridden on the command line. A bad value stops the
run at start-up with one line naming the field; a dataset that is not prepared
stops it with the command that prepares it. Rerunning the same command resumes
from the latest checkpoint in the workdir.

Multi-host: pass --distributed (or set MOEJAX_DISTRIBUTED=1) to call
jax.distributed.initialize() before anything else. On Cloud TPU and under SLURM
it finds the cluster by itself; elsewhere give --coordinator_address,
--num_processes and --process_id (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID). Every process runs the same command, with data.input_shards a
multiple of the process count; each reads only its own input shards, and the
global batches are those of a single process with the same data.input_shards.
On CPU the processes' collectives go through gloo (JAX's default).
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the report.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first.")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0, for --distributed outside TPU and SLURM.")
flags.DEFINE_integer("num_processes", None, "Processes in the job, for --distributed.")
flags.DEFINE_integer("process_id", None, "This process's index, for --distributed.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.mark_flags_as_required(["config", "workdir"])


def distributed_arguments(coordinator_address, num_processes, process_id) -> dict:
  """jax.distributed.initialize keyword arguments from the flags that are set
  (unset ones are left to JAX's cluster detection and JAX_* environment)."""
  given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
           "process_id": process_id}
  if num_processes is not None and num_processes < 1:
    raise app.UsageError(f"--num_processes must be >= 1, got {num_processes}")
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise app.UsageError(f"--process_id must be in [0, {num_processes}), got {process_id}")
  return {k: v for k, v in given.items() if v is not None}


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax and grain log every save at INFO
  import jax  # pylint: disable=g-import-not-at-top
  if FLAGS.distributed or os.environ.get("MOEJAX_DISTRIBUTED") == "1":
    jax.distributed.initialize(**distributed_arguments(FLAGS.coordinator_address,
                                                       FLAGS.num_processes, FLAGS.process_id))
  from moejax.data import DatasetNotReady  # pylint: disable=g-import-not-at-top
  from moejax.train import setup, train  # pylint: disable=g-import-not-at-top
  try:
    setup.check(FLAGS.config)
  except ValueError as e:
    sys.exit(f"config error: {e}")
  try:
    train(FLAGS.config, FLAGS.workdir, progress=FLAGS.progress)
  except DatasetNotReady as e:
    sys.exit(f"data error: {e}")


if __name__ == "__main__":
  app.run(main)

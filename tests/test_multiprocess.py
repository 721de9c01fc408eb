"""Real multi-process runs: two local processes with 4 simulated CPU devices each,
joined by jax.distributed on a localhost coordinator, train with expert
parallelism spanning both (mesh data=2, expert=4) as one process with 8 devices
does, and their checkpoint resumes in one process."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.helpers import main_command, subprocess_env, train_losses

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300            # a hung collective fails the test instead of stalling CI

OVERRIDES = {"train.steps": 6, "train.checkpoint_every": 3, "train.eval_every": 6,
             "mesh.data": 2, "mesh.expert": 4, "moe.expert_parallel.dispatch": "all_to_all",
             "data.input_shards": 4, "model.num_layers": 1, "train.eval_batches": 1}

PROBE = """
import json, sys
import jax
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from moejax.parallel import BATCH_AXES, make_mesh
from moejax.train import setup
mesh = make_mesh(data=2, expert=4)
sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
local = 4 * jax.process_index() + np.arange(4)        # this process's rows, in order
batch = jax.make_array_from_process_local_data(sharding, local)
setup.check_process_rows(mesh, 8)
print(json.dumps({"process": jax.process_index(),
                  "rows": multihost_utils.process_allgather(batch, tiled=True).tolist(),
                  "held": sorted(i[0].start for i in
                                 sharding.addressable_devices_indices_map((8,)).values())}))
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run_two(command, tmp_path, name: str) -> list[str]:
  """Runs `command(coordinator, process_id)` as processes 0 and 1 (4 devices each);
  returns their stdouts. Both are killed if one fails or they outlast TIMEOUT_S."""
  coordinator = f"localhost:{_free_port()}"
  logs = [(tmp_path / f"{name}{i}.out", tmp_path / f"{name}{i}.err") for i in range(2)]
  processes = []
  for i, (out, err) in enumerate(logs):
    with open(out, "w", encoding="utf-8") as o, open(err, "w", encoding="utf-8") as e:
      processes.append(subprocess.Popen(command(coordinator, i), env=subprocess_env(4),
                                        cwd=REPO, stdout=o, stderr=e))
  failed, deadline = None, time.monotonic() + TIMEOUT_S
  try:
    while failed is None and any(p.poll() is None for p in processes):
      codes = [p.poll() for p in processes]
      if any(code not in (None, 0) for code in codes):
        failed = f"exit codes {codes}"
      elif time.monotonic() > deadline:
        failed = f"timed out after {TIMEOUT_S} s"
      time.sleep(0.1)
    codes = [p.poll() for p in processes]
    if failed is None and codes != [0, 0]:
      failed = f"exit codes {codes}"
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
        process.wait()
  if failed:
    tails = "\n".join(f"--- process {i} stderr:\n{err.read_text()[-3000:]}"
                      for i, (_, err) in enumerate(logs))
    raise AssertionError(f"{name}: {failed}\n{tails}")
  return [out.read_text() for out, _ in logs]


def _run_one(workdir: str, tfds_dir: str) -> str:
  """One process with 8 devices; returns its stderr."""
  result = subprocess.run(main_command(workdir, tfds_dir, **OVERRIDES),
                          env=subprocess_env(8), cwd=REPO, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stderr


def _records(workdir: str, split: str) -> dict[int, dict]:
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return {r["step"]: r for r in map(json.loads, f) if r["split"] == split}


def test_process_local_rows_land_in_process_order(tmp_path):
  """With the mesh of moejax.parallel.make_mesh over 2 x 4 devices, process p's
  devices hold batch rows [4p, 4p + 4), and make_array_from_process_local_data
  puts its local rows there in order: the rows of its input shards."""
  outputs = _run_two(lambda coordinator, i: [sys.executable, "-c", PROBE, coordinator, str(i)],
                     tmp_path, "probe")
  for i, out in enumerate(outputs):
    result = json.loads(out.strip().splitlines()[-1])
    assert result["process"] == i
    assert result["held"] == [4 * i, 4 * i + 1, 4 * i + 2, 4 * i + 3]
    assert result["rows"] == list(range(8))


@pytest.mark.slow
def test_two_processes_train_as_one_and_resume_in_one(tfds_dir, tmp_path):
  reference = str(tmp_path / "one")
  _run_one(reference, tfds_dir)
  two = str(tmp_path / "two")
  distributed = lambda coordinator, i: main_command(two, tfds_dir, **OVERRIDES) + [
      "--distributed", f"--coordinator_address={coordinator}", "--num_processes=2",
      f"--process_id={i}"]
  _run_two(distributed, tmp_path, "train")

  # Reductions that cross processes (through gloo) sum in another order than
  # within one process: losses agree to float32 rounding (measured: most steps
  # bitwise, the others within 1e-7 relative), where another batch would differ
  # by about 1e-2.
  want, got = train_losses(reference), train_losses(two)
  assert sorted(got) == sorted(want) == list(range(1, 7))
  np.testing.assert_allclose([got[s] for s in range(1, 7)], [want[s] for s in range(1, 7)],
                             rtol=1e-6)
  for key in ("loss", "bits_per_byte", "tokens"):
    np.testing.assert_allclose(_records(two, "eval")[6][key], _records(reference, "eval")[6][key],
                               rtol=1e-6)
  # One data position per input shard, whichever process read it.
  data = os.path.join(two, "checkpoints", "3", "data")
  assert sorted(f for f in os.listdir(data) if f.endswith(".json")) == [
      f"shard_0000{s}-of-00004.json" for s in range(4)]

  # The 2-process checkpoint at step 3 resumes in one process with 8 devices.
  resumed = str(tmp_path / "resumed")
  shutil.copytree(two, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "6"))
  stderr = _run_one(resumed, tfds_dir)
  assert "resumed from checkpoint at step 3" in stderr
  got = train_losses(resumed)
  np.testing.assert_allclose([got[s] for s in (4, 5, 6)], [want[s] for s in (4, 5, 6)],
                             rtol=1e-6)

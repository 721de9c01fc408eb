"""Test set-up: 8 simulated CPU devices (for sharding tests) and hypothesis profiles."""
import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
# Test programs are tiny: LLVM's optimisations cost more compile time than they save.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A persistent compilation cache shared by this process and the training runs it
# starts as subprocesses: the same programs compile once per test session. Every
# program is kept, however quick to compile: tests rebuild the same small
# programs many times (measured: test_router_registry.py 73 s against 82 s with
# only programs of 1 s and more kept).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import tempfile  # pylint: disable=g-import-not-at-top
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="moejax-jax-cache-")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import hypothesis  # noqa: E402

hypothesis.settings.register_profile(
    "ci", max_examples=6, deadline=None, derandomize=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow])
hypothesis.settings.register_profile(
    "thorough", max_examples=200, deadline=None,
    suppress_health_check=[hypothesis.HealthCheck.too_slow])
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


import pytest  # noqa: E402

# The longest test files first (make test runs `-n 2 --dist loadfile
# --no-loadscope-reorder`): each file runs whole on one worker, and a long file
# started last leaves the other worker idle at the end. Ordered by their measured
# time (pytest --durations=0, summed per file), longest first; the short files
# follow in their usual order.
LONGEST_FILES = (
    "test_train.py", "test_notebooks.py", "test_router_fidelity.py", "test_router_registry.py",
    "test_engines.py", "test_routers_zoo.py", "test_drop_in.py", "test_expert_parallel_layer.py",
    "test_layer.py",
    "test_routing_across_tokens_and_layers.py", "test_analyze.py", "test_balance_training.py",
    "test_device_check.py", "test_layer_conventions.py", "test_resume.py",
    "test_pallas_kernels.py", "test_checkpoints.py", "test_expert_parallel.py",
    "test_multiprocess.py", "test_lowering.py", "test_interventions.py",
    "test_models.py", "test_readme.py", "test_errors.py", "test_router_interface.py",
    "test_router_zoo_training.py", "test_expert_parallel_training.py", "test_balance.py",
    "test_llep.py", "test_routers_topk.py", "test_generate.py", "test_data.py",
)


def pytest_collection_modifyitems(session, config, items):  # pylint: disable=unused-argument
  rank = {name: i for i, name in enumerate(LONGEST_FILES)}
  items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
  """A TFDS data_dir with both embedded datasets prepared (about 5 s)."""
  from moejax import data  # pylint: disable=g-import-not-at-top
  path = str(tmp_path_factory.mktemp("tensorflow_datasets"))
  data.prepare("synthetic_domains", path)
  data.prepare("stdlib_text", path)
  return path

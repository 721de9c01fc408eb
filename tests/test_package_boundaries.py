"""pallas_kernels stands alone: it imports jax and its own modules only, so it
runs where moejax, flax and optax cannot be imported (moejax depends on it,
never the reverse)."""
from __future__ import annotations

import ast
import os
import subprocess
import sys

from tests.helpers import import_blocker, subprocess_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = os.path.join(REPO, "pallas_kernels")
BLOCKED = ("moejax", "flax", "optax")
# Imports pallas_kernels with BLOCKED refused, then runs one small gmm in
# interpret mode against a NumPy reference.
RUN_WITHOUT_MOEJAX = import_blocker(BLOCKED, "is refused: pallas_kernels must not need it") + f"""
try:
  import moejax
except ImportError:
  pass
else:
  raise AssertionError("the finder let moejax through")

import jax.numpy as jnp
import numpy as np
import pallas_kernels as pk

lhs = np.arange(24, dtype=np.float32).reshape(6, 4) / 10
rhs = np.arange(24, dtype=np.float32).reshape(2, 4, 3) / 10
sizes = np.array([2, 3], np.int32)
got = pk.gmm(jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(sizes),
             settings=pk.KernelSettings(interpret=True))
want = np.concatenate([lhs[:2] @ rhs[0], lhs[2:5] @ rhs[1], np.zeros((1, 3), np.float32)])
np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r})
assert not loaded, loaded
print("gmm ok")
"""


def _imported_modules(path: str) -> list[tuple[int, str]]:
  """(line, top-level module) of every absolute import in the file at `path`."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), path)
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0:
      found.append((node.lineno, node.module.split(".")[0]))
  return found


def _kernel_files() -> list[str]:
  return sorted(os.path.join(root, name) for root, _, names in os.walk(KERNELS)
                for name in names if name.endswith(".py"))


def test_kernels_import_and_run_without_moejax_flax_or_optax():
  result = subprocess.run([sys.executable, "-c", RUN_WITHOUT_MOEJAX], env=subprocess_env(),
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "gmm ok" in result.stdout


def test_no_kernel_file_imports_moejax_or_any_package_but_jax():
  files = _kernel_files()
  assert len(files) > 5, files
  allowed = {"jax", "pallas_kernels"} | set(sys.stdlib_module_names)
  others = [f"{os.path.relpath(path, REPO)}:{line} imports {module}" for path in files
            for line, module in _imported_modules(path) if module not in allowed]
  assert not others, others

"""The Colab notebooks under colab/: committed without outputs, and every cell runs.

Each notebook is executed top to bottom with nbclient in a fresh kernel of this
interpreter, with MOEJAX_NOTEBOOK_SMALL=1 (the notebooks' small sizes), the repository
on PYTHONPATH, JAX on CPU and matplotlib's Agg backend; a cell that raises fails the
test with that cell's error.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(REPO.glob("colab/*.ipynb"))
IDS = [path.name for path in NOTEBOOKS]
ANSI = re.compile(r"\x1b\[[0-9;]*m")
INSTALL_HINT = "the notebook tests need nbclient, nbformat and ipykernel: pip install -e .[dev]"


def test_there_are_notebooks():
  assert NOTEBOOKS, f"no notebooks under {REPO / 'colab'}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebooks_are_stripped(path):
  """No outputs, execution counts or execution metadata: a notebook is committed clean."""
  nb = json.loads(path.read_text(encoding="utf-8"))
  assert "widgets" not in nb.get("metadata", {}), f"{path.name}: widget state in metadata"
  for i, cell in enumerate(nb["cells"]):
    where = f"{path.name} cell {i}"
    assert "execution" not in cell.get("metadata", {}), f"{where}: execution metadata"
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [], f"{where}: has outputs"
      assert cell["execution_count"] is None, f"{where}: has an execution count"


def _kernel_python(kernel_name: str) -> str | None:
  """The interpreter the kernelspec `kernel_name` starts, as jupyter_client would
  run it (a bare `python` is replaced by sys.executable), or None if not found."""
  from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
  try:
    argv = KernelSpecManager().get_kernel_spec(kernel_name).argv
  except NoSuchKernel:
    return None
  bare = {"python", f"python{sys.version_info[0]}", "python%d.%d" % sys.version_info[:2]}
  return sys.executable if argv and argv[0] in bare else (argv[0] if argv else None)


def _same_file(a: str | None, b: str) -> bool:
  try:
    return a is not None and os.path.samefile(a, b)
  except OSError:
    return False


def _use_this_interpreter(monkeypatch, tmp_path, kernel_name: str = "python3") -> None:
  """Makes `kernel_name` start this interpreter's ipykernel: if the kernelspec found
  runs another Python, one is written under tmp_path and JUPYTER_PATH points at it."""
  import ipykernel.kernelspec
  if _same_file(_kernel_python(kernel_name), sys.executable):
    return
  ipykernel.kernelspec.install(kernel_name=kernel_name, prefix=str(tmp_path))
  monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join(
      [str(tmp_path / "share" / "jupyter"), *filter(None, [os.environ.get("JUPYTER_PATH")])]))
  found = _kernel_python(kernel_name)
  assert _same_file(found, sys.executable), (
      f"kernel {kernel_name!r} runs {found}, not {sys.executable}")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_executes(path, monkeypatch, tmp_path):
  nbclient = pytest.importorskip("nbclient", reason=INSTALL_HINT)
  nbformat = pytest.importorskip("nbformat", reason=INSTALL_HINT)
  pytest.importorskip("ipykernel", reason=INSTALL_HINT)
  _use_this_interpreter(monkeypatch, tmp_path)
  # The kernel inherits this environment.
  monkeypatch.setenv("MOEJAX_NOTEBOOK_SMALL", "1")
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("MPLBACKEND", "Agg")

  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                   resources={"metadata": {"path": str(REPO)}})
  error = None
  try:
    client.execute()
  except nbclient.exceptions.CellExecutionError as e:
    error = ANSI.sub("", str(e))    # the failing cell's source and traceback, uncoloured
  if error is not None:
    pytest.fail(f"{path.name}: a cell raised\n{error}", pytrace=False)

"""The README's code example runs as written."""
import os
import re

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_readme_layer_example_runs():
  text = open(README, encoding="utf-8").read()
  example = re.search(r"```python\n(.*?)```", text, re.S).group(1)
  namespace = {}
  exec(compile(example, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  assert namespace["y"].shape == (2, 16, 256)


def test_readme_aux_free_example_moves_the_bias():
  text = open(README, encoding="utf-8").read()
  example = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "aux_free" in b][0]
  namespace = {}
  exec(compile(example, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  import numpy as np  # pylint: disable=g-import-not-at-top
  routing = namespace["routing"]["router"]
  counts = namespace["aux"].metrics["selected"]            # 2 * 16 tokens * K = 2
  assert float(counts.sum()) == 64.0
  np.testing.assert_allclose(routing["bias"], 1e-3 * np.sign(counts.mean() - counts), atol=1e-9)
  np.testing.assert_array_equal(routing["counts"], 0)

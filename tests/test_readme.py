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

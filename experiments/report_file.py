"""Writing an experiment's markdown report without losing its hand-written reading."""
from __future__ import annotations

import os

READING = "## Reading"


def write_keeping_reading(path: str, lines: list[str]) -> None:
  """Writes `lines` to `path`; a "## Reading" section already at the end of the
  file (the numbers read by hand) is kept after them."""
  reading = ""
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      old = f.read()
    if READING in old:
      reading = old[old.index(READING):]
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + ("\n" + reading if reading else ""))

"""Writing an experiment's markdown report without losing its hand-written reading."""
from __future__ import annotations

import os

READING = "## Reading"


def existing_reading(path: str) -> str:
  """The "## Reading" section at the end of the file at `path`, or ""."""
  if not os.path.exists(path):
    return ""
  with open(path, encoding="utf-8") as f:
    old = f.read()
  return old[old.index(READING):] if READING in old else ""


def write_keeping_reading(path: str, lines: list[str]) -> None:
  """Writes `lines` to `path`; a "## Reading" section already at the end of the
  file (the numbers read by hand) is kept after them."""
  reading = existing_reading(path)
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + ("\n" + reading if reading else ""))


def results_path(path: str) -> str:
  """How a report names a results file in its commands: experiments/results/<file name>."""
  return f"experiments/results/{os.path.basename(path)}"


def summarize_command(script: str, paths: list[str], out: str | None) -> str:
  """The command that regenerates a report: experiments/<script> --summarize PATHS
  [--out OUT], the paths named as in experiments/results/."""
  return (f"PYTHONPATH=. python experiments/{script} --summarize "
          + " ".join(results_path(path) for path in paths)
          + (f" --out {results_path(out)}" if out else ""))


def add_summary_arguments(parser, metavar: str = "JSONL", many: bool = False) -> None:
  """--summarize FILE (FILE... with `many`) and --out MD, the report options of a
  benchmark script."""
  parser.add_argument("--summarize", nargs="+" if many else None, metavar=metavar,
                      help="write the markdown report of "
                      + ("these files" if many else "this file") + " and exit")
  parser.add_argument("--out", help="markdown file of --summarize (default: stdout)")


def write_or_print(out: str | None, lines: list[str]) -> None:
  """Writes `lines` to the markdown file `out` (keeping its reading), or prints them."""
  if out:
    write_keeping_reading(out, lines)
  else:
    print("\n".join(lines))

"""The experiment harness: a grid of arms x datasets x seeds, resumable, with
spreads, paired differences against a baseline and verdicts from their intervals.

  grid = harness.Grid(name="router_zoo", arms=[...], baseline="topk",
                      datasets=["stdlib_text"], seeds={"topk": 5, "*": 3})
  results = harness.run_grid(grid, run_one, "experiments/results/router_zoo.json")

`run_one(arm, dataset, seed) -> dict` trains one run and returns its figures: a
`final` dict of scalars and, optionally, `evals` (the per-evaluation records).
Every finished run is written to the grid's JSON at once (atomically), and a
rerun skips the cells the JSON already holds, so a grid interrupted at any point
resumes where it stopped, on this machine or another. The same command started
in several processes shares the grid's cells among them (claims, then a merge
into the JSON under a lock).

Statistics, per figure and arm (`compare`):
  spread      mean, standard deviation (n - 1), min and max over seeds
  paired      d_s = arm_s - baseline_s for each seed s both ran (same data order
              and initialisation seed), mean d and its two-sided 95% Student t
              interval mean(d) +- t_{0.975, n-1} sd(d) / sqrt(n)
  verdict     from the interval alone (`verdict`):
                lower      the arm's figure is below the baseline's: holds when the
                           interval lies below 0, does not hold when it lies above
                           0, else cannot tell
                higher     the mirror image
                no_worse   (a figure where lower is better, e.g. a loss) holds
                           when the interval lies below the margin, does not hold
                           when it lies above 0 (worse beyond noise), else cannot
                           tell; the margin is the baseline's own seed standard
                           deviation in the same grid, a measured noise level
              fewer than 2 paired seeds: cannot tell

Reports (`write_report`): the tables are generated from the JSON on every write;
a hand-written "## Reading" section is kept, and records the digest of the data it
was written against (`<!-- reading of data DIGEST -->`). When the data under it
changes, the harness marks the reading stale in its first line until someone
rereads the numbers and updates the digest.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from report_file import READING, existing_reading  # (experiments/)

STALE = ("**Stale: the data under this reading changed since it was written "
         "(digest {old}, now {new}); reread the tables and update the digest.**")
DIGEST_MARK = "<!-- reading of data {digest} -->"
CLAIMS = ("lower", "higher", "no_worse")

# Two-sided 95% Student t quantiles t_{0.975, df}, df = 1..30; beyond, the normal.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
         2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
         2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile(df: int) -> float:
  """t_{0.975, df}: the two-sided 95% quantile of Student's t."""
  if df < 1:
    raise ValueError(f"degrees of freedom must be at least 1, got {df}")
  return _T975[df - 1] if df <= len(_T975) else 1.960


@dataclasses.dataclass(frozen=True)
class Grid:
  """Arms x datasets x seeds.

  Attributes:
    name: the experiment's name (the JSON's `grid`).
    arms: arm names, in report order; `baseline` among them.
    baseline: the arm every other arm is compared with.
    datasets: dataset names.
    seeds: seeds per arm: an int for all, or {arm: n, "*": default}; seeds are
      0..n-1, so every arm's seeds are paired with the baseline's.
  """

  name: str
  arms: Sequence[str]
  baseline: str
  datasets: Sequence[str]
  seeds: Any = 3

  def __post_init__(self):
    if self.baseline not in self.arms:
      raise ValueError(f"baseline {self.baseline!r} is not one of the arms {list(self.arms)}")
    for arm in self.arms:
      if self.num_seeds(arm) < 1:
        raise ValueError(f"seeds for arm {arm!r} must be at least 1")

  def num_seeds(self, arm: str) -> int:
    if isinstance(self.seeds, Mapping):
      return int(self.seeds.get(arm, self.seeds.get("*", 3)))
    return int(self.seeds)

  def cells(self) -> list[tuple[str, str, int]]:
    """(arm, dataset, seed) of every run, seed-major so that an interrupted grid
    has every arm at the same seeds."""
    most = max(self.num_seeds(a) for a in self.arms)
    return [(arm, dataset, seed) for seed in range(most) for dataset in self.datasets
            for arm in self.arms if seed < self.num_seeds(arm)]


def _key(run: Mapping[str, Any]) -> tuple[str, str, int]:
  return run["arm"], run["dataset"], int(run["seed"])


def load(path: str) -> dict[str, Any]:
  """The grid JSON at path ({"grid", "runs": [...]}), or an empty one."""
  if not os.path.exists(path):
    return {"grid": None, "runs": []}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def save(path: str, data: Mapping[str, Any]) -> None:
  """Writes the grid JSON atomically (a temporary file, then a rename)."""
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(data, f, indent=1, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def _load_grid(path: str, grid: Grid) -> dict[str, Any]:
  """The JSON at `path` (empty when absent); ValueError if it holds another grid."""
  data = load(path)
  if data["grid"] not in (None, grid.name):
    raise ValueError(f"{path} holds grid {data['grid']!r}, not {grid.name!r}")
  return data


def _describe(data: dict[str, Any], grid: Grid, meta: Optional[Mapping[str, Any]]) -> None:
  """Sets the grid's fields (name, baseline, arms, datasets, meta) in its data."""
  data.update(grid=grid.name, baseline=grid.baseline, arms=list(grid.arms),
              datasets=list(grid.datasets))
  data.setdefault("meta", {}).update(meta or {})


def _add_run(path: str, grid: Grid, meta: Optional[Mapping[str, Any]],
             record: Mapping[str, Any]) -> dict[str, Any]:
  """Rereads the JSON at `path` under a lock, sets the grid's fields, adds `record`
  unless its cell is there already, and saves (a grid's JSON exists from its first
  finished run on): processes sharing a grid each add
  their runs without losing the others'."""
  import fcntl  # pylint: disable=g-import-not-at-top
  with open(f"{path}.lock", "w", encoding="utf-8") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    data = _load_grid(path, grid)
    _describe(data, grid, meta)
    if _key(record) not in {_key(r) for r in data["runs"]}:
      data["runs"].append(dict(record))
    save(path, data)
  return data


def _claim(path: str, cell: tuple[str, str, int]) -> Optional[str]:
  """Claims `cell` for this process: creates <path>.claims/<cell> holding our pid,
  or takes over the claim of a process that no longer runs. Returns the claim's
  file, or None when a running process holds it."""
  folder = f"{path}.claims"
  os.makedirs(folder, exist_ok=True)
  name = os.path.join(folder, "__".join(str(part).replace("/", "%") for part in cell))
  while True:
    try:
      fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
      try:
        with open(name, encoding="utf-8") as f:
          holder = int(f.read().strip() or 0)
      except (FileNotFoundError, ValueError):
        continue
      if holder and _running(holder):
        return None
      try:
        os.remove(name)         # its process ended without finishing the cell
      except FileNotFoundError:
        pass
      continue
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(str(os.getpid()))
    return name


def _running(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def run_grid(grid: Grid, run_one: Callable[[str, str, int], Mapping[str, Any]], path: str,
             meta: Optional[Mapping[str, Any]] = None, log=sys.stderr,
             after_each: Optional[Callable[[dict[str, Any]], None]] = None) -> dict[str, Any]:
  """Runs every cell of `grid` that the JSON at `path` lacks, saving after each
  (and calling after_each(data), e.g. to rewrite the report).

  Each run's record is {"arm", "dataset", "seed", "wall_s", **run_one(...)}.
  Several processes may run one grid at once (the same command started twice):
  each claims a cell before running it (`<path>.claims/`, with its pid; the
  claim of a process that died is taken over) and merges its run into the JSON
  under a lock.
  """
  done = {_key(r) for r in _load_grid(path, grid)["runs"]}
  todo = [c for c in grid.cells() if c not in done]
  print(f"{grid.name}: {len(done)} runs done, {len(todo)} to run", file=log, flush=True)
  for i, (arm, dataset, seed) in enumerate(todo, 1):
    claim = _claim(path, (arm, dataset, seed))
    if claim is None:
      continue                                  # another process runs it
    try:
      if (arm, dataset, seed) in {_key(r) for r in load(path)["runs"]}:
        continue                                # another process finished it
      start = time.time()
      record = dict(run_one(arm, dataset, seed))
      record.update(arm=arm, dataset=dataset, seed=seed, wall_s=round(time.time() - start, 1))
      data = _add_run(path, grid, meta, record)
    finally:
      os.remove(claim)
    if after_each is not None:
      after_each(data)
    print(f"{grid.name} [{i}/{len(todo)}] {arm} {dataset} seed {seed}: "
          f"{json.dumps(record.get('final', {}), sort_keys=True)[:200]} "
          f"({record['wall_s']:.0f} s)", file=log, flush=True)
  data = load(path)
  _describe(data, grid, meta)
  return data


# ----------------------------------------------------------------------------
# Statistics.

def spread(values: Sequence[float]) -> dict[str, Any]:
  """n, mean, standard deviation (n - 1; None for n < 2), min, max."""
  values = [float(v) for v in values]
  n = len(values)
  if not n:
    return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
  mean = sum(values) / n
  std = (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None)
  return {"n": n, "mean": mean, "std": std, "min": min(values), "max": max(values)}


def paired_interval(differences: Sequence[float]) -> dict[str, Any]:
  """Mean of the paired differences and its 95% t interval (None below 2)."""
  d = spread(differences)
  if d["n"] < 2:
    return {"n": d["n"], "mean": d["mean"], "low": None, "high": None}
  half = t_quantile(d["n"] - 1) * d["std"] / math.sqrt(d["n"])
  return {"n": d["n"], "mean": d["mean"], "low": d["mean"] - half, "high": d["mean"] + half}


def verdict(interval: Mapping[str, Any], claim: str, margin: Optional[float] = None) -> str:
  """"holds", "does not hold" or "cannot tell", from the interval of arm - baseline
  (module docstring)."""
  if claim not in CLAIMS:
    raise ValueError(f"claim must be one of {CLAIMS}, got {claim!r}")
  low, high = interval.get("low"), interval.get("high")
  if low is None or high is None:
    return "cannot tell"
  if claim == "lower":
    return "holds" if high < 0 else "does not hold" if low > 0 else "cannot tell"
  if claim == "higher":
    return "holds" if low > 0 else "does not hold" if high < 0 else "cannot tell"
  if margin is None:
    raise ValueError("a no_worse claim needs a margin (the baseline's seed spread)")
  return "holds" if high < margin else "does not hold" if low > 0 else "cannot tell"


def figure(run: Mapping[str, Any], name: str) -> Optional[float]:
  """run["final"][name], following "a/b" into nested dicts; None if absent."""
  value: Any = run.get("final", {})
  for part in name.split("/"):
    if not isinstance(value, Mapping) or part not in value:
      return None
    value = value[part]
  return None if value is None else float(value)


def values_by_seed(data: Mapping[str, Any], name: str, dataset: str, arm: str
                   ) -> dict[int, float]:
  """{seed: figure `name`} of `arm`'s runs on `dataset`."""
  out = {}
  for run in data["runs"]:
    value = figure(run, name)
    if run["arm"] == arm and run["dataset"] == dataset and value is not None:
      out[int(run["seed"])] = value
  return out


def paired(data: Mapping[str, Any], name: str, dataset: str, arm: str,
           reference: str) -> dict[str, Any]:
  """The t interval of arm - reference over the seeds both ran (key "seeds")."""
  values = values_by_seed(data, name, dataset, arm)
  base = values_by_seed(data, name, dataset, reference)
  seeds = sorted(set(values) & set(base))
  out = paired_interval([values[s] - base[s] for s in seeds])
  out["seeds"] = seeds
  return out


def compare(data: Mapping[str, Any], name: str, dataset: str,
            arms: Optional[Iterable[str]] = None) -> dict[str, dict[str, Any]]:
  """{arm: {"spread": ..., "paired": ... (None for the baseline), "values": {seed: v}}}
  of figure `name` on `dataset`."""
  baseline = data["baseline"]
  out = {}
  for arm in (arms or data.get("arms") or []):
    values = values_by_seed(data, name, dataset, arm)
    out[arm] = {"spread": spread(list(values.values())),
                "paired": None if arm == baseline else paired(data, name, dataset, arm,
                                                              baseline),
                "values": {str(s): v for s, v in sorted(values.items())}}
  return out


def claim(data: Mapping[str, Any], name: str, dataset: str, arm: str, reference: str,
          kind: str) -> dict[str, Any]:
  """{"interval", "verdict"} of claim `kind` for figure `name` of `arm` against any
  `reference` arm; a no_worse margin is the reference's own seed standard deviation."""
  interval = paired(data, name, dataset, arm, reference)
  margin = None
  if kind == "no_worse":
    margin = spread(list(values_by_seed(data, name, dataset, reference).values()))["std"]
    if margin is None:
      return {"interval": interval, "verdict": "cannot tell"}
  return {"interval": interval, "verdict": verdict(interval, kind, margin)}


def claim_verdict(comparison: Mapping[str, Any], arm: str, claim: str,
                  baseline: str) -> str:
  """The verdict of `claim` for `arm` in a compare() result; a no_worse claim
  takes the baseline's seed standard deviation as its margin."""
  paired = comparison[arm]["paired"]
  if paired is None:
    return "baseline"
  margin = comparison[baseline]["spread"]["std"] if claim == "no_worse" else None
  if claim == "no_worse" and margin is None:
    return "cannot tell"
  return verdict(paired, claim, margin)


# ----------------------------------------------------------------------------
# Reports.

def digest(obj: Any) -> str:
  """A short digest of JSON-serialisable data (what a reading was written on)."""
  text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def fmt(value: Optional[float], digits: int = 3) -> str:
  return "–" if value is None else f"{value:,.{digits}f}"


def fmt_interval(paired: Optional[Mapping[str, Any]], digits: int = 3) -> str:
  """"+0.012 [-0.004, +0.028]" (n < 2: the mean alone)."""
  if paired is None or paired.get("mean") is None:
    return "–"
  text = f"{paired['mean']:+.{digits}f}"
  if paired.get("low") is not None:
    text += f" [{paired['low']:+.{digits}f}, {paired['high']:+.{digits}f}]"
  return text


def write_report(path: str, lines: list[str], data_digest: str) -> bool:
  """Writes the generated `lines` to `path`, keeping a "## Reading" section at its
  end; returns whether that reading is stale (written on other data), in which
  case its first line says so."""
  reading = existing_reading(path)
  stale = False
  if reading:
    body = reading[len(READING):].lstrip("\n").splitlines()
    body = [l for l in body if not l.startswith("**Stale: ")]
    while body and not body[0].strip():
      body.pop(0)
    marks = [l for l in body if l.startswith("<!-- reading of data ")]
    written_on = marks[0].split()[4] if marks else "none"
    stale = written_on != data_digest
    head = [READING, ""]
    if stale:
      head += [STALE.format(old=written_on, new=data_digest), ""]
    reading = "\n".join(head + body).rstrip("\n") + "\n"
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines).rstrip("\n") + "\n" + ("\n" + reading if reading else ""))
  return stale


def fmt_cell(entry: Mapping[str, Any], digits: int = 3) -> str:
  """A compare() entry as "mean ± sd; Δ +d [low, high]" (no Δ for the baseline)."""
  s = entry["spread"]
  text = f"{fmt(s['mean'], digits)} ± {fmt(s['std'], digits)}"
  return text + (f"; Δ {fmt_interval(entry['paired'], digits)}" if entry["paired"] else "")


def claim_rows(data: Mapping[str, Any], dataset: str,
               tests: Iterable[tuple[str, str, str, str, str]]) -> list[str]:
  """A markdown table of claims (figure, arm, reference, kind, text), each decided
  by `claim`; tests whose arms the grid lacks are left out."""
  lines = ["| claim | figure | arm − reference [95% CI] | verdict |", "|---|---|---|---|"]
  for name, arm, reference, kind, text in tests:
    if arm in data["arms"] and reference in data["arms"]:
      out = claim(data, name, dataset, arm, reference, kind)
      lines.append(f"| {text} | {name} ({kind}) | {fmt_interval(out['interval'], 4)} "
                   f"(seeds {len(out['interval']['seeds'])}) | {out['verdict']} |")
  return lines


def add_grid_arguments(parser, baseline: str, default_seeds: int = 3,
                       default_baseline_seeds: int = 5) -> None:
  """--steps, --seeds, --baseline_seeds, --report_only."""
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--seeds", type=int, default=default_seeds, help="seeds per arm")
  parser.add_argument("--baseline_seeds", type=int, default=default_baseline_seeds,
                      help=f"seeds of the baseline, {baseline}")
  parser.add_argument("--report_only", action="store_true",
                      help="rewrite the report from <out>.json, no training")



def chosen(parser, flag: str, value: str, allowed: Sequence[str],
           required: Optional[str] = None) -> tuple[str, ...]:
  """The comma-separated names of --flag ("all": every allowed one), checked."""
  names = tuple(allowed) if value == "all" else tuple(value.split(","))
  unknown = sorted(set(names) - set(allowed))
  if unknown:
    parser.error(f"--{flag}: unknown {unknown}; one of {list(allowed)}")
  if required is not None and required not in names:
    parser.error(f"--{flag} must include {required}, the baseline")
  return names


def run_or_load(parser, args, name: str, arms: Sequence[str], baseline: str,
                datasets: Sequence[str], run_one, write: Callable[[dict[str, Any]], None],
                machine: str) -> dict[str, Any]:
  """The grid's data: loaded (--report_only) or run to completion, writing the
  report after each run and at the end."""
  if args.seeds < 1 or args.baseline_seeds < 1:
    parser.error("--seeds and --baseline_seeds must be at least 1")
  if args.report_only:
    if not os.path.exists(args.out + ".json"):
      parser.error(f"--report_only: {args.out}.json does not exist; run the grid first")
    data = load(args.out + ".json")
  else:
    grid = Grid(name=name, arms=arms, baseline=baseline, datasets=datasets,
                seeds={baseline: args.baseline_seeds, "*": args.seeds})
    data = run_grid(grid, run_one, args.out + ".json",
                    meta={"steps": args.steps, "machine": machine}, after_each=write)
  write(data)
  print(f"[{name}] wrote {args.out}.md", file=sys.stderr)
  return data


def grid_main(description: str, name: str, baseline: str, arms: Sequence[str],
              datasets: Sequence[str], run: Callable[[str, str, int, Any], Mapping[str, Any]],
              write: Callable[[dict[str, Any], Any], None], arms_flag: str = "arms",
              default_baseline_seeds: int = 5) -> dict[str, Any]:
  """The command line of a grid of trainer runs: --steps, --seeds, --baseline_seeds,
  --report_only, --datasets, --<arms_flag>, --out, --workdir, --data_dir; then
  run_or_load with run(arm, dataset, seed, args) and write(data, args)."""
  parser = argparse.ArgumentParser(description=description)
  add_grid_arguments(parser, baseline=baseline, default_baseline_seeds=default_baseline_seeds)
  parser.add_argument("--datasets", default=",".join(datasets))
  parser.add_argument(f"--{arms_flag}", default="all")
  add_path_arguments(parser, name)
  args = parser.parse_args()
  picked_datasets = chosen(parser, "datasets", args.datasets, datasets)
  picked_arms = chosen(parser, arms_flag, getattr(args, arms_flag), arms, required=baseline)
  return run_or_load(parser, args, name, picked_arms, baseline, picked_datasets,
                     lambda arm, dataset, seed: run(arm, dataset, seed, args),
                     lambda data: write(data, args), machine_description())


def machine_description() -> str:
  """jax version, backend, cores and platform: the `machine` of a grid's meta."""
  import platform  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  return (f"jax {jax.__version__}, {jax.default_backend()} backend, {os.cpu_count()} cores, "
          f"shared; {platform.platform()}")


def add_path_arguments(parser, name: str, trains_with_data: bool = True) -> None:
  """--out (experiments/results/<name>) and, for runs of the trainer on TFDS data,
  --workdir (workdir/<name>) and --data_dir ($TFDS_DATA_DIR)."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  parser.add_argument("--out", default=os.path.join(repo, "experiments", "results", name))
  if trains_with_data:
    parser.add_argument("--workdir", default=os.path.join(repo, "workdir", name))
    parser.add_argument("--data_dir", default=os.environ.get("TFDS_DATA_DIR",
                                                             "~/tensorflow_datasets"))


def datasets_with_runs(data: Mapping[str, Any]) -> list[str]:
  """The grid's datasets that hold at least one finished run."""
  return [d for d in data["datasets"] if any(r["dataset"] == d for r in data["runs"])]

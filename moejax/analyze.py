"""Routing analysis of a trained run: traces, measures, report.

  python -m moejax.analyze --workdir=DIR [--step=S] [--tokens=N] [--split=NAME]

Restores the run's checkpoints (every saved one, or step S), routes the same
first N tokens of the evaluation split through each (the same tokens for every
checkpoint and every run on that dataset: the split is read in order), and
stores one trace per checkpoint as DIR/analysis/trace_<split>_<N>_step<S>.npz
(moejax.analysis.trace). A trace already there is reused, so measures are
recomputed without the model. The measures of moejax.analysis over the traces
go to DIR/analysis/analysis.md, with PNG plots and routing.html (a text sample,
each token coloured by its expert, one row per MoE layer).

Mistakes stop at start-up with one line on stderr and exit status 1: a workdir
that is not a run's, a run without checkpoints, a step that was not saved, a
dense model, or a trace file there from another model or dataset (nothing is
overwritten).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
from typing import Any, Optional

import numpy as np

from moejax.analysis import collect
from moejax.analysis import trace as traces

ANALYSIS_DIR = "analysis"
DEFAULT_TOKENS = 8192


class AnalyzeError(ValueError):
  """A workdir, step or trace that cannot be analysed; the message is one line."""


def run_config(workdir: str):
  """The run's config (its config.json) as a ConfigDict."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from moejax.train import workdir as workdirs  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(workdir):
    raise AnalyzeError(f"--workdir {workdir} does not exist")
  values = workdirs.read_config(workdir)
  if values is None:
    raise AnalyzeError(f"--workdir {workdir} has no {workdirs.CONFIG_FILE}: it is not the "
                       "workdir of a moejax.main run")
  config = ml_collections.ConfigDict(values)
  if not config.model.moe_every:
    raise AnalyzeError(f"--workdir {workdir} holds a dense model (model.moe_every = 0): "
                       "it has no routing to analyse or intervene on")
  return config


def saved_steps(workdir: str) -> list[int]:
  from moejax.train import checkpoints  # pylint: disable=g-import-not-at-top
  return checkpoints.saved_steps(os.path.join(workdir, "checkpoints"))


def chosen_steps(workdir: str, step: Optional[int]) -> list[int]:
  steps = saved_steps(workdir)
  if not steps:
    raise AnalyzeError(f"--workdir {workdir} has no checkpoint to analyse (checkpoints/ "
                       "is empty or missing)")
  if step is not None and step not in steps:
    raise AnalyzeError(f"--step {step}: no checkpoint at that step in {workdir}; saved steps: "
                       f"{', '.join(map(str, steps))}")
  return steps if step is None else [step]


def model_digest(config) -> str:
  """Digest of the fields that shape the model and its routing."""
  values = {"model": config.model.to_dict(), "moe": config.moe.to_dict(),
            "tokenizer": config.data.tokenizer}
  text = json.dumps(values, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def trace_path(workdir: str, split: str, tokens: int, step: int) -> str:
  return os.path.join(workdir, ANALYSIS_DIR, f"trace_{split}_{tokens}_step{step}.npz")


def check_trace(trace: traces.RoutingTrace, path: str, expected: dict[str, Any]) -> None:
  """AnalyzeError naming `path` where a stored trace is not of this run's model
  and data."""
  for key in ("model_digest", "dataset", "split", "step"):
    if trace.meta.get(key) != expected[key]:
      raise AnalyzeError(
          f"{path} is a trace of another {key.replace('_', ' ')} ({trace.meta.get(key)}, "
          f"this run: {expected[key]}); move it away to trace again")


def trace_checkpoints(workdir: str, steps: list[int], tokens: int, split: str,
                      config, log=None) -> list[traces.RoutingTrace]:
  """A trace per checkpoint step, read from DIR/analysis where stored, else made
  by restoring the checkpoint and routing the first `tokens` tokens of `split`."""
  log = log or (lambda line: None)
  expected = {"model_digest": model_digest(config), "dataset": config.data.name,
              "split": split}
  out, missing = {}, []
  for step in steps:
    path = trace_path(workdir, split, tokens, step)
    if os.path.exists(path):
      trace = traces.load(path)
      check_trace(trace, path, {**expected, "step": step})
      out[step] = trace
    else:
      missing.append(step)
  if missing:
    for step, trace in _trace_from_checkpoints(workdir, missing, tokens, split, config,
                                               expected, log):
      traces.save(trace, trace_path(workdir, split, tokens, step))
      out[step] = trace
  return [out[s] for s in steps]


def _trace_from_checkpoints(workdir, steps, tokens, split, config, expected, log):
  import jax  # pylint: disable=g-import-not-at-top
  from moejax.parallel import make_mesh  # pylint: disable=g-import-not-at-top
  from moejax.train import setup  # pylint: disable=g-import-not-at-top
  from moejax.train.checkpoints import Checkpointer, abstract_like  # pylint: disable=g-import-not-at-top
  from moejax.train.state import make_optimizer  # pylint: disable=g-import-not-at-top
  from moejax.train.step import split_batch  # pylint: disable=g-import-not-at-top
  from moejax.train.trainer import eval_batches, init_state  # pylint: disable=g-import-not-at-top

  config = _one_device(config)
  tokenizer = setup.tokenizer(config)
  model = setup.build_model(config)
  t = config.train
  tx = make_optimizer(t.learning_rate, t.warmup_steps, t.steps, t.weight_decay, t.grad_clip)
  spec = setup.pipeline_spec(config, split, training=False)
  per_batch = spec.batch_size * spec.seq_len
  limit = -(-tokens // per_batch) + 1
  mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])

  route = jax.jit(functools.partial(collect.model_plans, model))

  with jax.set_mesh(mesh):
    state, _ = init_state(model, tx, config, mesh)
    abstract = abstract_like(state)
    checkpointer = Checkpointer(workdir, t.keep_checkpoints)
    try:
      for step in steps:
        log(f"tracing step {step}: the first {tokens} tokens of {config.data.name}/{split}")
        restored = checkpointer.restore(step, abstract)
        batches = (split_batch(b) for b in eval_batches(spec, tokenizer, limit))
        trace = collect.trace_batches(
            lambda rows, s=restored: route(s, rows), batches, model.routable_experts, tokens,
            meta={**expected, "step": step, "router": config.moe.router,
                  "top_k": config.moe.top_k, "seq_len": config.data.seq_len})
        if trace.num_tokens < tokens:
          log(f"the {split} split holds {trace.num_tokens} tokens, fewer than --tokens "
              f"{tokens}: traced them all")
        yield step, trace
    finally:
      checkpointer.close()


def _one_device(config):
  """The config on one device: analysis routes a few batches, unsharded."""
  config = config.copy_and_resolve_references()
  config.mesh.data, config.mesh.expert, config.mesh.model = 1, 1, 1
  return config


def analyze(workdir: str, step: Optional[int] = None, tokens: int = DEFAULT_TOKENS,
            split: Optional[str] = None, log=None) -> str:
  """Traces (or reads the traces of) the checkpoints and writes the report;
  returns the path of analysis.md."""
  from moejax.analysis import report  # pylint: disable=g-import-not-at-top
  if tokens < 1:
    raise AnalyzeError(f"--tokens must be at least 1, got {tokens}")
  workdir = os.path.abspath(workdir)
  config = run_config(workdir)
  steps = chosen_steps(workdir, step)
  split = split or config.data.eval_split
  runs = trace_checkpoints(workdir, steps, tokens, split, config, log)
  decode = _decoder(config)
  return report.write(os.path.join(workdir, ANALYSIS_DIR), runs, config=config.to_dict(),
                      decode=decode)


def _decoder(config):
  from moejax.train import setup  # pylint: disable=g-import-not-at-top
  tokenizer = setup.tokenizer(config)
  return lambda ids: tokenizer.decode(np.asarray(ids)[None])  # noqa: E731


def main(argv=None) -> int:
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog="python -m moejax.analyze",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="the run's workdir")
  parser.add_argument("--step", type=int, default=None,
                      help="one checkpoint step (default: every saved checkpoint)")
  parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS,
                      help=f"evaluation tokens to trace (default {DEFAULT_TOKENS})")
  parser.add_argument("--split", default=None, help="split to trace (default: the run's "
                      "data.eval_split)")
  args = parser.parse_args(argv)
  try:
    path = analyze(args.workdir, args.step, args.tokens, args.split,
                   log=lambda line: print(line, file=sys.stderr, flush=True))
  except ValueError as e:    # AnalyzeError and the library's own bad-input errors
    print(f"analyze error: {' '.join(str(e).split())}", file=sys.stderr)
    return 1
  print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())

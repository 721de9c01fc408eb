"""The training loop: data, model, optimizer, checkpoints, evaluation, report.

  train(config, workdir) -> final evaluation metrics

Resumes automatically from the latest checkpoint in the workdir: parameters,
optimizer state, `routing` collection and data position are restored, and the
step's random key is fold_in(seed, step), so a resumed run computes the same
losses as an uninterrupted one, and the logs hold each step once: what a killed
run logged after its last checkpoint is dropped (moejax.train.writers). Rerunning
a finished run evaluates it again (for instance with other train.eval_batches),
logs that in place of the evaluation logged at the last step, and reports it.

SIGTERM (a preemption) stops the run at the next step boundary, after an
evaluation in progress, with a checkpoint at that step, one line on stderr and
exit status 75 (moejax.train.preemption). Progress goes to stderr (a tqdm bar
with loss, tokens/s and ETA); metrics go to <workdir>/metrics.jsonl and
TensorBoard. Every train.probe_every steps one fixed evaluation batch is routed
and what changed since the previous probe is logged as split `probe`: the share
of tokens whose top-1 expert moved, and the token-id and domain mutual
information with the expert (moejax.analysis.probe), so a run shows when its
routing settles.
"""
from __future__ import annotations

import math
import os
import sys
import time
from typing import Any, Iterator, NoReturn

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from moejax.analysis import collect, probe
from moejax.data import make_dataset
from moejax.data.pipeline import num_domains
from moejax.parallel import BATCH_AXES, LOGICAL_RULES, make_mesh
from moejax.train import setup
from moejax.train import workdir as workdirs
from moejax.train.checkpoints import Checkpointer, abstract_like
from moejax.train.preemption import Preempted, PreemptionWatch, stop_message
from moejax.train.report import write_report
from moejax.train.state import TrainState, initializer, make_optimizer
from moejax.train.step import (domain_mutual_information, make_eval_step, make_train_step,
                               split_batch)
from moejax.train.writers import MetricWriter

LN2 = math.log(2.0)


def _log(message: str) -> None:
  if jax.process_index() == 0:
    print(message, file=sys.stderr, flush=True)


def _global_batch(batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def _process_sum(values: np.ndarray) -> np.ndarray:
  """`values` summed over the processes (every process passes the same shape)."""
  if jax.process_count() == 1:
    return values
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.sum(multihost_utils.process_allgather(values), axis=0)


def eval_batches(spec, tokenizer, limit: int) -> Iterator[dict[str, np.ndarray]]:
  """This process's first `limit` evaluation batches, in step with the other
  processes: one whose shards have run out gives padding rows while another's
  have not, and the pass ends when all have run out."""
  iterator = iter(make_dataset(spec, tokenizer, prepare=False))
  for _ in range(limit):
    batch = next(iterator, None)
    if not _process_sum(np.int32(batch is not None)):
      return
    yield iterator.padding() if batch is None else batch


def init_state(model: nn.Module, tx, config, mesh) -> tuple[TrainState, Any]:
  """Sharded initial state and its shardings (from the parameters' logical axes)."""
  init = initializer(model, tx, config.train.batch_size // config.train.num_microbatches,
                     config.data.seq_len)
  abstract = jax.eval_shape(init, jax.random.PRNGKey(config.seed))
  specs = nn.get_partition_spec(abstract)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_RULES)
  state = jax.jit(lambda k: nn.meta.unbox(init(k)), out_shardings=shardings)(
      jax.random.PRNGKey(config.seed))
  return state, shardings


def evaluate(state, eval_step, config, batch_sharding, tokenizer) -> dict[str, Any]:
  """Loss, bits per byte and mean routing metrics over the first eval batches."""
  spec = setup.pipeline_spec(config, config.data.eval_split, training=False)
  totals = {"nll_sum": 0.0, "tokens": 0.0}
  layer_sums, batches, local_bytes = None, 0, 0
  for batch in eval_batches(spec, tokenizer, config.train.eval_batches):
    rows = split_batch(batch)
    local_bytes += int(np.sum(tokenizer.token_bytes(rows["targets"]) * rows["mask"]))
    out = jax.device_get(eval_step(state, _global_batch(batch, batch_sharding)))
    totals["nll_sum"] += float(out["nll_sum"])
    totals["tokens"] += float(out["tokens"])
    layer_sums = out["layers"] if layer_sums is None else jax.tree_util.tree_map(
        np.add, layer_sums, out["layers"])
    batches += 1
  totals["bytes"] = float(_process_sum(np.int32(local_bytes)))
  layers = jax.tree_util.tree_map(lambda a: np.asarray(a) / max(batches, 1), layer_sums or {})
  for name, mi in domain_mutual_information(layers).items():
    layers[name]["domain_expert_mi"] = mi
    del layers[name]["domain_expert_counts"]
  return {"loss": totals["nll_sum"] / max(totals["tokens"], 1.0),
          "bits_per_byte": totals["nll_sum"] / LN2 / max(totals["bytes"], 1.0),
          "tokens": totals["tokens"], "layers": layers}


class RoutingProbe:
  """Every train.probe_every steps: routes one fixed evaluation batch and logs how
  routing moved since the previous probe (moejax.analysis.probe). Off with
  probe_every = 0, for dense models, and with more than one process (the trace
  gathers plans on one host); a resumed run's first probe has no predecessor."""

  def __init__(self, model, config, shardings, batch_sharding, tokenizer):
    self.every = int(config.train.get("probe_every", 0) or 0)
    if model.moe is None or jax.process_count() > 1:
      if self.every and jax.process_count() > 1:
        _log("train.probe_every: the routing probe runs on one process only; it is off")
      self.every = 0
    if not self.every:
      return
    spec = setup.pipeline_spec(config, config.data.eval_split, training=False)
    batch = next(iter(make_dataset(spec, tokenizer, prepare=False)))
    self.rows = jax.tree_util.tree_map(np.asarray, split_batch(batch))
    self.batch = _global_batch(batch, batch_sharding)
    self.num_experts = model.routable_experts
    self.meta = {"dataset": config.data.name, "split": config.data.eval_split}
    self.previous = None

    self.route = jax.jit(lambda state, batch: collect.model_plans(model, state,
                                                                  split_batch(batch)),
                         in_shardings=(shardings, batch_sharding))

  def due(self, step: int) -> bool:
    return bool(self.every) and step % self.every == 0

  def __call__(self, state, step: int) -> dict[str, Any]:
    trace = collect.trace_batches(lambda rows: self.route(state, self.batch), [self.rows],
                                  self.num_experts, meta={**self.meta, "step": step})
    record = probe.summary(trace, self.previous)
    self.previous = trace
    return record


def _scalar_summary(metrics: dict[str, Any]) -> dict[str, Any]:
  """Train metrics without per-layer vectors: per-layer scalars are averaged."""
  out = {k: float(v) for k, v in metrics.items() if k != "layers"}
  layers = metrics.get("layers", {})
  for key in ("max_violation", "step_max_violation", "load_cv", "dropped_share",
              "experts_per_token", "router_entropy", "router_marginal_entropy"):
    values = [float(m[key]) for m in layers.values() if key in m]
    if values:
      out[f"mean_{key}"] = float(np.mean(values))
  return out


def compiled_steps(model: nn.Module, tx, config, mesh, shardings, domains: int):
  """(train_step, eval_step, batch sharding): the steps jitted with the state's
  shardings and the batch split over mesh.data * mesh.expert. Call them under
  jax.set_mesh(mesh) (expert parallelism reads the mesh from context)."""
  batch_sharding = NamedSharding(mesh, P(BATCH_AXES))
  data_shards = mesh.shape["data"] * mesh.shape["expert"]
  train_step = jax.jit(make_train_step(model, tx, config.train.num_microbatches, data_shards),
                       in_shardings=(shardings, batch_sharding, None),
                       out_shardings=(shardings, None), donate_argnums=0)
  eval_step = jax.jit(make_eval_step(model, domains), in_shardings=(shardings, batch_sharding))
  return train_step, eval_step, batch_sharding


def train(config, workdir: str, progress: bool = True) -> dict[str, Any]:
  """Trains the config's model in workdir; returns the final evaluation.

  Before any data or model work: the config is validated, the workdir must be a
  writable directory (WorkdirError), fit the config (ConfigError, from its
  config.json) and have disk room for the checkpoints (WorkdirError)."""
  setup.check(config)
  workdirs.check_workdir(workdir)
  mesh = make_mesh(*setup.mesh_shape(config))
  with jax.set_mesh(mesh):
    workdirs.check_run(config, workdir)
    return _train(config, workdir, progress, mesh)


def _stop_preempted(step: int, state, train_iter, checkpointer, writer, bar) -> NoReturn:
  """Saves `state` (that of `step`, the data iterator positioned after it) unless a
  checkpoint holds that step already, says so in one line and raises Preempted."""
  if bar is not None:
    bar.close()
  writer.close()
  if step != (checkpointer.latest_step() or 0):
    checkpointer.save(step, state, train_iter)
  saved = checkpointer.directory if checkpointer.latest_step() == step else None
  checkpointer.close()
  _log(stop_message(step, saved))
  raise Preempted(step)


def _train(config, workdir: str, progress: bool, mesh) -> dict[str, Any]:
  tokenizer = setup.tokenizer(config)
  model = setup.build_model(config)
  t = config.train
  tx = make_optimizer(t.learning_rate, t.warmup_steps, t.steps, t.weight_decay, t.grad_clip)

  train_iter: Iterator = iter(make_dataset(
      setup.pipeline_spec(config, config.data.train_split, training=True), tokenizer))
  state, shardings = init_state(model, tx, config, mesh)
  checkpointer = Checkpointer(workdir, t.keep_checkpoints)
  resume = checkpointer.restore_latest(abstract_like(state), train_iter)
  for line in resume.warnings(checkpointer.directory):
    _log(line)
  start = resume.step
  if start:
    state = resume.state
  workdirs.save_config(config, workdir, resumed=bool(start))
  if start:
    _log(f"resumed from checkpoint at step {start} in {checkpointer.directory}")
  num_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(state.params))
  _log(f"model: {num_params / 1e6:.2f}M parameters, {len(jax.devices())} device(s), "
       f"mesh {dict(mesh.shape)}; training steps {start}..{t.steps} in {workdir}")

  domains = num_domains(setup.pipeline_spec(config, config.data.eval_split, training=False))
  train_step, eval_step, batch_sharding = compiled_steps(model, tx, config, mesh, shardings,
                                                         domains)
  writer = MetricWriter(workdir, enabled=jax.process_index() == 0,
                        resume_step=start if start else None)
  routing_probe = RoutingProbe(model, config, shardings, batch_sharding, tokenizer)
  base_key = jax.random.PRNGKey(config.seed)

  bar = None
  if progress and jax.process_index() == 0:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=t.steps, initial=start, desc="train", unit="step", file=sys.stderr,
               dynamic_ncols=True)
  window_start, evaluation = time.time(), None
  with PreemptionWatch() as preemption:
    for step in range(start, t.steps):
      if preemption.reached(step):
        _stop_preempted(step, state, train_iter, checkpointer, writer, bar)
      batch = _global_batch(next(train_iter), batch_sharding)
      state, metrics = train_step(state, batch, jax.random.fold_in(base_key, step))
      done = step + 1
      if done % t.log_every == 0 or done == t.steps:
        metrics = jax.device_get(metrics)
        elapsed = time.time() - window_start
        summary = _scalar_summary(metrics)
        summary["tokens_per_s"] = float(metrics["tokens"]) * t.log_every / max(elapsed, 1e-9)
        writer.write(done, "train", {**summary, "layers": metrics["layers"]})
        if bar is not None:
          bar.set_postfix(loss=f"{summary['loss']:.3f}",
                          tok_s=f"{summary['tokens_per_s']:.0f}")
        window_start = time.time()
      if bar is not None:
        bar.update(1)
      if routing_probe.due(done):
        writer.write(done, "probe", routing_probe(state, done))
      if done % t.eval_every == 0 or done == t.steps:
        # A preemption during evaluation stops the run after it, with its record.
        evaluation = evaluate(state, eval_step, config, batch_sharding, tokenizer)
        writer.write(done, "eval", evaluation)
        _log(f"\nstep {done}: eval loss {evaluation['loss']:.4f}, "
             f"bits per byte {evaluation['bits_per_byte']:.4f}")
      if done % t.checkpoint_every == 0 or done == t.steps:
        writer.flush()     # the records up to `done` on disk before its checkpoint
        checkpointer.save(done, state, train_iter)
  if bar is not None:
    bar.close()
  if evaluation is None:   # a finished run, rerun: evaluate it again, replacing its record
    evaluation = evaluate(state, eval_step, config, batch_sharding, tokenizer)
    writer.write(t.steps, "eval", evaluation, replace=True)
  if jax.process_index() == 0:
    write_report(workdir, t.steps, evaluation)
    _log(f"routing report: {os.path.join(workdir, 'routing_report.md')}")
  writer.close()
  checkpointer.close()
  return evaluation

"""A trained language model held fixed, and its next-token loss under a logit bias.

  Frozen(model, variables, step)               a TransformerLM and its variables
  restore(workdir, step=None)                  (Frozen, config) from a run's checkpoint
  sequence_rows(config, split, rows, ...)      evaluation rows inside one document
  token_nll(frozen, tokens, collection)        nll [B, L] of tokens [B, L + 1]

Rows are tokens [B, L + 1]: the model reads tokens[:, :-1] and predicts
tokens[:, 1:], so nll[:, j] is the loss of token j + 1 (as in train/step.py).
Every intervention reads a trained model through this module and writes only
under the workdir's `interventions/` directory, never to its checkpoints.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from moejax.interventions import bias as biases

Array = jax.Array
REPORT_DIR = "interventions"


@dataclasses.dataclass(frozen=True, eq=False)
class Frozen:
  """A TransformerLM with MoE layers and its variables (`params`, `routing`,
  unboxed) at training step `step`. Compared by identity (the variables are
  arrays); its compiled functions are cached per model, which is hashable."""

  model: Any
  variables: Mapping[str, Any]
  step: int = 0

  def __post_init__(self):
    biases.check_model(self.model)
    # Parameters as arrays (init's logical-axis boxes removed).
    object.__setattr__(self, "variables", nn.meta.unbox(self.variables))

  def apply(self, tokens: Array, collection: Optional[Mapping] = None) -> tuple[Array, dict]:
    """tokens int[B, L] -> (logits [B, L, V], aux) in evaluation mode, with the
    `logit_bias` collection when given (jitted: one program per model, shapes
    and collection structure, whatever the variables)."""
    return apply_model(self.model, jnp.int32(self.step), self.variables, tokens, collection)

  def with_variables(self, variables: Mapping[str, Any]) -> "Frozen":
    """This model with other variables (e.g. traced ones, inside a jitted function)."""
    return dataclasses.replace(self, variables=variables)

  def zero_bias(self, batch: int, length: int) -> dict:
    """The `logit_bias` collection with every delta zero [E'] for inputs [B, L]
    (its shapes found once per model and input shape)."""
    key = (self.model, batch, length)
    if key not in _ZERO_BIAS:
      _ZERO_BIAS[key] = biases.zeros(self.model, self.variables,
                                     jnp.zeros((batch, length), jnp.int32))
    return _ZERO_BIAS[key]


_ZERO_BIAS: dict = {}


@functools.partial(jax.jit, static_argnums=0)
def apply_model(model, step: Array, variables: Mapping[str, Any], tokens: Array,
                collection: Optional[Mapping]) -> tuple[Array, dict]:
  """model.apply in evaluation mode with the `logit_bias` collection (or none)."""
  return model.apply(biases.with_bias(variables, collection), tokens, deterministic=True,
                     step=step)


def token_nll(frozen: Frozen, tokens: Array, collection: Optional[Mapping] = None) -> Array:
  """nll float32[B, L] of rows tokens int[B, L + 1] (nll[:, j]: token j + 1)."""
  logits, _ = frozen.apply(tokens[:, :-1], collection)
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])


def restore(workdir: str, step: Optional[int] = None):
  """(Frozen, config) of a moejax.main run at checkpoint `step` (default: the
  latest), on one device. ValueError naming --workdir or --step when there is no
  such run, checkpoint or routing."""
  from moejax import analyze  # pylint: disable=g-import-not-at-top
  from moejax.parallel import make_mesh  # pylint: disable=g-import-not-at-top
  from moejax.train import setup  # pylint: disable=g-import-not-at-top
  from moejax.train.checkpoints import Checkpointer, abstract_like  # pylint: disable=g-import-not-at-top
  from moejax.train.state import make_optimizer  # pylint: disable=g-import-not-at-top
  from moejax.train.trainer import init_state  # pylint: disable=g-import-not-at-top

  workdir = os.path.abspath(workdir)
  config = analyze._one_device(analyze.run_config(workdir))  # pylint: disable=protected-access
  step = analyze.chosen_steps(workdir, step)[-1]
  model = setup.build_model(config)
  biases.check_model(model)
  t = config.train
  tx = make_optimizer(t.learning_rate, t.warmup_steps, t.steps, t.weight_decay, t.grad_clip)
  mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
  with jax.set_mesh(mesh):
    state, _ = init_state(model, tx, config, mesh)
    checkpointer = Checkpointer(workdir, t.keep_checkpoints)
    try:
      state = checkpointer.restore(step, abstract_like(state))
    finally:
      checkpointer.close()
  variables = {"params": state.params, **({"routing": state.routing} if state.routing else {})}
  variables = jax.device_get(variables)
  return Frozen(model, variables, int(state.step)), config


def sequence_rows(config, split: str, rows: int, domain: Optional[int] = None,
                  skip: int = 0) -> tuple[np.ndarray, dict[str, int]]:
  """Up to `rows` evaluation rows int32[N, L + 1] of `split` that lie inside one
  document (a row that spans a document boundary or holds padding is skipped
  and counted), optionally of one `domain`
  (labelled data only), after skipping the first `skip` such rows. Returns the
  rows and the counts {"rows", "skipped_boundary", "skipped_domain"}."""
  from moejax.train import setup  # pylint: disable=g-import-not-at-top
  from moejax.train.trainer import eval_batches  # pylint: disable=g-import-not-at-top
  spec = setup.pipeline_spec(config, split, training=False)
  tokenizer = setup.tokenizer(config)
  kept: list[np.ndarray] = []
  counts = {"rows": 0, "skipped_boundary": 0, "skipped_domain": 0}
  for batch in eval_batches(spec, tokenizer, limit=1 << 30):
    tokens = np.asarray(batch["tokens"])
    segments = np.asarray(batch["tokens_segment_ids"])
    labels = batch.get("domain")
    for i in range(tokens.shape[0]):
      if not (segments[i] == segments[i, 0]).all() or segments[i, 0] == 0:
        counts["skipped_boundary"] += 1
        continue
      if domain is not None:
        if labels is None:
          raise ValueError(f"--domain {domain}: dataset {config.data.name} has no domain "
                           "labels")
        if int(np.asarray(labels)[i, 0]) != domain:
          counts["skipped_domain"] += 1
          continue
      if skip:
        skip -= 1
        continue
      kept.append(tokens[i])
      if len(kept) == rows:
        break
    if len(kept) == rows:
      break
  if not kept:
    raise ValueError(f"split {split!r} of {config.data.name} has no row holding one whole "
                     f"document{'' if domain is None else f' of domain {domain}'}")
  counts["rows"] = len(kept)
  return np.stack(kept).astype(np.int32), counts


def report_dir(workdir: str) -> str:
  """DIR/interventions, created: where every intervention writes."""
  path = os.path.join(os.path.abspath(workdir), REPORT_DIR)
  os.makedirs(path, exist_ok=True)
  return path

"""Routing after training (moejax.interventions): the bias built by layer, test-time
rerouting, steering and the oracle gap on a tiny untrained model, against hand
computations. `python -m moejax.intervene` runs on the trained run of
tests/test_analyze.py."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.interventions import Frozen, bias, oracle, reroute, roma, steer
from moejax.interventions.frozen import token_nll
from moejax.models import TransformerLM
from tests.helpers import jit_init

V, N, L = 16, 4, 9          # vocabulary, rows, tokens per row (8 inputs)


@functools.lru_cache(maxsize=None)
def _frozen(router="topk", **model):
  moe = dict(num_experts=4, top_k=2, hidden_dim=16, router=router, engine="loop")
  lm = TransformerLM(vocab_size=V, num_layers=model.get("num_layers", 2), model_dim=16,
                     num_heads=2, mlp_dim=32, moe=moe)
  variables = jit_init(lm, jax.random.PRNGKey(0), jnp.zeros((1, L - 1), jnp.int32))
  return Frozen(lm, variables)


def _rows(seed=0, n=N):
  return np.asarray(jax.random.randint(jax.random.PRNGKey(seed), (n, L), 0, V), np.int32)


def test_collection_from_layer_deltas_and_its_errors():
  frozen = _frozen()
  zero = frozen.zero_bias(N, L - 1)
  assert bias.widths(zero) == {"layer_0": 4, "layer_1": 4}
  delta = np.arange(4, dtype=np.float32)
  collection = bias.to_collection(zero, {"layer_1": delta})
  np.testing.assert_array_equal(collection["block_1"]["moe"]["router"]["delta"], delta)
  np.testing.assert_array_equal(collection["block_0"]["moe"]["router"]["delta"], np.zeros(4))
  assert set(bias.layer_deltas(collection)) == {"layer_0", "layer_1"}
  # A zero bias leaves the logits bit-identical; this one changes them.
  rows = _rows()
  plain = token_nll(frozen, rows)
  np.testing.assert_array_equal(token_nll(frozen, rows, zero), plain)
  assert float(jnp.max(jnp.abs(token_nll(frozen, rows, collection) - plain))) > 1e-4
  with pytest.raises(ValueError, match=r"deltas\['layer_1'\] has shape \(5,\).*takes \[4\]"):
    bias.to_collection(zero, {"layer_1": np.zeros(5)})
  with pytest.raises(ValueError, match=r"deltas\['layer_7'\]: no such MoE layer"):
    bias.to_collection(zero, {"layer_7": np.zeros(4)})
  # A per-sequence bias whose batch is not the apply's: the router names the shape.
  with pytest.raises(ValueError, match=r"must be \[4\] or \[4, 4\]; got shape \(3, 4\)"):
    token_nll(frozen, rows, bias.to_collection(zero, {"layer_0": np.zeros((3, 4))}))


def test_routers_without_logits_and_dense_models_are_refused():
  with pytest.raises(ValueError, match="router 'hash' has no logits to bias"):
    _frozen("hash")
  dense = TransformerLM(vocab_size=V, num_layers=1, model_dim=16, num_heads=2, mlp_dim=32)
  with pytest.raises(ValueError, match="dense model has no routers"):
    Frozen(dense, {})


def test_rerouting_first_step_is_adams_sign_step_and_rows_adapt_alone():
  """Adam's first update is -lr * g / (|g| + eps'), i.e. -lr * sign(g) for every
  coordinate with |g| >> 1e-8, kept for a row where it lowered the row's
  context loss (else the row keeps zero); each row's deltas depend on its own
  tokens alone (changing row 0 changes only row 0's)."""
  frozen, rows = _frozen(), _rows()
  one = reroute.Settings(steps=1, learning_rate=0.1)
  deltas, losses = reroute.adapt(frozen, rows, one)
  zero = frozen.zero_bias(N, L - 1)

  def loss(d):
    return jnp.sum(jnp.mean(token_nll(frozen, rows, bias.to_collection(zero, d)), axis=1))
  grads = jax.grad(loss)({l: jnp.zeros((N, 4)) for l in ("layer_0", "layer_1")})
  improved = np.asarray(losses[1] < losses[0])[:, None]
  for layer, g in grads.items():
    g = np.asarray(g)
    want = np.where(improved, -0.1 * np.sign(g), 0.0)
    big = np.abs(g) > 1e-6
    np.testing.assert_allclose(np.asarray(deltas[layer])[big], want[big], rtol=1e-3)
  np.testing.assert_allclose(losses[0], np.mean(token_nll(frozen, rows), axis=1), rtol=1e-6)

  settings = reroute.Settings(steps=5, learning_rate=0.1)
  together, losses = reroute.adapt(frozen, rows, settings)
  other = rows.copy()
  other[0] = (other[0] + 1) % V                  # another row 0: row 2's fit stays
  again, _ = reroute.adapt(frozen, other, settings)
  for layer in together:
    np.testing.assert_allclose(again[layer][1:], together[layer][1:], rtol=1e-5, atol=1e-7)
  assert np.all(losses[-1] < losses[0])      # the context's own loss falls
  # The kept deltas give each row its lowest loss over the steps.
  kept = np.mean(np.asarray(token_nll(frozen, rows, bias.to_collection(
      frozen.zero_bias(N, L - 1), together))), axis=1)
  np.testing.assert_allclose(kept, np.asarray(losses).min(axis=0), rtol=1e-5)


def test_reroute_rows_scores_the_continuation_with_and_without_deltas():
  frozen, rows = _frozen(), _rows(1)
  out = reroute.reroute_rows(frozen, rows, 4, reroute.Settings(steps=3,
                                                              layers=("layer_1",)))
  nll = np.asarray(token_nll(frozen, rows))
  np.testing.assert_allclose(out["plain"], nll[:, 3:].mean(axis=1), rtol=1e-6)
  collection = bias.to_collection(frozen.zero_bias(N, L - 1), out["deltas"])
  want = np.asarray(token_nll(frozen, rows, collection))[:, 3:].mean(axis=1)
  np.testing.assert_allclose(out["rerouted"], want, rtol=1e-5)
  assert set(out["deltas"]) == {"layer_1"}
  # The context's loss under the kept deltas: each row's lowest over the steps.
  context = rows[:, :4]
  kept = np.asarray(token_nll(frozen, context, bias.to_collection(
      frozen.zero_bias(N, 3), out["deltas"]))).mean(axis=1)
  np.testing.assert_allclose(out["context_loss_kept"], kept, rtol=1e-5)
  np.testing.assert_allclose(out["context_loss_kept"], out["context_loss"].min(axis=0))
  with pytest.raises(ValueError, match="prompt_len must be in"):
    reroute.reroute_rows(frozen, rows, L, reroute.Settings())
  with pytest.raises(ValueError, match="layers: layer_5"):
    reroute.adapt(frozen, rows, reroute.Settings(layers=("layer_5",)))
  with pytest.raises(ValueError, match="steps"):
    reroute.Settings(steps=0)


def test_rerouted_generation_holds_the_fitted_deltas():
  """With adapt_every >= the new tokens there is one fit, on the prompt; the
  tokens are those of generating with that fit's deltas held."""
  from moejax.models import generate
  frozen, prompt = _frozen(), _rows(2)[:2, :4]
  settings = reroute.Settings(steps=2, adapt_every=8)
  tokens, deltas = reroute.generate(frozen, prompt, 3, settings)
  fitted, _ = reroute.adapt(frozen, prompt, settings)
  collection = bias.to_collection(frozen.zero_bias(2, 4), fitted)
  want = generate(frozen.model, bias.with_bias(frozen.variables, collection), prompt, 3)
  np.testing.assert_array_equal(tokens, want)
  for layer in fitted:
    np.testing.assert_allclose(deltas[layer], fitted[layer], rtol=1e-6)


def test_steering_picks_experts_by_lift_and_a_large_bias_forces_them():
  reference = {"layer_0": np.array([0.4, 0.1, 0.3, 0.2])}
  contrast = {"layer_0": np.array([0.25, 0.25, 0.25, 0.25])}
  # lift = [0.15, -0.15, 0.05, -0.05]: experts 0 and 2.
  deltas = steer.steering_deltas(reference, contrast, top=2, strength=2.0)
  np.testing.assert_array_equal(deltas["layer_0"], [2.0, 0.0, 2.0, 0.0])
  with pytest.raises(ValueError, match=r"top \(5\) must be <= the experts"):
    steer.steering_deltas(reference, contrast, top=5, strength=1.0)

  frozen, rows = _frozen(), _rows(3)
  usage = steer.expert_usage(frozen, rows)
  for u in usage.values():
    np.testing.assert_allclose(u.sum(), 1.0, rtol=1e-12)
  # +50 on expert 3 of layer 1: every token picks it, half of the K = 2 picks.
  forced = {"layer_1": np.array([0.0, 0.0, 0.0, 50.0], np.float32)}
  steered = steer.steer_rows(frozen, rows, forced)
  np.testing.assert_allclose(steered["plain"], np.mean(token_nll(frozen, rows), axis=1),
                             rtol=1e-6)
  collection = bias.to_collection(frozen.zero_bias(N, L - 1), forced)
  _, aux = frozen.apply(jnp.asarray(rows[:, :-1]), collection)
  plan = aux["layer_1"].plan
  assert int(jnp.sum(plan.valid & (plan.expert == 3))) == N * (L - 1)


def test_oracle_gap_is_a_search_over_the_candidates():
  frozen, rows = _frozen(), _rows(4)
  result = oracle.oracle_gap(frozen, rows, strengths=(3.0,), passes=1)
  plain = np.mean(np.asarray(token_nll(frozen, rows)), axis=1)
  np.testing.assert_allclose(result["plain"], plain, rtol=1e-5)
  for layer, best in result["per_layer"].items():
    assert np.all(best <= result["plain"] + 1e-7)
  # Coordinate descent starts with layer_0's own search, so it ends no worse.
  assert np.all(result["oracle"] <= result["per_layer"]["layer_0"] + 1e-6)
  # The chosen candidates reproduce the oracle's nll: 0 none, 1 + j expert j.
  deltas = {l: oracle.candidate_deltas(4, (3.0,))[c] for l, c in result["choice"].items()}
  collection = bias.to_collection(frozen.zero_bias(N, L - 1), deltas)
  np.testing.assert_allclose(np.mean(token_nll(frozen, rows, collection), axis=1),
                             result["oracle"], rtol=1e-5)
  summary = oracle.summary(result)
  assert summary["gap"] >= 0 and summary["rows"] == N
  with pytest.raises(ValueError, match="strengths must be non-zero"):
    oracle.oracle_gap(frozen, rows, strengths=(0.0,))


def test_roma_neighbours_and_router_mask_by_hand():
  pool = np.array([[0.0], [1.0], [2.0], [10.0]])
  nll = np.array([1.0, 1.0, 5.0, 1.0])          # median 1: samples 0, 1, 3 succeed
  np.testing.assert_array_equal(
      roma.successful_neighbours(np.array([[0.9], [9.0]]), pool, nll, 2), [[1, 0], [3, 1]])
  np.testing.assert_array_equal(
      roma.successful_neighbours(pool, pool, nll, 1, exclude_self=True), [[1], [0], [1], [1]])
  with pytest.raises(ValueError, match=r"neighbours \(3\) must be at most"):
    roma.successful_neighbours(pool, pool, nll, 3, exclude_self=True)
  params = _frozen().variables["params"]
  routers, rest = roma.split_router_params(params)
  assert sorted("/".join(p) for p in routers) == [
      "block_0/moe/router/gate/kernel", "block_1/moe/router/gate/kernel"]
  assert len(rest) > 10
  with pytest.raises(ValueError, match="no router parameters to train"):
    roma.split_router_params({"block_0": {"ffn": {"kernel": np.zeros(2)}}})


def test_roma_trains_the_routers_alone_and_measures_the_alignment():
  frozen, rows = _frozen(), _rows(5, n=6)
  settings = roma.Settings(steps=2, learning_rate=1e-2, batch_size=6, weight=1.0,
                           neighbours=2)
  tuned, history = roma.finetune(frozen, rows, rows, settings)
  routers, rest = roma.split_router_params(frozen.variables["params"])
  new_routers, new_rest = roma.split_router_params(tuned.variables["params"])
  for path in rest:
    np.testing.assert_array_equal(new_rest[path], rest[path])
  assert all(np.abs(new_routers[p] - routers[p]).max() > 0 for p in routers)
  # Step 0's figures by hand: the plain CE and the mean squared distance of each
  # row's routing profile to its two neighbours', summed over layers.
  pool_nll = np.mean(np.asarray(token_nll(frozen, rows)), axis=1)
  neighbours = roma.successful_neighbours(roma.embeddings(frozen, rows),
                                          roma.embeddings(frozen, rows), pool_nll, 2,
                                          exclude_self=True)
  _, aux = frozen.apply(jnp.asarray(rows[:, :-1]))
  profiles = roma.routing_profiles(aux, rows.shape[0])
  align = sum(np.sum((np.asarray(r)[:, None] - np.asarray(r)[neighbours]) ** 2) / (2 * 6)
              for r in profiles.values())
  np.testing.assert_allclose(history[0], [pool_nll.mean(), align], rtol=1e-4)
  with pytest.raises(ValueError, match=r"batch_size \(8\) exceeds the training rows"):
    roma.finetune(frozen, rows, rows, roma.Settings(batch_size=8))

"""The MoE layer: router -> capacity -> engine(experts) -> combine.

  y, aux = MoE(num_experts=8, top_k=2, hidden_dim=1024)(x, ctx)

x [B, L, D] -> y [B, L, D]. The router turns x into a RoutingPlan; an optional
capacity step drops (and counts) assignments over C per expert; the engine runs
the plan with stacked experts; shared experts, if any, add a dense FFN on every
token. `aux` carries the weighted total loss, every loss unweighted, the routing
metrics and the final plan.

Granularity m (DeepSeekMoE, Dai et al. 2024): E -> mE experts, K -> mK per token,
F -> F/m hidden width, so active and total FLOPs stay those of (E, K, F).
Shared experts: K_s always-on experts of width F/m, run as one dense FFN of width
K_s * F/m.

Chain-of-Experts (Wang et al. 2025, "Chain-of-Experts: Unlocking the
Communication Power of Mixture-of-Experts Models"): with `chain` I > 1 the layer
runs I passes over the same experts, each with its own router (any registered
one; the first is `router`, the others `router_1`, ...):

  x_0 = x,  x_i = x_{i-1} + sum_e g_ie E_e(x_{i-1}) (+ shared experts of x_{i-1}),
  y = x_I - x_0

as the published code's inner residual, shared experts included in every pass.
y leaves out x_0 so that the block's residual adds the chain's update once and
I = 1 is the plain layer. Compute matches K per token at K/I per pass. The
losses sum over the passes (each router balances its own pass, as in the
published code); the metrics are the passes' mean; `plan`, `routed_plan` and
`probs` are the first pass's, and ERC reads the first router. A router's carry
passes from one pass to the next and on to the next layer.

Expert reuse (ReXMoE, "ReXMoE: Reusing Experts with Minimal Overhead in
Mixture-of-Experts", 2025): a model sets `expert_pool` (the mE * pool_layers
experts of pool_layers adjacent MoE layers, one module shared by them) and the
layer's `pool_position` j; the router then scores the whole pool, ordered from
this layer's own mE experts (pool rows j*mE, ...) round the pool: its expert e is
pool expert (e + j*mE) mod the pool size. The router learns the layer's own
count as RoutingContext.own_experts (routers/rexmoe.py grows its candidates from
them). The pool's stacked weights are rolled into that order per call.

Besides the router's own losses the layer offers two, computed only when
weighted (`loss_weights`):
  tsallis  balance.tsallis_entropy of the router distribution, q = tsallis_q,
           averaged over the real tokens (DynMoLE 2025).
  erc      expert-router coupling ("Coupling Experts and Routers in MoE via an
           Auxiliary Loss", 2025): the router's expert vectors (columns of W_g),
           perturbed in training by multiplicative noise U(1 - erc_noise,
           1 + erc_noise), are run through every expert; M_ij is the norm of
           expert i's intermediate activation on proxy j (act(p W_i) or
           act(p W_gate,i) * (p W_up,i)); balance.erc_loss penalises M for not
           being diagonal, and the metrics report its diagonal dominance. The
           cost is E^2 expert activations, whatever the batch.

Every router takes one path: the engine runs the plan over the router output's
rows (the tokens; Soft MoE's slot mixes) and `to_tokens` maps the result back, so
the layer never asks which router it runs. Padding (RoutingContext.segment_ids 0)
is routed nowhere and left out of the layer's losses and metrics.

Expert parallelism: with `expert_parallel` set (a parallel.ExpertParallel) and a
mesh in context (jax.set_mesh), the experts run sharded over the mesh's `expert`
axis (moejax.parallel.sharded_experts); routing and its losses are unchanged, and
the metrics gain `ep_dropped`, `ep_spilled`, `ep_device_rows` and `ep_load_ratio`.

A router that looks at other tokens of the batch (expert choice, Sinkhorn in
training, Soft MoE) raises in a causal model (RoutingContext.causal) unless its
allow_noncausal is set (routers.check_causal).

In a model written by others the layer stands in for an MLP block: with
aux="sow" it returns y alone and sows its weighted loss and metrics (moejax.sown);
dtype=None follows the input; `rng_name` names the stream of router noise;
`kernel_init`, `use_bias` and `dropout_rate` are the MLP block's options; x may be
[T, D]; `decode` turns capacity off, so one token at a time routes as in the full
forward; without a mesh in context an expert-parallel layer runs unsharded.

Router state that is not a parameter (the aux-free bias and its step counts)
lives in the `routing` collection; `update_routing()`, applied with
mutable=['routing'] after the optimizer step, lets the router update it. What a
model or training step must do for the router (a carry to the next MoE layer,
attention probabilities, a second pass, step counts) is declared by the router
(routers/base.py) and read here through `router_spec` and `step_needs`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from flax.core import FrozenDict

from moejax import balance, capacity, dispatch, metrics, parallel, routers, sown, validation
from moejax.core import RouterOutput, RoutingContext, RoutingPlan
from moejax.experts import ExpertFFN, FFNWeights, dense_matmul

Array = jax.Array

LAYER_LOSSES = ("tsallis", "erc")
AUX_OUTPUTS = ("return", "sow")


def check_auto_mesh() -> None:
  """Raises ValueError, naming the axes, when the mesh in context has Explicit
  axes: the layer shards through the compiler (Auto axes), as linen's logical
  partitioning does."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return
  explicit = [name for name, kind in zip(mesh.axis_names, mesh.axis_types)
              if kind == jax.sharding.AxisType.Explicit]
  if explicit:
    raise ValueError(
        f"MoE runs under a mesh with Auto axes, but the mesh in context has Explicit axes "
        f"{explicit}: build it with jax.make_mesh(..., axis_types=(jax.sharding.AxisType."
        "Auto,) * n) or moejax.parallel.make_mesh")


class MoEAux(flax.struct.PyTreeNode):
  """What the MoE layer returns beside y.

  Attributes:
    loss: scalar, sum of loss_weights[name] * losses[name].
    losses: every router loss, unweighted.
    metrics: `load` [E] (valid assignments per expert), `max_violation`,
      `load_cv`, `experts_per_token`, `router_entropy` (mean per-token
      entropy), `router_marginal_entropy` (entropy of the mean distribution),
      `dropped`, `dropped_share`, the ERC diagonal dominance when the ERC loss
      is on, and the router's own metrics.
    plan: the assignments of tokens to experts after capacity, for analysis (for
      Soft MoE each token's expert of largest combine mass).
    routed_plan: the router's assignments before capacity, slot for slot those
      of `plan` (moejax.analysis traces read both).
    probs: float32[T, E_all], the router's distribution over each token (what
      the balance losses and entropy metrics read), for analysis.
    counts: float32[E], the router's selection counts before capacity, or None
      (StepNeeds.counts_for_loss sums them over a step).
    carry: what the router hands to the next MoE layer, or None.
  """

  loss: Array
  losses: dict[str, Array]
  metrics: dict[str, Array]
  plan: RoutingPlan
  routed_plan: Optional[RoutingPlan] = None
  probs: Optional[Array] = None
  counts: Optional[Array] = None
  carry: Optional[Any] = None


class MoE(nn.Module):
  """Mixture-of-Experts FFN. See the module docstring.

  Attributes:
    num_experts: E, routed experts before granularity.
    hidden_dim: F, hidden width of one expert before granularity.
    top_k: K, experts per token before granularity (routers that choose
      differently read it as their default).
    router: a name in moejax.routers.names().
    router_kwargs: the router's own settings (e.g. score='sigmoid').
    engine: `sorted` (dropless, default), `einsum` or `loop` (the oracle).
    backend: grouped-matmul backend of `sorted`: `auto` (default: the backend
      checked on the running platform, dispatch.gmm.AUTO_BACKEND), `xla`,
      `pallas` or `ragged_dot`.
    block_size: row tile of the `xla` backend.
    kernel_settings: pallas_kernels.KernelSettings of the `pallas` backend
      (target, tiles per pass); None for the platform's defaults.
    capacity_factor: None for dropless, else C = ceil(cf * T * K / E).
    drop_policy: `position` or `score` (see moejax.capacity).
    expert_type: `glu` or `mlp`.
    activation: `silu`, `gelu` or `relu`.
    granularity: m, fine-grained expert split.
    num_shared_experts: K_s, always-on experts.
    loss_weights: weight of each loss in `aux.loss`, by name: the router's losses
      and the layer's `tsallis` and `erc`. None: the router's
      default_loss_weights; in a mapping, a name missing weighs 0, a None entry
      takes the router's default, and names the router does not return are
      refused unless their weight is 0 or None (one table may serve every
      router, as a config's does).
    tsallis_q: q of the Tsallis entropy.
    erc_noise: multiplicative noise on the ERC proxies (training only).
    erc_form: `ce` or `margin` (see balance.erc_loss).
    erc_margin: the margin of the `margin` form.
    model_dim: D, if given, checked against the input.
    dtype: activation and expert compute dtype; None (default) follows the
      input, as Flax layers do; routers always use float32.
    param_dtype: parameter dtype.
    deterministic: no training noise; may also be passed at call time.
    decode: route for inference: no capacity, so each token's output depends on
      that token alone under a causal router (cached decoding, one token at a
      time, equals the full forward); may also be passed at call time.
    expert_parallel: None (experts on every device, sharded by the compiler) or
      a parallel.ExpertParallel: all_to_all or all_gather over the mesh in
      context (unsharded without one).
    rng_name: the rng stream of router noise and ERC proxies in training.
    kernel_init: initializer of one expert's matrix ([D, F] or [F, D]), applied
      to each expert with its own key; None: truncated normal, fan-in scaled.
    use_bias: biases b_wi* [E, F] and b_wo [E, D] (and the shared experts').
    bias_init: initializer of one expert's bias.
    dropout_rate: dropout on the experts' hidden activation in training.
    dropout_rng_name: its rng stream.
    aux: `return`: __call__ returns (y, MoEAux); `sow`: it returns y alone and
      sows the weighted loss into the collection `moe_losses` and the metrics
      into `moe_metrics` (not at init); apply with mutable=moejax.SOWN and read
      them with moejax.sown_aux. Routers that hand a carry on need `return`.
    chain: I, Chain-of-Experts passes over the same experts (1: plain).
    expert_pool: the FFNWeights of a pool of pool_layers * mE experts shared
      with adjacent layers (set by the model, see the module docstring), or None
      for the layer's own experts.
    pool_layers: r, the layers sharing expert_pool.
    pool_position: j in [0, r), this layer's own experts in the pool.
  """

  num_experts: int
  hidden_dim: int
  top_k: int = 2
  router: str = "topk"
  router_kwargs: Mapping[str, Any] = FrozenDict()
  engine: str = "sorted"
  backend: str = "auto"
  block_size: int = 128
  kernel_settings: Optional[Any] = None
  capacity_factor: Optional[float] = None
  drop_policy: str = "position"
  expert_type: str = "glu"
  activation: str = "silu"
  granularity: int = 1
  num_shared_experts: int = 0
  loss_weights: Optional[Mapping[str, float]] = None
  tsallis_q: float = 2.0
  erc_noise: float = 0.1
  erc_form: str = "ce"
  erc_margin: float = 0.5
  model_dim: Optional[int] = None
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32
  deterministic: Optional[bool] = None
  decode: bool = False
  expert_parallel: Optional[parallel.ExpertParallel] = None
  rng_name: str = "router"
  kernel_init: Optional[Callable[..., Any]] = None
  use_bias: bool = False
  bias_init: Callable[..., Any] = nn.initializers.zeros
  dropout_rate: float = 0.0
  dropout_rng_name: str = "dropout"
  aux: str = "return"
  chain: int = 1
  expert_pool: Optional[nn.Module] = None
  pool_layers: int = 1
  pool_position: int = 0

  def __post_init__(self):
    # Mappings frozen, so that equal layers (and the models holding them) hash
    # alike: a model may be a static argument of jax.jit.
    for field in ("router_kwargs", "loss_weights"):
      value = getattr(self, field)
      if value is not None and not isinstance(value, FrozenDict):
        object.__setattr__(self, field, FrozenDict(value))
    validation.positive_int("num_experts", self.num_experts)
    validation.positive_int("hidden_dim", self.hidden_dim)
    validation.positive_int("top_k", self.top_k)
    validation.positive_int("granularity", self.granularity)
    if self.hidden_dim % self.granularity:
      raise ValueError(f"granularity ({self.granularity}) must divide hidden_dim "
                       f"({self.hidden_dim})")
    validation.positive_int("num_shared_experts", self.num_shared_experts, minimum=0)
    if self.model_dim is not None:
      validation.positive_int("model_dim", self.model_dim)
    capacity.validate(self.capacity_factor, self.drop_policy)
    validation.one_of("engine", self.engine, tuple(dispatch.names()))
    dispatch.gmm_backends.create(self.backend, self.block_size, self.kernel_settings)
    validation.in_range("dropout_rate", self.dropout_rate, 0, 1, high_open=True)
    validation.one_of("aux", self.aux, AUX_OUTPUTS)
    validation.positive_int("chain", self.chain)
    validation.positive_int("pool_layers", self.pool_layers)
    if not 0 <= self.pool_position < self.pool_layers:
      raise ValueError(f"pool_position must be in [0, pool_layers = {self.pool_layers}), "
                       f"got {self.pool_position}")
    if (self.pool_layers > 1) != (self.expert_pool is not None):
      raise ValueError("expert_pool and pool_layers > 1 go together: a pool is shared by "
                       f"pool_layers > 1 layers (pool_layers={self.pool_layers}, "
                       f"expert_pool {'set' if self.expert_pool is not None else 'None'})")
    for reserved in ("num_experts", "top_k", "rng_name"):
      if reserved in self.router_kwargs:
        raise ValueError(f"router_kwargs.{reserved} is set by the layer (its {reserved} "
                         f"and granularity); set MoE.{reserved} instead")
    router = self.make_router(parent=None)
    object.__setattr__(self, "_router_spec", router)
    if self.chain > 1 and router.step_needs.counts_for_loss:
      raise ValueError(f"chain ({self.chain}) > 1 needs a router whose balance loss does not "
                       "count the whole step (balance_scope 'global' counts one pass only); "
                       "set the router's balance_scope to 'microbatch' or 'sequence'")
    self.resolved_loss_weights  # validates loss_weights  # pylint: disable=pointless-statement
    validation.in_range("tsallis_q", self.tsallis_q, 0, float("inf"), low_open=True)
    validation.in_range("erc_noise", self.erc_noise, 0, 1, high_open=True)
    validation.one_of("erc_form", self.erc_form, balance.ERC_FORMS)
    validation.in_range("erc_margin", self.erc_margin, 0, 1, low_open=True)
    if self.uses_erc and not router.has_expert_embeddings:
      raise ValueError(f"loss_weights.erc needs a router with expert vectors; router "
                       f"{self.router!r} has none")
    if router.mixes_tokens and self.capacity_factor is not None:
      raise ValueError(f"capacity_factor must be None for router {self.router!r}: its rows "
                       "mix tokens (a fixed number of slots) and nothing is dropped")
    if self.expert_parallel is not None:
      if not isinstance(self.expert_parallel, parallel.ExpertParallel):
        raise TypeError("expert_parallel must be None or a moejax.parallel.ExpertParallel, "
                        f"got {self.expert_parallel!r}")
      if router.mixes_tokens:
        raise ValueError(f"expert_parallel is not supported for router {self.router!r}: "
                         "its rows mix tokens; set expert_parallel=None")
    FFNWeights(self.expert_hidden_dim, self.routed_experts, self.expert_type,
               self.activation, parent=None)
    super().__post_init__()

  @property
  def router_spec(self) -> routers.Router:
    """This layer's router, unbound: what the model and the train step ask about
    it (the declarations of routers/base.py)."""
    return self._router_spec

  @property
  def resolved_loss_weights(self) -> dict[str, float]:
    """The weight of every loss the router or the layer returns that weighs more
    than 0 (see `loss_weights`); ValueError, naming the entry, for a bad one."""
    defaults = dict(routers.get(self.router).default_loss_weights)
    if self.loss_weights is None:
      return defaults
    known = tuple(routers.get(self.router).loss_names) + LAYER_LOSSES
    weights = {}
    for name, weight in self.loss_weights.items():
      if weight is None:
        weight = defaults.get(name, 0.0)
      validation.in_range(f"loss_weights.{name}", weight, 0, float("inf"))
      if name not in known:
        if weight:
          raise ValueError(f"loss_weights.{name} is {weight}, but neither router "
                           f"{self.router!r} nor the layer returns a loss named {name!r}; "
                           f"losses: {list(known)}")
        continue
      if weight:
        weights[name] = float(weight)
    return weights

  @property
  def step_needs(self) -> routers.StepNeeds:
    """What the training step must do for this layer's router; the step's counts
    only while the loss they serve is weighted."""
    needs = self.router_spec.step_needs
    if needs.counts_for_loss and not self.resolved_loss_weights.get(needs.counts_for_loss):
      needs = dataclasses.replace(needs, counts_for_loss=None)
    return needs

  @property
  def routed_experts(self) -> int:
    """mE."""
    return self.num_experts * self.granularity

  @property
  def routable_experts(self) -> int:
    """The experts the router scores: mE, or mE * pool_layers with a pool."""
    return self.routed_experts * self.pool_layers

  @property
  def experts_per_token(self) -> int:
    """mK."""
    return self.top_k * self.granularity

  @property
  def expert_hidden_dim(self) -> int:
    """F / m."""
    return self.hidden_dim // self.granularity

  @nn.nowrap
  def make_router(self, **module_kwargs) -> nn.Module:
    """The router with this layer's E, K and router_kwargs (unbound with parent=None)."""
    kwargs = {"num_experts": self.routable_experts, "top_k": self.experts_per_token,
              "rng_name": self.rng_name}
    kwargs.update(dict(self.router_kwargs))
    return routers.create(self.router, **kwargs, **module_kwargs)

  @nn.nowrap
  def _make_engine(self):
    if self.engine == "sorted":
      return dispatch.create("sorted", backend=self.backend, block_size=self.block_size,
                             kernel_settings=self.kernel_settings)
    return dispatch.create(self.engine)

  @nn.nowrap
  def make_experts(self, num_experts: Optional[int], hidden_dim: Optional[int] = None,
                   **module_kwargs) -> FFNWeights:
    """FFNWeights of `num_experts` experts (None: one dense FFN) of this layer's
    type, width `hidden_dim` (default F/m) and initialisers."""
    settings = dict(expert_type=self.expert_type, activation=self.activation,
                    param_dtype=self.param_dtype, kernel_init=self.kernel_init,
                    use_bias=self.use_bias, bias_init=self.bias_init)
    return FFNWeights(self.expert_hidden_dim if hidden_dim is None else hidden_dim,
                      num_experts, **{**settings, **module_kwargs})

  def setup(self):
    self.router_module = self.make_router(name="router")
    self.chain_routers = [self.make_router(name=f"router_{i}") for i in range(1, self.chain)]
    if self.expert_pool is None:
      self.experts = self.make_experts(self.routed_experts)
    if self.num_shared_experts:
      self.shared_experts = self.make_experts(
          None, self.num_shared_experts * self.expert_hidden_dim)

  @nn.nowrap
  def _expert_ffn(self, model_dim: int, dtype: Any) -> ExpertFFN:
    """The routed experts' weights in the router's order: the layer's own, or the
    pool rolled so that this layer's experts come first."""
    if self.expert_pool is None:
      return self.experts(model_dim, dtype)
    ffn = self.expert_pool(model_dim, dtype)
    offset = self.pool_position * self.routed_experts
    return ffn.replace(weights=jax.tree_util.tree_map(
        lambda w: jnp.roll(w, -offset, axis=0), ffn.weights))

  def __call__(self, x: Array, ctx: Optional[RoutingContext] = None, *,
               deterministic: Optional[bool] = None, decode: Optional[bool] = None):
    """x [B, L, D] (or [T, D], or [..., L, D]) -> (y of x's shape, MoEAux), or y
    alone with aux='sow'."""
    if x.ndim < 2:
      raise ValueError(f"x must be [B, L, D] or [T, D], got shape {x.shape}")
    shape = x.shape
    x = x.reshape((1,) + shape if x.ndim == 2 else (-1,) + shape[-2:])
    batch, length, model_dim = x.shape
    if self.model_dim is not None and model_dim != self.model_dim:
      raise ValueError(f"model_dim is {self.model_dim} but x has last dimension {model_dim}")
    check_auto_mesh()
    deterministic = self._resolve_deterministic(deterministic)
    decode = self.decode if decode is None else decode
    if decode and self.router_spec.reads_earlier_tokens:
      raise ValueError(f"decode is True, but router {self.router!r} routes each token by "
                       "the earlier tokens of its sequence, which one-token decoding does not "
                       "see; decode with a router that routes each token alone")
    dtype = x.dtype if self.dtype is None else self.dtype
    ctx = RoutingContext() if ctx is None else ctx
    num_tokens = batch * length
    real = ctx.token_mask(num_tokens)

    if self.pool_layers > 1 and "own_experts" in self.router_spec.context_fields:
      ctx = ctx.replace(own_experts=self.routed_experts)
    tokens = x.reshape(num_tokens, model_dim).astype(dtype)
    ffn = self._with_dropout(self._expert_ffn(model_dim, dtype), deterministic)
    passes, y, state = [], None, tokens
    for i, router in enumerate([self.router_module, *self.chain_routers]):
      if i:
        ctx = ctx.replace(carry=passes[-1]["routed"].carry)
      out = self._one_pass(router, x if i == 0 else state.reshape(x.shape), state, ctx, ffn,
                           real, deterministic, decode, first=i == 0)
      passes.append(out)
      y = out["y"] if y is None else y + out["y"]
      if i + 1 < self.chain:
        state = state + out["y"]
    weights = self.resolved_loss_weights
    losses, aux_metrics = passes[0]["losses"], passes[0]["metrics"]
    if len(passes) > 1:
      losses = jax.tree_util.tree_map(lambda *v: sum(v), *[p["losses"] for p in passes])
      aux_metrics = jax.tree_util.tree_map(lambda *v: sum(v) / len(v),
                                           *[p["metrics"] for p in passes])
    loss = sum((weights.get(k, 0.0) * v for k, v in losses.items()), jnp.zeros((), jnp.float32))
    first, routed = passes[0], passes[0]["routed"]
    aux = MoEAux(loss=loss, losses=losses, metrics=aux_metrics,
                 plan=routed.token_plan if self.router_spec.mixes_tokens else first["plan"],
                 routed_plan=routed.token_plan, probs=routed.probs,
                 counts=routed.counts, carry=passes[-1]["routed"].carry)
    y = y.reshape(shape)
    if self.aux == "sow":
      if not self.is_initializing():
        self.sow(sown.LOSSES, "loss", aux.loss)
        self.sow(sown.METRICS, "metrics", aux.metrics)
      return y
    return y, aux

  @nn.nowrap
  def _one_pass(self, router: nn.Module, x: Array, tokens: Array, ctx: RoutingContext,
                ffn: ExpertFFN, real: Array, deterministic: bool, decode: bool,
                first: bool) -> dict[str, Any]:
    """One routing pass over tokens [T, D] (x: their [B, L, D] view, the router's
    input): the experts' output y [T, D] (shared experts included), the router
    output, the plan after capacity, and the pass's unweighted losses and metrics."""
    num_tokens, num_experts = tokens.shape[0], self.routable_experts
    if ctx.causal:
      routers.check_causal(router)
    routed: RouterOutput = router(x, ctx, deterministic=deterministic)
    plan, cap = routed.plan, None
    drop_metrics = {"dropped": jnp.zeros((), jnp.float32),
                    "dropped_share": jnp.zeros((), jnp.float32)}
    if self.capacity_factor is not None and not decode:
      cap = capacity.capacity(plan.num_slots, 1, num_experts, self.capacity_factor)
      plan, drop_metrics = capacity.apply_capacity(plan, routed.probs, num_experts, cap,
                                                   self.drop_policy)
    rows = routed.rows(tokens)
    if self.expert_parallel is None:
      y = self._make_engine()(rows, plan, ffn, capacity=cap)
    else:
      y, ep_metrics = parallel.sharded_experts(
          rows, plan, ffn, self._make_engine(), self.expert_parallel,
          token_major=self.router_spec.plan_layout == "token_major")
      drop_metrics = {**drop_metrics, **ep_metrics}
    y = routed.to_tokens(y, num_tokens)
    if self.num_shared_experts:
      y = y + self._shared(tokens, deterministic)
    losses, aux_metrics = dict(routed.losses), {**routed.metrics, **drop_metrics}
    weights = self.resolved_loss_weights
    if "tsallis" in weights:
      losses["tsallis"] = metrics.masked_mean(
          balance.tsallis_entropy(routed.probs, self.tsallis_q), real)
    if self.uses_erc and first:
      norms = self._erc_activations(ffn, deterministic)
      losses["erc"] = balance.erc_loss(norms, self.erc_form, self.erc_margin)
      aux_metrics.update(balance.diagonal_dominance(norms))
    aux_metrics = {**metrics.plan_metrics(plan, num_experts, jnp.sum(real)),
                   "router_entropy": metrics.entropy(routed.probs, real),
                   "router_marginal_entropy": metrics.marginal_entropy(routed.probs, real),
                   **aux_metrics}
    return {"y": y, "routed": routed, "plan": plan, "losses": losses,
            "metrics": aux_metrics}

  @nn.nowrap
  def _with_dropout(self, ffn: ExpertFFN, deterministic: bool) -> ExpertFFN:
    """ffn with hidden dropout in training (dropout_rate > 0)."""
    if deterministic or self.dropout_rate == 0:
      return ffn
    return ffn.replace(dropout_rate=self.dropout_rate,
                       dropout_key=self.make_rng(self.dropout_rng_name))

  def _shared(self, tokens: Array, deterministic: bool) -> Array:
    """The shared experts' output on tokens [T, D]."""
    ffn = self._with_dropout(self.shared_experts(tokens.shape[-1], tokens.dtype),
                             deterministic)
    return ffn(tokens, dense_matmul)

  @property
  def uses_erc(self) -> bool:
    """Whether the ERC loss is computed (its weight is positive)."""
    return self.resolved_loss_weights.get("erc", 0.0) > 0

  def _erc_activations(self, ffn, deterministic: bool) -> Array:
    """M [E, E]: norm of expert i's intermediate activation on router proxy j."""
    proxies = self.router_module.expert_embeddings()                  # [E, D]
    if not deterministic and self.erc_noise > 0:
      proxies = proxies * jax.random.uniform(self.make_rng(self.rng_name), proxies.shape,
                                             jnp.float32, 1 - self.erc_noise,
                                             1 + self.erc_noise)
    hidden = ffn.hidden(proxies.astype(ffn.weights["wo"].dtype),
                        lambda p, w: jnp.einsum("jd,idf->ijf", p, w))  # [E_i, E_j, F]
    return jnp.linalg.norm(hidden.astype(jnp.float32), axis=-1)

  def update_routing(self) -> None:
    """After an optimizer step: let the routers update their `routing` state."""
    self.router_module.update_state()
    for router in self.chain_routers:
      router.update_state()

  @nn.nowrap
  def _resolve_deterministic(self, deterministic: Optional[bool]) -> bool:
    if deterministic is None and self.deterministic is None:
      if self.router_spec.uses_rng:
        raise ValueError("deterministic must be given (to the layer or the call): router "
                         f"{self.router!r} draws training noise")
      if self.uses_erc and self.erc_noise > 0:
        raise ValueError("deterministic must be given (to the layer or the call): the "
                         "ERC loss perturbs its proxies in training (erc_noise > 0)")
      return True
    return nn.merge_param("deterministic", self.deterministic, deterministic)

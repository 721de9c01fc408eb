"""Layer demo: route one batch through the MoE layer and print what routing did.

  python -m moejax.demo [--experts 8] [--top_k 2] [--tokens 4096] [--router topk]

Prints the per-expert load, MaxVio, the losses, and the agreement of every engine
with the `loop` oracle on the same batch. Routing is the inference-time rule
(deterministic=True). A bad argument stops it with one line naming the argument
(exit status 2).
"""
from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from typing import NoReturn, Optional, Sequence

import jax
import numpy as np

from moejax import MoE, RoutingContext, dispatch, routers

VOCAB = 256  # token ids of the batch, for routers that read them (hash)


class OneLineParser(argparse.ArgumentParser):
  """An ArgumentParser whose errors are one line on stderr, without the usage."""

  def error(self, message: str) -> NoReturn:
    sys.stderr.write(f"{self.prog}: error: {message}\n")
    sys.exit(2)


def make_parser() -> OneLineParser:
  """The demo's command line: layer sizes, router, capacity factor, seed."""
  parser = OneLineParser(prog="python -m moejax.demo", description=__doc__.splitlines()[0])
  parser.add_argument("--experts", type=int, default=8, help="experts E (>= 1)")
  parser.add_argument("--top_k", type=int, default=2, help="experts per token K, 1 <= K <= E")
  parser.add_argument("--tokens", type=int, default=4096, help="tokens in the batch (>= 1)")
  parser.add_argument("--model_dim", type=int, default=128, help="model dim D (>= 1)")
  parser.add_argument("--hidden_dim", type=int, default=256, help="expert hidden dim F (>= 1)")
  parser.add_argument("--router", default="topk", help=f"one of {routers.names()}")
  parser.add_argument("--capacity_factor", type=float, default=None,
                      help="finite, > 0; unset: dropless")
  parser.add_argument("--seed", type=int, default=0, help=">= 0")
  return parser


def argument_error(args: argparse.Namespace) -> Optional[str]:
  """The first bad argument, as `argument --name: why`, or None."""
  for name, minimum in (("experts", 1), ("top_k", 1), ("tokens", 1), ("model_dim", 1),
                        ("hidden_dim", 1), ("seed", 0)):
    value = getattr(args, name)
    if value < minimum:
      return f"argument --{name}: must be >= {minimum}, got {value}"
  if args.top_k > args.experts:
    return f"argument --top_k: must be <= --experts ({args.experts}), got {args.top_k}"
  if args.router not in routers.names():
    return f"argument --router: must be one of {routers.names()}, got {args.router!r}"
  if args.capacity_factor is not None and not 0 < args.capacity_factor < math.inf:
    return f"argument --capacity_factor: must be finite and > 0, got {args.capacity_factor}"
  return None


def parse_arguments(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  """The demo's arguments, checked; a bad one exits with one line naming it."""
  parser = make_parser()
  args = parser.parse_args(argv)
  problem = argument_error(args)
  if problem:
    parser.error(problem)
  return args


def _bar(share: float, width: int = 40) -> str:
  """A bar of `share` * `width` '#'s."""
  return "#" * int(round(share * width))


def demo_keys(seed: int) -> dict:
  """The random keys of the batch (centres, assign, noise, ids) and of the parameters."""
  k_centre, k_assign, k_noise, k_init = jax.random.split(jax.random.PRNGKey(seed), 4)
  return dict(centres=k_centre, assign=k_assign, noise=k_noise, init=k_init,
              ids=jax.random.fold_in(k_init, 1))


def demo_batch(args: argparse.Namespace):
  """(x [1, T, D], RoutingContext with token ids): tokens drawn around a few
  cluster centres, so that routing has structure."""
  keys = demo_keys(args.seed)
  centres = jax.random.normal(keys["centres"], (4, args.model_dim))
  cluster = jax.random.randint(keys["assign"], (args.tokens,), 0, 4)
  x = centres[cluster] + 0.5 * jax.random.normal(keys["noise"], (args.tokens, args.model_dim))
  token_ids = jax.random.randint(keys["ids"], (1, args.tokens), 0, VOCAB)
  return x[None], RoutingContext(token_ids=token_ids)


def initialized_layers(args: argparse.Namespace, x, ctx) -> dict:
  """{engine: (MoE, variables)}, the same parameters for every engine; a setting
  the layer or the router refuses exits with its one-line message."""
  key = demo_keys(args.seed)["init"]
  layers = {}
  try:
    for engine in dispatch.names():
      layer = MoE(num_experts=args.experts, top_k=args.top_k, hidden_dim=args.hidden_dim,
                  router=args.router, engine=engine, capacity_factor=args.capacity_factor)
      init = jax.jit(functools.partial(layer.init, deterministic=True))
      layers[engine] = (layer, init(key, x, ctx))
  except ValueError as e:
    make_parser().error(str(e).splitlines()[0])
  return layers


def main(argv=None) -> None:
  args = parse_arguments(argv)
  x, ctx = demo_batch(args)
  layers = initialized_layers(args, x, ctx)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}: routing {args.tokens} tokens "
        f"(D={args.model_dim}) to {args.experts} experts, top-{args.top_k}, "
        f"router={args.router}, capacity_factor={args.capacity_factor}")

  outputs = {}
  for engine, (layer, variables) in layers.items():
    apply = jax.jit(lambda v, x, ctx, layer=layer: layer.apply(v, x, ctx, deterministic=True))
    y, aux = apply(variables, x, ctx)
    jax.block_until_ready(y)
    start = time.perf_counter()
    y, aux = apply(variables, x, ctx)
    jax.block_until_ready(y)
    outputs[engine] = (np.asarray(y), aux, time.perf_counter() - start)

  _, aux, _ = outputs["sorted"]
  load = np.asarray(aux.metrics["load"])
  print("\nper-expert load (assignments)")
  for e, count in enumerate(load):
    print(f"  expert {e:3d} {int(count):7d}  {_bar(count / max(load.sum(), 1))}")
  for name in ("max_violation", "load_cv", "experts_per_token", "router_entropy",
               "dropped", "dropped_share"):
    print(f"  {name:18s} {float(aux.metrics[name]):.4f}")
  print("losses (unweighted)")
  for name, value in aux.losses.items():
    print(f"  {name:18s} {float(value):.4f}")
  print(f"  {'weighted total':18s} {float(aux.loss):.6f}")
  print("\nengines against the loop oracle (same parameters, same batch)")
  reference = outputs["loop"][0]
  for engine, (y, _, seconds) in outputs.items():
    print(f"  {engine:8s} max |y - y_loop| = {np.max(np.abs(y - reference)):.2e}   "
          f"forward {seconds * 1e3:7.1f} ms")


if __name__ == "__main__":
  main()

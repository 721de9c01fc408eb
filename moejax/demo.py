"""Layer demo: route one batch through the MoE layer and print what routing did.

  python -m moejax.demo [--experts 8] [--top_k 2] [--tokens 4096] [--router topk]

Prints the per-expert load, MaxVio, the losses, and the agreement of every engine
with the `loop` oracle on the same batch.
"""
from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from moejax import MoE, dispatch


def _bar(share: float, width: int = 40) -> str:
  return "#" * int(round(share * width))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--experts", type=int, default=8)
  parser.add_argument("--top_k", type=int, default=2)
  parser.add_argument("--tokens", type=int, default=4096)
  parser.add_argument("--model_dim", type=int, default=128)
  parser.add_argument("--hidden_dim", type=int, default=256)
  parser.add_argument("--router", default="topk")
  parser.add_argument("--capacity_factor", type=float, default=None)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  print(f"jax {jax.__version__} on {jax.devices()[0].platform}: routing {args.tokens} tokens "
        f"(D={args.model_dim}) to {args.experts} experts, top-{args.top_k}, "
        f"router={args.router}, capacity_factor={args.capacity_factor}")
  # Tokens drawn around a few cluster centres, so that routing has structure.
  k_centre, k_assign, k_noise, k_init = jax.random.split(jax.random.PRNGKey(args.seed), 4)
  centres = jax.random.normal(k_centre, (4, args.model_dim))
  cluster = jax.random.randint(k_assign, (args.tokens,), 0, 4)
  x = centres[cluster] + 0.5 * jax.random.normal(k_noise, (args.tokens, args.model_dim))
  x = x[None]

  outputs = {}
  for engine in dispatch.names():
    layer = MoE(num_experts=args.experts, top_k=args.top_k, hidden_dim=args.hidden_dim,
                router=args.router, engine=engine, capacity_factor=args.capacity_factor)
    variables = layer.init(k_init, x)
    apply = jax.jit(layer.apply)
    y, aux = apply(variables, x)
    jax.block_until_ready(y)
    start = time.perf_counter()
    y, aux = apply(variables, x)
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

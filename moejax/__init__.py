"""moejax: routing for sparse Mixture-of-Experts in JAX/Flax.

  from moejax import MoE
  y, aux = MoE(num_experts=8, top_k=2, hidden_dim=1024).apply(variables, x)
"""
from moejax import balance, capacity, dispatch, metrics, routers
from moejax.core import AXES, RouterOutput, RoutingContext, RoutingPlan
from moejax.layer import MoE, MoEAux

__all__ = ["AXES", "MoE", "MoEAux", "RouterOutput", "RoutingContext", "RoutingPlan",
           "balance", "capacity", "dispatch", "metrics", "routers"]

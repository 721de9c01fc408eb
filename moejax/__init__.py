"""moejax: routing for sparse Mixture-of-Experts in JAX/Flax.

  from moejax import MoE
  y, aux = MoE(num_experts=8, top_k=2, hidden_dim=1024).apply(variables, x)
"""
from moejax import balance, capacity, dispatch, metrics, routers
from moejax.core import AXES, RouterOutput, RoutingContext, RoutingPlan
from moejax.layer import MoE, MoEAux
from moejax.routing_state import (STATE_COLLECTIONS, carried_collections, find_moe_layers,
                                  routing_updater)
from moejax.sown import SOWN, SownAux, sown_aux

__all__ = ["AXES", "MoE", "MoEAux", "RouterOutput", "RoutingContext", "RoutingPlan",
           "SOWN", "STATE_COLLECTIONS", "SownAux", "carried_collections", "find_moe_layers",
           "routing_updater", "sown_aux",
           "balance", "capacity", "dispatch", "metrics", "routers"]

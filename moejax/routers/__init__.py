"""Routers: one module per family, all behind one contract (see routers/base.py).

  moejax.routers.create("topk", num_experts=8, top_k=2, score="sigmoid")
  moejax.routers.names()

Every router but `soft` returns a RouterOutput with a RoutingPlan; `soft`
returns a SoftRouting that the layer runs as Soft MoE.
"""
from moejax.routers.base import check_causal
from moejax.routers.expert_choice import ExpertChoiceRouter
from moejax.routers.hash_random import HashRouter, RandomRouter, consistency_loss
from moejax.routers.null_experts import NullExpertsRouter
from moejax.routers.registry import create, fields, get, names, register
from moejax.routers.relu import ReLURouter
from moejax.routers.sinkhorn import SelectiveSinkhornRouter, SinkhornRouter
from moejax.routers.soft import SoftRouter, SoftRouting
from moejax.routers.top_p import TopPRouter
from moejax.routers.topk import TopKRouter

__all__ = ["check_causal", "consistency_loss", "create", "fields", "get", "names", "register",
           "ExpertChoiceRouter", "HashRouter", "NullExpertsRouter", "RandomRouter",
           "ReLURouter", "SelectiveSinkhornRouter", "SinkhornRouter", "SoftRouter",
           "SoftRouting", "TopKRouter", "TopPRouter"]

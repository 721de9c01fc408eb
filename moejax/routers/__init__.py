"""Routers: one module per family, all behind one contract (see routers/base.py).

  moejax.routers.create("topk", num_experts=8, top_k=2, score="sigmoid")
  moejax.routers.names()

Every router subclasses `Router` (routers/base.py: the interface, every hook
with its default) and returns a RouterOutput; Soft MoE's (SlotRouting) maps the
tokens to slot rows and back.
"""
from moejax.routers.base import Router, StepNeeds, SwitchBalancedRouter, check_causal
from moejax.routers.expert_choice import ExpertChoiceRouter
from moejax.routers.graph import AttentionAwareRouter, SimilarityRouter
from moejax.routers.hash_random import HashRouter, RandomRouter, consistency_loss
from moejax.routers.null_experts import NullExpertsRouter
from moejax.routers.recurrent import RecurrentCarry, RecurrentRouter
from moejax.routers.registry import create, fields, get, names, register, unregister
from moejax.routers.relu import ReLURouter
from moejax.routers.rexmoe import ReXMoERouter
from moejax.routers.sinkhorn import SelectiveSinkhornRouter, SinkhornRouter
from moejax.routers.soft import SlotRouting, SoftRouter
from moejax.routers.top_p import TopPRouter
from moejax.routers.topk import TopKRouter

__all__ = ["Router", "StepNeeds", "SwitchBalancedRouter", "check_causal", "consistency_loss", "create", "fields",
           "get", "names", "register", "unregister", "AttentionAwareRouter",
           "ExpertChoiceRouter", "HashRouter", "NullExpertsRouter", "RandomRouter",
           "RecurrentCarry", "RecurrentRouter", "ReLURouter", "ReXMoERouter",
           "SelectiveSinkhornRouter", "SimilarityRouter", "SinkhornRouter", "SlotRouting",
           "SoftRouter", "TopKRouter", "TopPRouter"]

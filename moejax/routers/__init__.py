"""Routers: one module per family, all returning a RouterOutput.

  moejax.routers.create("topk", num_experts=8, top_k=2, score="sigmoid")
  moejax.routers.names()
"""
from moejax.routers.registry import create, fields, get, names, register
from moejax.routers.topk import TopKRouter

__all__ = ["create", "fields", "get", "names", "register", "TopKRouter"]

"""Meshes, logical-axis rules and expert-parallel execution.

Parameters and activations carry logical axis names; LOGICAL_RULES maps them to
the mesh axes ('data', 'expert', 'model'). A 1-device mesh is the default, so the
same code runs on one CPU and on a pod. The MoE layer runs its experts
expert-parallel when given `expert_parallel=ExpertParallel(...)` and a mesh in
context (jax.set_mesh); without one (init, eval_shape, one device) it runs them
unsharded. A model with its own mesh and rules adds `expert_rules(axis)` to its
rules and names its axes in ExpertParallel(batch_axes=..., expert_axis=...,
model_axis=...).
"""
from moejax.parallel.config import ExpertParallel
from moejax.parallel.expert_parallel import (Stats, all_gather_apply, all_to_all_apply,
                                             expert_parallel_apply)
from moejax.parallel.mesh import (BATCH_AXES, LOGICAL_RULES, MESH_AXES, expert_rules,
                                  make_mesh, param_shardings)
from moejax.parallel.sharded import sharded_experts

__all__ = ["BATCH_AXES", "ExpertParallel", "LOGICAL_RULES", "MESH_AXES", "Stats", "all_gather_apply",
           "all_to_all_apply", "expert_parallel_apply", "expert_rules", "make_mesh", "param_shardings",
           "sharded_experts"]

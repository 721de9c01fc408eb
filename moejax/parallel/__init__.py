"""Meshes, logical-axis rules and expert-parallel execution.

Parameters and activations carry logical axis names; LOGICAL_RULES maps them to
the mesh axes ('data', 'expert', 'model'). A 1-device mesh is the default, so the
same code runs on one CPU and on a pod.
"""
from moejax.parallel.expert_parallel import expert_parallel_apply
from moejax.parallel.mesh import LOGICAL_RULES, MESH_AXES, make_mesh, param_shardings

__all__ = ["LOGICAL_RULES", "MESH_AXES", "expert_parallel_apply", "make_mesh",
           "param_shardings"]

"""Measuring what routing does, from routing traces (see trace.py) or plans.

  trace          RoutingTrace, save / load of trace files
  consistency    local routing consistency: SCH, SRP, bootstrap intervals
  fluctuation    top-1 change and Jaccard distance between two traces
  specialization mutual information (token id, domain) and majority share
  drops          drop rate by position under a re-applied capacity
  affinity       inter-layer affinity (ExFlow), co-activation
  diversity      distinct expert combinations and paths
  balance        MaxVio, load CV, balance over checkpoints
  collect        traces of a model's routing over batches
"""
from moejax.analysis.affinity import (coactivation, conditional_entropy, layer_affinity,
                                     shuffled_information)
from moejax.analysis.consistency import (
    bootstrap_interval, sch_curve, sch_interval, sch_knee, segment_cache_hit_rate,
    segment_routing_best_performance, segment_routing_best_performance_per_expert,
    srp_interval)
from moejax.analysis.diversity import distinct_combinations, distinct_paths
from moejax.analysis.drops import drop_rate_by_position, observed_drop_rate_by_position
from moejax.analysis.fluctuation import routing_fluctuation
from moejax.analysis.balance import (
    balance_over_checkpoints, expert_load, load_cv, max_violation, max_violation_interval)
from moejax.analysis.specialization import (
    domain_expert_mutual_information, expert_specialisation, joint_counts, majority_expert_share, mutual_information,
    token_expert_mutual_information)
from moejax.analysis.trace import RoutingTrace, load, save

__all__ = [
    "RoutingTrace", "balance_over_checkpoints", "bootstrap_interval", "coactivation",
    "conditional_entropy", "distinct_combinations", "distinct_paths",
    "domain_expert_mutual_information", "drop_rate_by_position", "expert_load",
    "expert_specialisation",
    "joint_counts", "layer_affinity", "load", "load_cv", "majority_expert_share",
    "max_violation", "max_violation_interval", "mutual_information",
    "observed_drop_rate_by_position", "routing_fluctuation", "save", "sch_curve",
    "sch_interval", "sch_knee", "segment_cache_hit_rate", "segment_routing_best_performance",
    "segment_routing_best_performance_per_expert", "shuffled_information", "srp_interval",
    "token_expert_mutual_information",
]

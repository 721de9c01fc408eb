"""Routing after training: change a trained model's routing without retraining it.

  bias       the logit-bias hook: per-layer deltas on router logits (collection
             `logit_bias`), built from {"layer_<i>": delta}
  frozen     a trained model held fixed, its checkpoint and evaluation rows
  reroute    continuous test-time rerouting ("Rewiring Experts on the Fly", 2025)
  steer      steering toward task experts ("Multilingual Routing in MoE", 2025)
  oracle     the per-sequence oracle routing gap (RoMA's premise, 2025)

From the command line on a run's workdir: python -m moejax.intervene.
"""
from moejax.interventions import bias, frozen, oracle, reroute, steer
from moejax.interventions.frozen import Frozen

__all__ = ["Frozen", "bias", "frozen", "oracle", "reroute", "steer"]

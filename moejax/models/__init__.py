"""Model backbones that host MoE layers, and sampling from them (sampling.generate)."""
from moejax.models.attention import CausalSelfAttention
from moejax.models.sampling import generate
from moejax.models.transformer import Block, DenseFFN, TransformerLM

__all__ = ["Block", "CausalSelfAttention", "DenseFFN", "TransformerLM", "generate"]

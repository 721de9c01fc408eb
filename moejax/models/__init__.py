"""Model backbones that host MoE layers."""
from moejax.models.attention import CausalSelfAttention
from moejax.models.transformer import Block, DenseFFN, TransformerLM

__all__ = ["Block", "CausalSelfAttention", "DenseFFN", "TransformerLM"]

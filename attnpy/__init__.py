"""attnpy: attention for learning, checking and running.

A C core computes attention directly on NumPy buffers, without copies, and
hands back every intermediate map.
"""
from ._mha import MultiheadAttention, MultiheadAttentionResult, Trace, self_attention
from ._sdpa import AttentionResult, causal_mask, scaled_dot_product_attention

__all__ = ["AttentionResult", "MultiheadAttention", "MultiheadAttentionResult", "Trace",
           "causal_mask", "scaled_dot_product_attention", "self_attention"]
__version__ = "0.1.0"

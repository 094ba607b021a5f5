"""attnpy: attention for learning, checking and running.

A C core computes attention directly on NumPy buffers, without copies, and
hands back every intermediate map.
"""
from ._config import (get_kernel, get_num_threads, set_kernel, set_num_threads,
                      supported_kernels, use_kernel)
from ._mha import (MultiheadAttention, MultiheadAttentionGradients, MultiheadAttentionResult,
                   Trace, self_attention)
from ._sdpa import (AttentionGradients, AttentionResult, BackwardTrace, causal_mask,
                    scaled_dot_product_attention, scaled_dot_product_attention_backward)

__all__ = ["AttentionGradients", "AttentionResult", "BackwardTrace", "MultiheadAttention",
           "MultiheadAttentionGradients", "MultiheadAttentionResult", "Trace",
           "causal_mask", "get_kernel", "get_num_threads", "scaled_dot_product_attention",
           "scaled_dot_product_attention_backward",
           "self_attention", "set_kernel", "set_num_threads", "supported_kernels", "use_kernel"]
__version__ = "0.1.0"

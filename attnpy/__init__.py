"""attnpy: attention for learning, checking and running.

A C core computes attention directly on NumPy buffers, without copies, and
hands back every intermediate map.
"""
try:
    from . import _core
except ImportError as e:
    # the source tree without a build (NumPy says the same of its own); a
    # build that fails to load (another Python, a missing library) says why
    missing = "cannot import name '_core'" in str(e) or isinstance(e, ModuleNotFoundError)
    raise ImportError(
        "attnpy's C extension (attnpy._core) is not built, or not for this Python: run "
        "`pip install .` in the source tree, or `bash dev.sh demo` to set up and run the "
        "demo" + ("" if missing else f" (the import said: {e})")) from e

from ._config import (get_kernel, get_num_threads, set_kernel, set_num_threads, set_tuning,
                      supported_kernels, tuning, tuning_spec, use_kernel)
from ._mha import (MultiheadAttention, MultiheadAttentionGradients, MultiheadAttentionResult,
                   Trace, self_attention)
from ._positions import KVCache, RoPE, relative_position_bucket, rope, sinusoidal_positions
from ._sdpa import (AttentionGradients, AttentionResult, BackwardTrace, alibi_slopes, causal_mask,
                    scaled_dot_product_attention, scaled_dot_product_attention_backward)

__all__ = ["AttentionGradients", "AttentionResult", "BackwardTrace", "KVCache",
           "MultiheadAttention", "MultiheadAttentionGradients", "MultiheadAttentionResult",
           "RoPE", "Trace", "alibi_slopes", "causal_mask", "get_kernel", "get_num_threads",
           "relative_position_bucket", "rope", "scaled_dot_product_attention",
           "scaled_dot_product_attention_backward", "self_attention", "set_kernel",
           "set_num_threads", "set_tuning", "sinusoidal_positions", "supported_kernels", "tuning",
           "tuning_spec", "use_kernel"]
__version__ = "0.1.0"

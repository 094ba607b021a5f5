"""No leaks: every public function, and its error paths, called thousands of
times leaves memory (NumPy's and Python's allocations, and the process's RSS)
and the inputs' reference counts where they were."""
import gc
import resource
import sys
import tracemalloc

import numpy as np
import pytest

import attnpy

REPS = 2000


def calls():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 3, 5, 4)) for _ in range(3))
    dout = rng.standard_normal((2, 3, 5, 4))
    mask = rng.random((5, 5)) < 0.7
    mha = attnpy.MultiheadAttention(8, 2, add_bias_kv=True, dtype=np.float64, seed=0)
    x = rng.standard_normal((2, 5, 8))
    res = mha(x, trace=True)
    w = rng.standard_normal((8, 4))
    good = {
        "sdpa": lambda: attnpy.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        "sdpa_streaming": lambda: attnpy.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                      need_weights=False),
        "sdpa_backward": lambda: attnpy.scaled_dot_product_attention_backward(dout, q, k, v,
                                                                              trace=True),
        "mha": lambda: mha(x, trace=True),
        "mha_backward": lambda: mha.backward(res, x),
        "self_attention": lambda: attnpy.self_attention(x, w, w, w, trace=True),
        "causal_mask": lambda: attnpy.causal_mask(5, 7, align="bottom_right"),
    }
    bad = {
        "sdpa_dtype": lambda: attnpy.scaled_dot_product_attention(q, k.astype(np.float32), v),
        "sdpa_shape": lambda: attnpy.scaled_dot_product_attention(q, k[..., :3], v),
        "sdpa_mask": lambda: attnpy.scaled_dot_product_attention(q, k, v, attn_mask=mask[:3]),
        "sdpa_out": lambda: attnpy.scaled_dot_product_attention(q, k, v, out=q),
        "backward_grad": lambda: attnpy.scaled_dot_product_attention_backward(dout[..., :3], q,
                                                                              k, v),
        "mha_mask": lambda: mha(x, key_padding_mask=np.zeros((2, 4), bool)),
        "mha_backward_shape": lambda: mha.backward(res, x[:, :3]),
    }
    return (q, k, v, dout, mask, x), good, bad


def run(fn, expect_error):
    if not expect_error:
        fn()
        return
    try:
        fn()
    except (TypeError, ValueError):
        return
    raise AssertionError("no error")


@pytest.mark.parametrize("kind", ["good", "bad"])
def test_repeated_calls_do_not_leak(kind):
    inputs, good, bad = calls()
    table = good if kind == "good" else bad
    for name, fn in table.items():
        for _ in range(50):                        # warm up caches and the thread pool
            run(fn, kind == "bad")
        gc.collect()
        refs = [sys.getrefcount(a) for a in inputs]
        tracemalloc.start()
        base, _ = tracemalloc.get_traced_memory()
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for _ in range(REPS):
            run(fn, kind == "bad")
        gc.collect()
        grown, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert [sys.getrefcount(a) for a in inputs] == refs, f"{name}: reference counts moved"
        # a leak of even one small array per call would be > 100 KiB after 2000 calls
        assert grown - base < 64 * 1024, f"{name}: {grown - base} bytes still held"
        assert rss1 - rss0 < 8 * 1024, f"{name}: peak RSS grew {rss1 - rss0} KiB"

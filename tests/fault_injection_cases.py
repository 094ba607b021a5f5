"""Allocation failures, one at a time, in every public function.

Needs a build of attnpy._core with the fault-injection hook (setup.py with
ATTNPY_FAULT_INJECTION=1 or ATTNPY_SANITIZE=1): ``_core._fail_alloc(n)``
makes the n-th allocation from now fail -- the core's workspaces (attn_malloc)
and the binding's result arrays and conversions alike -- and returns (the
allocations counted since the last call, the core's blocks still live).

For each call below, n = 1, 2, 3, ... until the call makes fewer than n
allocations. At every failure point the call must either raise MemoryError
(and return nothing) or, where the core has a fallback (tiled workspace ->
reference kernel, shared projections -> separate ones), return the right
answer; never a crash or a wrong result. After each failure: no core block
is left allocated, the inputs are unchanged byte for byte and hold no extra
references, and the library still gives the right answer.

Not a test module itself (pytest does not collect it): test_fault_injection
runs ``run_all`` in this process when the hook is there (the sanitizer pass),
or in a subprocess against a fault-injection build of its own.
"""
import sys

import numpy as np

import attnpy
from attnpy import _core


def _arrays(result):
    """Every array in what a public function returns, in a fixed order."""
    if isinstance(result, np.ndarray):
        return [result]
    if result is None:
        return []
    if isinstance(result, dict):
        return [a for k in sorted(result) for a in _arrays(result[k])]
    if isinstance(result, attnpy.MultiheadAttentionResult):
        return _arrays(result.output) + _arrays(result.weights) + _arrays(result.trace)
    if isinstance(result, attnpy.MultiheadAttentionGradients):
        return _arrays([result.query, result.key, result.value]) + _arrays(result.params)
    if isinstance(result, attnpy.Trace):
        return [a for a in vars(result).values() if a is not None]
    if isinstance(result, (tuple, list)):
        return [a for item in result for a in _arrays(item)]
    raise TypeError(f"unexpected result type {type(result).__name__}")


def _same(expected, got):
    a, b = _arrays(expected), _arrays(got)
    return len(a) == len(b) and all(
        x.shape == y.shape and x.dtype == y.dtype and np.allclose(x, y, rtol=1e-9, atol=1e-12)
        for x, y in zip(a, b))


def _cases():
    """(name, inputs whose bytes must not change, a call with no arguments)."""
    rng = np.random.default_rng(7)
    f64 = lambda *shape: rng.standard_normal(shape)
    q, k, v = f64(2, 3, 130, 16), f64(2, 3, 140, 16), f64(2, 3, 140, 8)
    kb, vb = f64(1, 3, 140, 16), f64(1, 3, 140, 8)        # broadcast over the batch
    mask = rng.random((130, 140)) > 0.3
    dout = f64(2, 3, 130, 8)
    sdpa, bwd = attnpy.scaled_dot_product_attention, attnpy.scaled_dot_product_attention_backward
    weights = sdpa(q, kb, vb, attn_mask=mask).weights
    out = np.empty((2, 3, 130, 8))

    def reference(fn):
        def call():
            with attnpy.use_kernel("reference"):
                return fn()
        return call

    x, kv = f64(2, 9, 32), f64(2, 11, 24)
    mha_gqa = attnpy.MultiheadAttention(32, 4, num_kv_heads=2, kdim=24, vdim=24,
                                        add_bias_kv=True, dtype=np.float64, seed=1)
    mha = attnpy.MultiheadAttention(32, 4, add_zero_attn=True, dtype=np.float64, seed=2)
    g_out = f64(2, 9, 32)

    def mha_backward(layer, key):
        res = layer(x, key, key, trace=True)
        return layer.backward(res, g_out)

    def mha_dropout():
        layer = attnpy.MultiheadAttention(32, 4, dropout=0.25, dtype=np.float64, seed=3).train()
        return layer(x, trace=True)

    w_q, w_k, w_v = f64(32, 8), f64(32, 8), f64(32, 5)
    return [
        ("sdpa weights", [q, k, v, mask], lambda: sdpa(q, k, v, attn_mask=mask)),
        ("sdpa streaming", [q, k, v], lambda: sdpa(q, k, v, is_causal=True, need_weights=False)),
        ("sdpa reference kernel", [q, k, v, mask],
         reference(lambda: sdpa(q, k, v, attn_mask=mask, need_weights=False))),
        ("sdpa out=", [q, k, v], lambda: sdpa(q, k, v, out=out)),
        ("sdpa lists", [], lambda: sdpa([[1, 0], [0, 1], [1, 1]], [[1, 2], [3, 4]],
                                         [[1.0, 2.0], [3.0, 4.0]],
                                         attn_mask=[[0.0, -1.0], [0.5, 0.0], [0.0, 0.0]])),
        ("sdpa backward", [dout, q, k, v, mask], lambda: bwd(dout, q, k, v, attn_mask=mask)),
        ("sdpa backward broadcast+weights+trace", [dout, q, kb, vb, mask, weights],
         lambda: bwd(dout, q, kb, vb, attn_mask=mask, weights=weights, trace=True)),
        ("sdpa backward reference kernel", [dout, q, kb, vb],
         reference(lambda: bwd(dout, q, kb, vb, is_causal=True))),
        ("MultiheadAttention forward", [x, kv], lambda: mha_gqa(x, kv, kv)),
        ("MultiheadAttention forward self, no weights", [x],
         lambda: mha(x, need_weights=False)),
        ("MultiheadAttention trace+dropout", [x], mha_dropout),
        ("MultiheadAttention backward GQA+bias_kv", [x, kv, g_out],
         lambda: mha_backward(mha_gqa, kv)),
        ("MultiheadAttention backward", [x, g_out], lambda: mha_backward(mha, x)),
        ("self_attention", [x, w_q, w_k, w_v],
         lambda: attnpy.self_attention(x, w_q, w_k, w_v, is_causal=True, trace=True)),
    ]


def sweep(name, inputs, call, limit=500):
    """Fail allocation 1, 2, ... of call(); returns the counts."""
    _core._fail_alloc(0)
    expected = call()
    before = [a.tobytes() for a in inputs]
    refs = [sys.getrefcount(a) for a in inputs]
    counts = {"failure_points": 0, "memory_errors": 0, "recovered": 0}
    for n in range(1, limit):
        _core._fail_alloc(n)
        try:
            result, error = call(), None
        except MemoryError as e:
            result, error = None, e
        finally:
            counted, live = _core._fail_alloc(0)
        assert live == 0, f"{name}, allocation {n} failed: {live} core blocks leaked"
        if counted < n:  # the call made fewer allocations: nothing was failed
            assert error is None and _same(expected, result), f"{name}: wrong result"
            break
        counts["failure_points"] += 1
        if error is not None:
            counts["memory_errors"] += 1
        else:
            assert _same(expected, result), \
                f"{name}: allocation {n} failed and the call returned a wrong result"
            counts["recovered"] += 1
        del result, error
        assert [a.tobytes() for a in inputs] == before, f"{name}, allocation {n}: input written"
        assert [sys.getrefcount(a) for a in inputs] == refs, f"{name}, allocation {n}: refcounts"
        assert _same(expected, call()), f"{name}: wrong result after allocation {n} failed"
    else:
        raise AssertionError(f"{name}: more than {limit} allocations")
    assert counts["memory_errors"] >= 1, f"{name}: no injected failure became a MemoryError"
    return counts


def run_all():
    if not hasattr(_core, "_fail_alloc"):
        raise RuntimeError(f"{_core.__file__} was built without the fault-injection hook")
    report = {name: sweep(name, inputs, call) for name, inputs, call in _cases()}
    # the library works afterwards, and a failure in one call leaks nothing into the next
    q = np.ones((3, 4))
    out, w = attnpy.scaled_dot_product_attention(q, q, q)
    assert np.array_equal(out, q) and np.allclose(w, 1 / 3)
    assert _core._fail_alloc(0)[1] == 0
    return report


if __name__ == "__main__":
    import json
    print(json.dumps(run_all()))

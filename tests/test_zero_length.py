"""Zero-length dimensions: what torch 2.13 does, checked against torch itself.

torch accepts every zero-length dimension of SDPA and of MultiheadAttention
and returns empty outputs, except that with S = 0 each query row has no keys
(its output row is 0) and with E = 0 each score is an empty dot product, 0,
*whatever the scale*: the rows' weights are uniform over the keys the masks
allow. (torch multiplies q and k by sqrt(scale) before q k^T, so the default
scale 1/sqrt(0) = inf never meets a 0; attnpy used to compute inf * 0 = NaN.)
attnpy does the same, forward and backward; these tests ask torch each time.

Then the fuzzer's findings about zero widths and empty problems (E = 0 gave
NaN; billions of empty problems took a minute), which need no torch.
"""
import itertools

import numpy as np
import pytest

import attnpy
from optional_torch import torch

F = torch.nn.functional.scaled_dot_product_attention if torch else None
sdpa, sdpa_bwd = attnpy.scaled_dot_product_attention, attnpy.scaled_dot_product_attention_backward

# (B, H, L, S, E, Ev) with one or two zeros
SHAPES = [(0, 2, 3, 4, 5, 6), (2, 0, 3, 4, 5, 6), (2, 2, 0, 4, 5, 6), (2, 2, 3, 0, 5, 6),
          (2, 2, 3, 4, 0, 6), (2, 2, 3, 4, 5, 0), (2, 2, 3, 0, 0, 6), (2, 2, 0, 0, 0, 0),
          (1, 1, 5, 4, 0, 3)]


def _torch_sdpa(q, k, v, dout, **kw):
    t = [torch.tensor(x, requires_grad=True) for x in (q, k, v)]
    out = F(*t, **kw)
    out.backward(torch.tensor(dout))
    return out.detach().numpy(), [x.grad.numpy() for x in t]


OPTIONS = {"default": {}, "causal": {"is_causal": True}, "mask": {"mask": True},
           # special scales matter only when E = 0 (E > 0: see test_properties)
           "scale_inf": {"scale": float("inf")}, "scale_nan": {"scale": float("nan")},
           "scale_neg": {"scale": -2.0}}
CASES = [(shape, name) for shape in SHAPES for name in OPTIONS
         if shape[4] == 0 or not name.startswith("scale")]


@pytest.mark.torch
@pytest.mark.parametrize("shape,option", CASES,
                         ids=["x".join(map(str, s)) + "-" + o for s, o in CASES])
@pytest.mark.parametrize("kernel", ["auto", "reference"])
def test_sdpa_zero_length_like_torch(shape, option, kernel):
    B, H, L, S, E, Ev = shape
    kw = OPTIONS[option]
    rng = np.random.default_rng(sum(shape))
    q, k, v = (rng.standard_normal(s) for s in ((B, H, L, E), (B, H, S, E), (B, H, S, Ev)))
    dout = rng.standard_normal((B, H, L, Ev))
    kw = dict(kw)
    if kw.pop("mask", False):
        kw["attn_mask"] = rng.random((L, S)) < 0.6
    tkw = {key: torch.tensor(x) if key == "attn_mask" else x for key, x in kw.items()}
    want_out, want_grads = _torch_sdpa(q, k, v, dout, **tkw)
    with attnpy.use_kernel(kernel):
        for need_weights in (True, False):
            out = sdpa(q, k, v, need_weights=need_weights, **kw).output
            np.testing.assert_allclose(out, want_out, rtol=1e-12, atol=1e-12)
        grads = sdpa_bwd(dout, q, k, v, **kw)
    for got, want in zip(grads[:3], want_grads):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_e0_weights_are_uniform_over_allowed_keys():
    """E = 0: no NaN, whatever the scale; the weights spread evenly (this was NaN)."""
    q, k, v = np.ones((3, 0)), np.ones((4, 0)), np.arange(8.0).reshape(4, 2)
    for scale in (None, float("inf"), float("nan"), 0.0, -1.0):
        out, w = sdpa(q, k, v, is_causal=True, scale=scale)
        allowed = np.tril(np.ones((3, 4)))
        np.testing.assert_array_equal(w, allowed / allowed.sum(1, keepdims=True))
        np.testing.assert_allclose(out, w @ v)
    x = np.ones((3, 4))
    res = attnpy.self_attention(x, np.ones((4, 0)), np.ones((4, 0)), np.arange(8.0).reshape(4, 2))
    np.testing.assert_allclose(res.weights, np.full((3, 3), 1 / 3))


@pytest.mark.torch
@pytest.mark.parametrize("N,L,S", [(0, 3, 4), (2, 0, 4), (2, 3, 0), (2, 0, 0)])
@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_zero_length_like_torch(N, L, S, batch_first):
    torch.manual_seed(0)
    layer = torch.nn.MultiheadAttention(8, 2, batch_first=batch_first, dtype=torch.float64)
    ours = attnpy.MultiheadAttention.from_torch(layer)
    rng = np.random.default_rng(N * 100 + L * 10 + S)
    shape = (lambda n, t: (n, t, 8)) if batch_first else (lambda n, t: (t, n, 8))
    q, kv = rng.standard_normal(shape(N, L)), rng.standard_normal(shape(N, S))
    tq, tkv = torch.tensor(q, requires_grad=True), torch.tensor(kv, requires_grad=True)
    want, want_w = layer(tq, tkv, tkv, average_attn_weights=False)
    dout = rng.standard_normal(want.shape)
    want.backward(torch.tensor(dout))
    res = ours(q, kv, kv, trace=True)
    np.testing.assert_allclose(res.output, want.detach().numpy(), rtol=1e-12, atol=1e-12)
    assert res.weights.shape == tuple(want_w.shape)
    grads = ours.backward(res, dout)
    np.testing.assert_allclose(grads.query, tq.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(grads.key + grads.value, tkv.grad.numpy(), rtol=1e-10, atol=1e-12)
    for name, p in layer.named_parameters():
        np.testing.assert_allclose(grads.params[name], p.grad.numpy() if p.grad is not None
                                   else np.zeros(p.shape), rtol=1e-10, atol=1e-12)


def test_self_attention_zero_length():
    for L, d in itertools.product((0, 3), (0, 4)):
        x = np.ones((L, d))
        w = np.ones((d, 2))
        res = attnpy.self_attention(x, w, w, w)
        assert res.output.shape == (L, 2) and res.weights.shape == (L, L)
        assert not np.isnan(res.output).any()


# --------------------------------------------------------------------------
# E = 0 (or head_dim 0): an empty q . k is 0, whatever the scale


# Regression: E = 0 gave NaN (0 * 1/sqrt(0)); torch gives uniform weights (fuzzer)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("scale", [None, 2.0, float("inf"), float("nan")])
def test_sdpa_zero_width_query_gives_uniform_weights(dtype, need_weights, scale):
    q, k = np.zeros((2, 0), dtype), np.zeros((3, 0), dtype)
    v = np.arange(6, dtype=dtype).reshape(3, 2)
    out, w = attnpy.scaled_dot_product_attention(q, k, v, scale=scale,
                                                 need_weights=need_weights)
    np.testing.assert_allclose(out, np.broadcast_to(v.mean(axis=0), (2, 2)), rtol=1e-6)
    if need_weights:
        np.testing.assert_allclose(w, np.full((2, 3), 1 / 3), rtol=1e-6)


# Regression: E = 0 gave NaN, in every kernel and with is_causal (fuzzer)
@pytest.mark.parametrize("kernel", attnpy.supported_kernels())
def test_sdpa_zero_width_every_kernel_and_causal(kernel):
    q, k = np.zeros((1, 3, 0)), np.zeros((1, 3, 0))
    v = np.arange(9.0).reshape(1, 3, 3)
    with attnpy.use_kernel(kernel):
        for nw in (True, False):
            out, _ = attnpy.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                         need_weights=nw)
            want = np.stack([v[0, :i + 1].mean(axis=0) for i in range(3)])[None]
            np.testing.assert_allclose(out, want, rtol=1e-12)


# Regression: E = 0 gave NaN gradients (fuzzer)
def test_sdpa_backward_zero_width_query():
    q, k = np.zeros((2, 0)), np.zeros((3, 0))
    v = np.arange(6.0).reshape(3, 2)
    dout = np.ones((2, 2))
    gq, gk, gv, _ = attnpy.scaled_dot_product_attention_backward(dout, q, k, v)
    assert gq.shape == (2, 0) and gk.shape == (3, 0)
    # P uniform (1/3): dV = P^T dO = 2/3 everywhere
    np.testing.assert_allclose(gv, np.full((3, 2), 2 / 3), rtol=1e-12)


# Regression: a zero-width w_q / w_k gave NaN in self_attention (fuzzer)
def test_self_attention_zero_width_projection():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4))
    w_qk = np.zeros((4, 0))
    w_v = rng.standard_normal((4, 2))
    res = attnpy.self_attention(x, w_qk, w_qk, w_v)
    np.testing.assert_allclose(res.weights, np.full((3, 3), 1 / 3), rtol=1e-12)
    np.testing.assert_allclose(res.output, np.broadcast_to((x @ w_v).mean(axis=0), (3, 2)),
                               rtol=1e-12)


# --------------------------------------------------------------------------
# billions of empty problems return at once (the bound leaves a 100x margin)


BIG = 2**31 - 1

FAST = 1.0  # seconds


def _zeros(shape, dtype=np.float32):
    return np.lib.stride_tricks.as_strided(np.zeros(1, dtype), shape, (0,) * len(shape))


def _timed(fn, *args, **kwargs):
    import time
    t = time.perf_counter()
    res = fn(*args, **kwargs)
    return res, time.perf_counter() - t


# Regression: 2**31 - 1 empty problems took 24 s in the forward with weights (fuzzer)
def test_forward_with_weights_over_empty_problems_is_immediate():
    q, k, v = _zeros((BIG, 2, 4)), np.empty((BIG, 0, 4), np.float32), np.empty((BIG, 0, 0),
                                                                                np.float32)
    (out, w), dt = _timed(attnpy.scaled_dot_product_attention, q, k, v)
    assert out.shape == (BIG, 2, 0) and w.shape == (BIG, 2, 0)
    assert dt < FAST, dt


# Regression: 2**31 - 1 empty problems took 65 s in the backward (fuzzer)
def test_backward_over_empty_problems_is_immediate():
    q = np.empty((BIG, 0, 4), np.float32)
    (gq, gk, gv, _), dt = _timed(attnpy.scaled_dot_product_attention_backward, q, q, q, q)
    assert gq.shape == gk.shape == gv.shape == q.shape
    assert dt < FAST, dt


# Regression: the early return for empty problems must still zero the key/value gradients (fuzzer)
def test_backward_empty_queries_still_zero_key_gradients():
    # L = 0 but S > 0: the key and value gradients exist and must be exactly zero
    q = np.empty((3, 0, 4))
    k = np.ones((3, 5, 4))
    gq, gk, gv, _ = attnpy.scaled_dot_product_attention_backward(np.empty((3, 0, 4)), q, k, k)
    assert not gk.any() and not gv.any() and gk.shape == (3, 5, 4)


# Regression: self_attention over 2**31 - 1 empty sequences took 1.5 s (fuzzer)
def test_self_attention_over_empty_rows_is_immediate():
    x = np.empty((BIG, 0, 0), np.float32)
    w = np.empty((0, 0), np.float32)
    res, dt = _timed(attnpy.self_attention, x, w, w, w)
    assert res.output.shape == (BIG, 0, 0)
    assert dt < FAST, dt


# Regression: the multi-head backward over 2**31 - 1 empty sequences took 34 s (fuzzer)
@pytest.mark.parametrize("num_kv_heads", [3, 1])
def test_mha_backward_over_empty_sequences_is_immediate(num_kv_heads):
    layer = attnpy.MultiheadAttention(12, 3, batch_first=False, dtype=np.float64,
                                      num_kv_heads=num_kv_heads, seed=0)
    q = np.empty((0, BIG, 12))
    res = layer(q, trace=True)
    grads, dt = _timed(layer.backward, res, np.empty((0, BIG, 12)))
    assert dt < FAST, dt
    assert grads.query.shape == q.shape
    for name, g in grads.params.items():
        assert not g.any(), name

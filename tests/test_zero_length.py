"""Zero-length dimensions: what torch 2.13 does, checked against torch itself.

torch accepts every zero-length dimension of SDPA and of MultiheadAttention
and returns empty outputs, except that with S = 0 each query row has no keys
(its output row is 0) and with E = 0 each score is an empty dot product, 0,
*whatever the scale*: the rows' weights are uniform over the keys the masks
allow. (torch multiplies q and k by sqrt(scale) before q k^T, so the default
scale 1/sqrt(0) = inf never meets a 0; attnpy used to compute inf * 0 = NaN.)
attnpy does the same, forward and backward; these tests ask torch each time.
"""
import itertools

import numpy as np
import pytest
import torch

import attnpy

F = torch.nn.functional.scaled_dot_product_attention
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

"""Positions, windows, biases and dropout in scaled_dot_product_attention:
query_offset, window, alibi_slopes, attn_bias, dropout_p with seed, on every
kernel, both paths and both dtypes, against the float64 reference of
tests/reference.py (position_mask) and torch autograd."""
import numpy as np
import pytest

import attnpy
from attnpy import _core

from optional_torch import torch, F
from reference import position_mask, sdpa_backward_reference, sdpa_forward

TOL = {np.float32: 2e-5, np.float64: 1e-12}
KERNELS = _core.supported_kernels()


@pytest.fixture(params=[k for k in KERNELS if k != "auto"])
def kernel(request):
    _core.set_kernel(request.param)
    yield request.param
    _core.set_kernel("auto")


def _qkv(shape_q, S, Ev, dtype, seed=0, Hkv=None):
    rng = np.random.default_rng(seed)
    *lead, L, E = shape_q
    kv_lead = list(lead)
    if Hkv is not None:
        kv_lead[-1] = Hkv
    q = rng.standard_normal(shape_q).astype(dtype)
    k = rng.standard_normal((*kv_lead, S, E)).astype(dtype)
    v = rng.standard_normal((*kv_lead, S, Ev)).astype(dtype)
    return q, k, v


def _expected(q, k, v, bias=None, enable_gqa=False, scale=None, **positions):
    L, S = q.shape[-2], k.shape[-2]
    m = position_mask(L, S, **positions)
    if bias is not None:
        m = m + np.asarray(bias, dtype=np.float64)
    f = sdpa_forward(q, k, v, attn_mask=m, enable_gqa=enable_gqa, scale=scale)
    return f["out"], f["weights"]


CASES = [
    # (L, S, options)
    (5, 300, dict(is_causal=True, query_offset=295)),               # decoding, bottom-right
    (150, 400, dict(is_causal=True, query_offset=250)),
    (130, 130, dict(is_causal=True, window=(15, 0))),               # Mistral's sliding window
    (200, 260, dict(window=(70, 5), query_offset=30)),
    (9, 20, dict(window=(10, 2), query_offset=40)),                 # rows past every key
    (70, 90, dict(alibi_slopes=True)),
    (140, 300, dict(alibi_slopes=True, is_causal=True, query_offset=160)),
    (65, 129, dict(alibi_slopes=True, window=(20, 20), bias=True)),
    (33, 47, dict(bias=True, is_causal=True)),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("L,S,options", CASES)
def test_positions_match_reference(kernel, dtype, need_weights, L, S, options):
    options = dict(options)
    H = 3
    q, k, v = _qkv((2, H, L, 16), S, 8, dtype, seed=L + S)
    kw = {}
    if options.pop("alibi_slopes", False):
        kw["alibi_slopes"] = attnpy.alibi_slopes(H) if hasattr(attnpy, "alibi_slopes") \
            else 2.0 ** -np.arange(1, H + 1)
    if options.pop("bias", False):
        kw["attn_bias"] = (0.5 * np.random.default_rng(1).standard_normal((H, L, S))).astype(dtype)
    kw.update(options)
    out, w = attnpy.scaled_dot_product_attention(q, k, v, need_weights=need_weights, **kw)
    ref_out, ref_w = _expected(q, k, v, bias=kw.get("attn_bias"),
                               **{n: kw[n] for n in ("is_causal", "query_offset", "window",
                                                     "alibi_slopes") if n in kw})
    np.testing.assert_allclose(out, ref_out, atol=TOL[dtype], rtol=TOL[dtype])
    if need_weights:
        np.testing.assert_allclose(w, ref_w, atol=TOL[dtype], rtol=0)


# attn_bias over tiles with every pair open (128 keys x 128 queries in the
# fast kernels), in each layout the kernels read differently: contiguous,
# strided along the keys, keys down the rows (a transposed view), broadcast.
def _bias_layout(layout, H, L, S, dtype):
    rng = np.random.default_rng(5)
    if layout == "contiguous":
        return rng.standard_normal((H, L, S)).astype(dtype)
    if layout == "every other key":
        return rng.standard_normal((H, L, 2 * S)).astype(dtype)[..., ::2]
    if layout == "transposed":
        return np.swapaxes(rng.standard_normal((H, S, L)).astype(dtype), -1, -2)
    if layout == "(L, S)":
        return rng.standard_normal((L, S)).astype(dtype)
    return rng.standard_normal((L, 1)).astype(dtype) + rng.standard_normal(S).astype(dtype)[
        None, ::-1]                                            # a reversed view of (S,)


BIAS_LAYOUTS = ["contiguous", "every other key", "transposed", "(L, S)", "(L, 1) + (S,)"]
BIAS_OPTIONS = [dict(), dict(is_causal=True, query_offset=100),
                dict(window=(150, 30), query_offset=60), dict(float_mask=True)]


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("options", BIAS_OPTIONS, ids=["none", "causal", "window", "mask"])
@pytest.mark.parametrize("layout", BIAS_LAYOUTS)
def test_bias_on_whole_tiles_matches_reference(kernel, layout, options, need_weights):
    options = dict(options)
    H, L, S = 2, 300, 400
    dtype = np.float32 if layout != "contiguous" else np.float64
    q, k, v = _qkv((1, H, L, 16), S, 8, dtype, seed=3)
    bias = _bias_layout(layout, H, L, S, dtype)
    extra = None
    if options.pop("float_mask", False):
        extra = np.random.default_rng(6).standard_normal((L, S)).astype(dtype)
        options["attn_mask"] = extra
    out, w = attnpy.scaled_dot_product_attention(q, k, v, attn_bias=bias,
                                                 need_weights=need_weights, **options)
    total = bias.astype(np.float64) + (0.0 if extra is None else extra)
    ref_out, ref_w = _expected(q, k, v, bias=total,
                               **{n: options[n] for n in ("is_causal", "query_offset", "window")
                                  if n in options})
    np.testing.assert_allclose(out, ref_out, atol=TOL[dtype], rtol=TOL[dtype])
    if need_weights:
        np.testing.assert_allclose(w, ref_w, atol=TOL[dtype], rtol=0)


@pytest.mark.parametrize("options", BIAS_OPTIONS[:3], ids=["none", "causal", "window"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_bias_on_whole_tiles_backward_matches_reference(kernel, layout, options):
    H, L, S = 2, 300, 400
    q, k, v = _qkv((1, H, L, 16), S, 8, np.float64, seed=4)
    bias = _bias_layout(layout, H, L, S, np.float64)
    g = np.random.default_rng(7).standard_normal((1, H, L, 8))
    grads = attnpy.scaled_dot_product_attention_backward(g, q, k, v, attn_bias=bias, **options)
    m = position_mask(L, S, **options) + bias
    expected = sdpa_backward_reference(g, q, k, v, attn_mask=m)
    for mine, ref in zip((grads.query, grads.key, grads.value), expected):
        np.testing.assert_allclose(mine, ref, atol=1e-10)


def test_window_with_gqa_strides_and_bool_mask():
    # transposed key, GQA 4 -> 2, a bool padding mask, window and offset together
    q, k, v = _qkv((2, 4, 40, 8), 60, 8, np.float64, Hkv=2)
    k_t = np.ascontiguousarray(np.swapaxes(k, -1, -2))
    k_view = np.swapaxes(k_t, -1, -2)
    pad = np.ones((2, 1, 1, 60), dtype=bool)
    pad[0, ..., 50:] = False
    out, w = attnpy.scaled_dot_product_attention(q, k_view, v, attn_mask=pad, enable_gqa=True,
                                                 window=(12, 3), query_offset=20)
    m = np.where(pad, 0.0, -np.inf) + position_mask(40, 60, window=(12, 3), query_offset=20)
    f = sdpa_forward(q, k, v, attn_mask=m, enable_gqa=True)
    np.testing.assert_allclose(w, f["weights"], atol=1e-12)
    np.testing.assert_allclose(out, f["out"], atol=1e-12)


def test_alibi_slopes_broadcast_per_batch():
    q, k, v = _qkv((2, 3, 10, 4), 10, 4, np.float64)
    slopes = np.array([[0.5, 0.25, 0.125], [1.0, 0.1, 0.0]])   # (N, Hq)
    out, w = attnpy.scaled_dot_product_attention(q, k, v, alibi_slopes=slopes)
    ref_out, ref_w = _expected(q, k, v, alibi_slopes=slopes)
    np.testing.assert_allclose(w, ref_w, atol=1e-12)


def test_dropout_keeps_softmax_and_scales_kept_weights():
    # value = identity: the output row is the weights after dropout
    L = S = 64
    q, k, _ = _qkv((1, 2, L, 8), S, 8, np.float64)
    v = np.broadcast_to(np.eye(S), (1, 2, S, S))
    p = 0.3
    out, w = attnpy.scaled_dot_product_attention(q, k, v, dropout_p=p, seed=7)
    _, w0 = attnpy.scaled_dot_product_attention(q, k, v)
    np.testing.assert_allclose(w, w0, atol=1e-15)             # weights: before dropout
    kept = out != 0
    np.testing.assert_allclose(out[kept], w[kept] / (1 - p), rtol=1e-12)
    assert abs(1 - kept.mean() - p) < 0.03                     # 8192 Bernoulli draws
    again, _ = attnpy.scaled_dot_product_attention(q, k, v, dropout_p=p, seed=7,
                                                   need_weights=False)
    np.testing.assert_array_equal(again, out)                  # same seed, other path
    other, _ = attnpy.scaled_dot_product_attention(q, k, v, dropout_p=p, seed=8)
    assert (other != out).any()


def test_dropout_backward_matches_finite_differences():
    q, k, v = _qkv((1, 1, 5, 3), 6, 2, np.float64)
    g = np.random.default_rng(3).standard_normal((1, 1, 5, 2))
    kw = dict(dropout_p=0.4, seed=11, is_causal=True, query_offset=1, alibi_slopes=[0.3])

    def loss(q_):
        return float((attnpy.scaled_dot_product_attention(q_, k, v, **kw)[0] * g).sum())

    grads = attnpy.scaled_dot_product_attention_backward(g, q, k, v, **kw)
    num = np.zeros_like(q)
    for idx in np.ndindex(q.shape):
        d = np.zeros_like(q)
        d[idx] = 1e-6
        num[idx] = (loss(q + d) - loss(q - d)) / 2e-6
    np.testing.assert_allclose(grads.query, num, atol=1e-7)


@pytest.mark.torch
@pytest.mark.parametrize("L,S,options", CASES)
def test_backward_matches_torch_autograd(kernel, L, S, options):
    options = dict(options)
    H = 2
    q, k, v = _qkv((1, H, L, 8), S, 8, np.float64, seed=L)
    kw = {}
    if options.pop("alibi_slopes", False):
        kw["alibi_slopes"] = np.array([0.5, 0.0625])
    if options.pop("bias", False):
        kw["attn_bias"] = 0.5 * np.random.default_rng(1).standard_normal((H, L, S))
    kw.update(options)
    g = np.random.default_rng(2).standard_normal((1, H, L, 8))
    grads = attnpy.scaled_dot_product_attention_backward(g, q, k, v, **kw)
    m = position_mask(L, S, **{n: kw[n] for n in ("is_causal", "query_offset", "window",
                                                    "alibi_slopes") if n in kw})
    if "attn_bias" in kw:
        m = m + kw["attn_bias"]
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    out = F.scaled_dot_product_attention(tq, tk, tv, attn_mask=torch.tensor(m))
    out = torch.nan_to_num(out)    # rows with no key: torch gives NaN, attnpy zeros
    out.backward(torch.tensor(g))
    for mine, t in ((grads.query, tq), (grads.key, tk), (grads.value, tv)):
        np.testing.assert_allclose(mine, np.nan_to_num(t.grad.numpy()), atol=1e-10)


@pytest.mark.parametrize("kwargs,error,words", [
    (dict(query_offset=-1), ValueError, "query_offset must be in [0, 2**31)"),
    (dict(query_offset=2**31), ValueError, "query_offset must be in [0, 2**31)"),
    (dict(query_offset=1.5), TypeError, "query_offset must be an int"),
    (dict(window=(-1, 0)), ValueError, "window's left side must be in [0, 2**31)"),
    (dict(window=(0, 2**31)), ValueError, "window's right side"),
    (dict(window=5), TypeError, "window must be None or a pair"),
    (dict(window=(1.0, 0)), TypeError, "window's left side must be an int"),
    (dict(alibi_slopes=[0.5, 0.5]), ValueError, "alibi_slopes of shape (2,) does not broadcast"),
    (dict(alibi_slopes=[np.nan, 0, 0]), ValueError, "alibi_slopes must be finite"),
    (dict(alibi_slopes=["a", "b", "c"]), TypeError, "alibi_slopes must be a float array"),
    (dict(attn_bias=np.zeros((4, 4), dtype=bool)), TypeError, "attn_bias must be a float array"),
    (dict(attn_bias=np.zeros((4, 5))), ValueError, "attn_bias of shape (4, 5) does not broadcast"),
    (dict(attn_bias=np.zeros((4, 4), dtype=np.float32)), TypeError, "attn_bias must be bool or"),
    (dict(dropout_p=1.5), ValueError, "dropout_p must be in [0, 1]"),
    (dict(dropout_p=0.5, seed=-1), ValueError, "seed must be in [0, 2**64)"),
])
def test_bad_options_name_the_argument(kwargs, error, words):
    q = np.zeros((1, 3, 4, 2))
    before = q.copy()
    with pytest.raises(error) as e:
        attnpy.scaled_dot_product_attention(q, q, q, **kwargs)
    assert words in str(e.value)
    np.testing.assert_array_equal(q, before)


def test_backward_dropout_needs_the_seed():
    q = np.zeros((1, 1, 2, 2))
    with pytest.raises(ValueError, match="needs the forward's seed"):
        attnpy.scaled_dot_product_attention_backward(q, q, q, q, dropout_p=0.5)


@pytest.mark.torch
@pytest.mark.parametrize("H", [1, 2, 3, 4, 6, 8, 12, 16, 20, 32])
def test_alibi_slopes_match_bloom(H):
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor
    S = 5
    alibi = build_alibi_tensor(torch.ones(1, S), H, torch.float64)   # (H, 1, S): slope * j
    hf_slopes = alibi[:, 0, 1].numpy()
    # BLOOM computes its slopes in float32 (then casts): float32's rounding
    np.testing.assert_allclose(attnpy.alibi_slopes(H), hf_slopes, rtol=1e-6)


@pytest.mark.torch
def test_alibi_causal_gives_bloom_weights():
    # BLOOM adds slope * j (not -slope |i - j|); under a causal mask the two
    # differ by slope * i per row, which the softmax does not see
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor
    H, L = 6, 24
    q, k, v = _qkv((1, H, L, 8), L, 8, np.float64)
    alibi = build_alibi_tensor(torch.ones(1, L), H, torch.float64).numpy()[None]  # (1, H, 1, L)
    m = np.where(np.tril(np.ones((L, L), bool)), 0.0, -np.inf) + alibi
    ref = sdpa_forward(q, k, v, attn_mask=m)
    out, w = attnpy.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                 alibi_slopes=attnpy.alibi_slopes(H))
    np.testing.assert_allclose(w, ref["weights"], atol=1e-13)
    np.testing.assert_allclose(out, ref["out"], atol=1e-13)


def test_alibi_slopes_errors():
    with pytest.raises(ValueError, match="num_heads must be >= 1"):
        attnpy.alibi_slopes(0)
    with pytest.raises(TypeError, match="num_heads must be an int"):
        attnpy.alibi_slopes(2.0)


@pytest.mark.parametrize("L,S,options", [(5, 7, dict(is_causal=True)),
                                         (130, 130, dict(is_causal=True, window=(3, 0))),
                                         (70, 200, dict(window=(10, 40), query_offset=50))])
def test_a_key_hidden_by_position_ignores_the_bias(kernel, L, S, options):
    """+inf and NaN in attn_bias where the position hides the key change
    nothing: the key is out, on every kernel, tile and path."""
    q, k, v = _qkv((1, 2, L, 16), S, 8, np.float32, seed=3)
    hidden = np.isneginf(position_mask(L, S, **options))
    bias = np.zeros((L, S), np.float32)
    bias[hidden] = np.inf
    bias[hidden & (np.add.outer(np.arange(L), np.arange(S)) % 3 == 0)] = np.nan
    ref_out, ref_w = _expected(q, k, v, **options)
    for need_weights in (True, False):
        out, w = attnpy.scaled_dot_product_attention(q, k, v, attn_bias=bias,
                                                     need_weights=need_weights, **options)
        np.testing.assert_allclose(out, ref_out, atol=2e-5)
        if need_weights:
            np.testing.assert_allclose(w, ref_w, atol=2e-5)

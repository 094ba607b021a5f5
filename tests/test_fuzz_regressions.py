"""Regressions for what the coverage-guided fuzzer (fuzz/fuzz_binding.py) found.

Each test reproduces a minimised fuzzer input by hand and failed before its fix.
"""
import numpy as np
import pytest

import attnpy
from attnpy import _core


# -- finding 1: a zero-width query/key (E = 0, or head_dim 0) gave NaN -------------
# q k^T is then an empty sum, exactly 0 whatever the scale, so every key gets the
# same weight (torch 2.13: uniform weights for any scale, NaN included). attnpy
# multiplied those zeros by the default scale 1/sqrt(0) = inf and returned NaN.

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


def test_sdpa_backward_zero_width_query():
    q, k = np.zeros((2, 0)), np.zeros((3, 0))
    v = np.arange(6.0).reshape(3, 2)
    dout = np.ones((2, 2))
    gq, gk, gv, _ = attnpy.scaled_dot_product_attention_backward(dout, q, k, v)
    assert gq.shape == (2, 0) and gk.shape == (3, 0)
    # P uniform (1/3): dV = P^T dO = 2/3 everywhere
    np.testing.assert_allclose(gv, np.full((3, 2), 2 / 3), rtol=1e-12)


def test_self_attention_zero_width_projection():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4))
    w_qk = np.zeros((4, 0))
    w_v = rng.standard_normal((4, 2))
    res = attnpy.self_attention(x, w_qk, w_qk, w_v)
    np.testing.assert_allclose(res.weights, np.full((3, 3), 1 / 3), rtol=1e-12)
    np.testing.assert_allclose(res.output, np.broadcast_to((x @ w_v).mean(axis=0), (3, 2)),
                               rtol=1e-12)


def test_core_multihead_zero_head_dim():
    x = np.ones((1, 2, 3))
    w0 = np.zeros((0, 3))
    w_v = np.ones((2, 3))
    out, w, _ = _core.multihead_attention(
        x, x, x, w0, w0, w_v, None, None, None, None, None, None, None, 2, 2, False, None,
        None, False, False, None, 0.0, 0, True, False)
    np.testing.assert_allclose(w, np.full((1, 2, 2, 2), 0.5))
    np.testing.assert_allclose(out, np.full((1, 2, 2), 3.0))


# -- finding 2: billions of empty problems took a minute ------------------------------
# Valid empty inputs (np.empty((2**31 - 1, 0, 4)) costs no memory) whose outputs hold no
# element at all: the core still walked every one of the 2**31 - 1 problems, 24 s (the
# forward with weights, S = Ev = 0), 65 s (the backward, L = S = 0) and 1.5 s
# (self_attention, L = 0). Now they return at once; the bound leaves a 100x margin.

BIG = 2**31 - 1
FAST = 1.0  # seconds


def _zeros(shape, dtype=np.float32):
    return np.lib.stride_tricks.as_strided(np.zeros(1, dtype), shape, (0,) * len(shape))


def _timed(fn, *args, **kwargs):
    import time
    t = time.perf_counter()
    res = fn(*args, **kwargs)
    return res, time.perf_counter() - t


def test_forward_with_weights_over_empty_problems_is_immediate():
    q, k, v = _zeros((BIG, 2, 4)), np.empty((BIG, 0, 4), np.float32), np.empty((BIG, 0, 0),
                                                                                np.float32)
    (out, w), dt = _timed(attnpy.scaled_dot_product_attention, q, k, v)
    assert out.shape == (BIG, 2, 0) and w.shape == (BIG, 2, 0)
    assert dt < FAST, dt


def test_backward_over_empty_problems_is_immediate():
    q = np.empty((BIG, 0, 4), np.float32)
    (gq, gk, gv, _), dt = _timed(attnpy.scaled_dot_product_attention_backward, q, q, q, q)
    assert gq.shape == gk.shape == gv.shape == q.shape
    assert dt < FAST, dt


def test_backward_empty_queries_still_zero_key_gradients():
    # L = 0 but S > 0: the key and value gradients exist and must be exactly zero
    q = np.empty((3, 0, 4))
    k = np.ones((3, 5, 4))
    gq, gk, gv, _ = attnpy.scaled_dot_product_attention_backward(np.empty((3, 0, 4)), q, k, k)
    assert not gk.any() and not gv.any() and gk.shape == (3, 5, 4)


def test_self_attention_over_empty_rows_is_immediate():
    x = np.empty((BIG, 0, 0), np.float32)
    w = np.empty((0, 0), np.float32)
    res, dt = _timed(attnpy.self_attention, x, w, w, w)
    assert res.output.shape == (BIG, 0, 0)
    assert dt < FAST, dt


# -- finding 3: causal_mask(2**63, 0) returned a (0, 0) array --------------------------
# A size beyond what NumPy can index came back as an empty mask of the wrong shape.
# Sizes are now limited like every other dimension (2**31 - 1, a ValueError naming
# the argument), and an empty mask is built without a row index as long as L.

@pytest.mark.parametrize("L, S, name", [(2**63, 0, "L"), (2**63 + 5, 0, "L"), (3, 2**64, "S"),
                                        (2**31, 1, "L"), (0, 2**31, "S")])
def test_causal_mask_too_large_raises_naming_the_size(L, S, name):
    with pytest.raises(ValueError, match=rf"^{name} "):
        attnpy.causal_mask(L, S)


def test_causal_mask_beyond_64_bits_names_both_sizes():
    # within the dimension limit, but L x S x 4 bytes does not fit in 63 bits:
    # NumPy's own message ("array is too big") would name neither
    with pytest.raises(ValueError, match=r"^L x S = 2147483647 x 2147483647 is too large"):
        attnpy.causal_mask(2**31 - 1)


def test_causal_mask_empty_at_the_largest_size():
    import tracemalloc
    tracemalloc.start()
    try:
        m = attnpy.causal_mask(2**31 - 1, 0, align="bottom_right")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert m.shape == (2**31 - 1, 0) and m.dtype == np.float32
    assert peak < 1 << 20, peak


# -- finding 4: projection widths above 2**31 - 1 were not refused -----------------------
# self_attention(x, w_q, w_k, w_v) with w_v of shape (2, 2**31) (a zero-stride view)
# allocated an 8 GiB output and ran for minutes: the multi-head binding limited the
# inputs' dimensions but not the projections' (head_dim * heads, out_dim).

def _wide(rows, cols, dtype=np.float32):
    return np.lib.stride_tricks.as_strided(np.zeros(1, dtype), (rows, cols), (0, 0))


def test_self_attention_value_width_beyond_limit_raises():
    x = np.ones((1, 2), np.float32)
    w = np.ones((2, 3), np.float32)
    for wq, wk, wv in ((w, w, _wide(2, 2**31)), (_wide(2, 2**31), _wide(2, 2**31), w)):
        with pytest.raises(ValueError, match=r"2\*\*31"):
            attnpy.self_attention(x, wq, wk, wv)


@pytest.mark.parametrize("which", ["w_q", "w_v", "w_out"])
def test_core_multihead_projection_rows_beyond_limit_raise(which):
    x = np.ones((1, 2, 3))
    w = {"w_q": np.ones((2, 3)), "w_k": np.ones((2, 3)), "w_v": np.ones((2, 3)),
         "w_out": np.ones((2, 2))}
    if which == "w_out":
        w["w_out"] = _wide(2**31, 2, np.float64)
    else:
        w[which] = _wide(2**31, 3, np.float64)
        if which == "w_q":
            w["w_k"] = w["w_q"]
        w["w_out"] = None
    with pytest.raises(ValueError, match=r"2\*\*31"):
        _core.multihead_attention(x, x, x, w["w_q"], w["w_k"], w["w_v"], None, None, None,
                                  w["w_out"], None, None, None, 1, 1, False, None, None, False,
                                  False, None, 0.0, 0, True, False)


# -- finding 5: MultiheadAttention(dropout=10**400) raised OverflowError ---------------
# float(dropout) overflowed before the range check; an int of any size is compared
# exactly now, and the message stays short.

@pytest.mark.parametrize("p", [10**400, -(10**400), 2**64, 10**5000],
                         ids=["1e400", "-1e400", "2**64", "1e5000"])
def test_mha_huge_int_dropout_is_a_value_error(p):
    with pytest.raises(ValueError, match=r"^dropout must be in \[0, 1\]") as info:
        attnpy.MultiheadAttention(4, 2, dropout=p)
    assert len(str(info.value)) < 200


def test_mha_int_dropout_in_range_still_accepted():
    assert attnpy.MultiheadAttention(4, 2, dropout=1).dropout == 1.0
    assert attnpy.MultiheadAttention(4, 2, dropout=np.int64(0)).dropout == 0.0


# -- finding 6: huge Python ints gave self-contradicting TypeErrors -------------------
# scale=10**400 raised "TypeError: scale must be a float or None; got int" (ints are
# accepted as scales); likewise dropout_p, and set_num_threads(2**70) said "n must be
# an int; got int". They are ValueErrors about the range now.

def _x():
    return np.ones((2, 2))


@pytest.mark.parametrize("call", [
    lambda: attnpy.scaled_dot_product_attention(_x(), _x(), _x(), scale=10**400),
    lambda: attnpy.scaled_dot_product_attention_backward(_x(), _x(), _x(), _x(),
                                                         scale=-(10**400)),
    lambda: attnpy.self_attention(_x(), _x(), _x(), _x(), scale=10**400),
], ids=["sdpa", "sdpa_backward", "self_attention"])
def test_scale_out_of_float_range_is_a_value_error_naming_scale(call):
    with pytest.raises(ValueError, match=r"^scale is out of the float range"):
        call()


def test_dropout_p_out_of_float_range_is_a_value_error():
    with pytest.raises(ValueError, match=r"^dropout_p is out of the float range"):
        attnpy.scaled_dot_product_attention(_x(), _x(), _x(), dropout_p=10**400)


@pytest.mark.parametrize("n", [2**70, -(2**70)], ids=["2**70", "-2**70"])
def test_set_num_threads_huge_int_is_a_value_error(n):
    before = attnpy.get_num_threads()
    with pytest.raises(ValueError, match=r"^n must be between 1 and 256"):
        attnpy.set_num_threads(n)
    assert attnpy.get_num_threads() == before


def test_non_numbers_still_type_errors():
    with pytest.raises(TypeError, match=r"^scale must be a float or None; got str"):
        attnpy.scaled_dot_product_attention(_x(), _x(), _x(), scale="2")
    with pytest.raises(TypeError, match=r"^n must be an int; got float"):
        attnpy.set_num_threads(1.5)


# -- finding 7: array-likes out of range raised OverflowError -------------------------
# self_attention(x int16, ..., w_v=[[3e38]]) converted w_v to x's dtype (int16) and
# NumPy raised OverflowError; MultiheadAttention()(query=[[10**400, ...]]) likewise.
# Array-likes that do not convert are a ValueError/TypeError naming the argument now,
# and a non-float x is refused before any weight is converted.

def test_self_attention_int_x_is_refused_before_converting_weights():
    x = np.ones((1, 1), np.int16)
    w = np.ones((1, 1), np.int16)
    with pytest.raises(TypeError, match=r"^x must be float32 or float64 .*got int16"):
        attnpy.self_attention(x, w, w, [[3e38]])


@pytest.mark.parametrize("bad", [[[10**400, 0.0]], [[1.0, "a"]], [[1.0], [1.0, 2.0]]],
                         ids=["huge-int", "str", "ragged"])
def test_mha_array_like_that_does_not_convert_names_the_argument(bad):
    layer = attnpy.MultiheadAttention(2, 1)
    with pytest.raises((TypeError, ValueError), match=r"^query "):
        layer(bad)


def test_self_attention_list_x_out_of_range_names_x():
    w = np.ones((2, 2))
    with pytest.raises((TypeError, ValueError), match=r"^x "):
        attnpy.self_attention([[10**400, 1.0]], w, w, w)


# -- finding 8: the multi-head backward over 2**31 - 1 empty sequences took 34 s -------
# (L, N, E) = (0, 2**31 - 1, 12): the forward returns at once, the backward walked
# every empty sequence in the weight and bias gradients (and GQA's zeroing).
# Without rows, the input gradients are empty and the parameter gradients zero.

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


def test_core_mha_backward_without_rows_zeroes_given_gradients():
    # the private entry point overwrites the gradient arrays it is given: with no
    # rows, with zeros (not left as they were)
    x = np.empty((2, 0, 2))
    w = np.ones((2, 2))
    b = np.ones(2)
    out, _, raw = _core.multihead_attention(x, x, x, w, w, w, b, b, b, w, b, None, None, 1, 1,
                                            False, None, None, False, False, None, 0.0, 0,
                                            True, True)
    gw = [np.full((2, 2), 7.0) for _ in range(4)]
    gb = [np.full(2, 7.0) for _ in range(4)]
    _core.multihead_attention_backward(
        x, x, x, w, w, w, b, b, b, w, b, None, None, 1, 1, False, None, None, False, False,
        None, 0.0, 0, np.empty((2, 0, 2)), raw["q"], raw["k"], raw["v"], raw["concat"],
        raw["weights"], gw[0], gw[1], gw[2], gb[0], gb[1], gb[2], gw[3], gb[3], None, None)
    for g in gw + gb:
        assert not g.any()

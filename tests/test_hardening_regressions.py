"""Bugs found while hardening (issue 7), each with the test that showed it."""
import numpy as np
import pytest

import attnpy


@pytest.mark.parametrize("name,shapes", [
    ("query", [(2, 3, 5)]),
    ("key", [(2, 3, 8), (2, 4, 5), (2, 4, 8)]),
    ("value", [(2, 3, 8), (2, 4, 8), (2, 4, 6)]),
])
def test_multihead_blames_the_input_of_the_wrong_width(name, shapes):
    """A query of the wrong width was reported as "q_proj_weight must have
    shape (8, 5); got (8, 8)": the layer's own parameter, not the argument."""
    layer = attnpy.MultiheadAttention(8, 2, dtype=np.float64)
    with pytest.raises(ValueError, match=rf"^{name} must have 8 features .* got shape"):
        layer(*(np.ones(s) for s in shapes))


def _unaligned(shape, dtype=np.float64):
    dt = np.dtype(dtype)
    raw = bytearray(int(np.prod(shape)) * dt.itemsize + 1)
    a = np.frombuffer(raw, dtype=dt, count=int(np.prod(shape)), offset=1).reshape(shape)
    a[...] = 1
    return a


def test_self_attention_names_its_own_arguments():
    """self_attention hands x to the core as query, key and value and w_q.T as
    q_proj_weight: an unaligned x was "query is not aligned", an unaligned w_q
    "q_proj_weight is not aligned", and an int x made the weights the culprit
    ("w_q has dtype float64 but the layer computes in int64; pass
    w_q.astype(np.int64)")."""
    x, w = np.ones((3, 4)), np.ones((4, 2))
    with pytest.raises(ValueError, match="^x is not aligned"):
        attnpy.self_attention(_unaligned((3, 4)), w, w, w)
    for i, name in enumerate(("w_q", "w_k", "w_v")):
        ws = [w, w, w]
        ws[i] = _unaligned((4, 2))
        with pytest.raises(ValueError, match=f"^{name} is not aligned"):
            attnpy.self_attention(x, *ws)
    for dt in (np.int64, np.float16, np.dtype(">f8"), object):
        with pytest.raises(TypeError, match="^x must be float32 or float64"):
            attnpy.self_attention(x.astype(dt), w, w, w)


def test_a_dtype_numpy_does_not_know_is_named():
    """np.dtype's own "data type 'nonsense' not understood" named no argument."""
    with pytest.raises(TypeError, match="^dtype must be float32 or float64; got 'nonsense'"):
        attnpy.causal_mask(3, dtype="nonsense")
    with pytest.raises(TypeError, match="^dtype must be float32 or float64; got 'nonsense'"):
        attnpy.MultiheadAttention(4, 2, dtype="nonsense")


@pytest.mark.parametrize("kernel", ["reference"] + attnpy.supported_kernels()[1:])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_a_masked_pair_never_counts_whatever_its_score(kernel, dtype, mask_kind):
    """A key the mask hides (bool False, or a float -inf) gets no weight even
    when its score is NaN or inf: a NaN in a masked key's row, or scale=inf
    times a zero dot product. The reference kernel skipped such pairs; the
    tiled kernels added the score to the mask's -inf and got NaN for the
    whole row. Found by tests/test_properties.py."""
    allowed = np.array([[True, False], [True, False], [False, False]])
    mask = allowed if mask_kind == "bool" else np.where(allowed, 0.0, -np.inf).astype(dtype)
    q = np.array([[1.0, 0.0], [0.5, 0.0], [1.0, 1.0]], dtype)
    v = np.array([[1.0, 2.0], [3.0, 4.0]], dtype)
    cases = [  # key 1 (masked everywhere) holds a NaN / an inf score
        (np.array([[1.0, 0.0], [np.nan, 0.0]], dtype), None),
        (np.array([[1.0, 0.0], [np.inf, 0.0]], dtype), None),
        (np.array([[1.0, 0.0], [0.0, 0.0]], dtype), float("inf")),   # inf * 0 = NaN
    ]
    want_w = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    with attnpy.use_kernel(kernel):
        for k, scale in cases:
            for need_weights in (True, False):
                out, w = attnpy.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, scale=scale, need_weights=need_weights)
                if scale is None:
                    np.testing.assert_array_equal(out, want_w @ v)
                    if need_weights:
                        np.testing.assert_array_equal(w, want_w)
                else:   # key 0's score is inf * 1 = inf: rows 0, 1 NaN; row 2 masked
                    assert np.isnan(out[:2]).all()
                    np.testing.assert_array_equal(out[2], 0.0)
            grads = attnpy.scaled_dot_product_attention_backward(
                np.ones((3, 2), dtype), q, k, v, attn_mask=mask, scale=scale)
            if scale is None:
                for g in grads[:3]:
                    assert np.isfinite(g).all()
                np.testing.assert_array_equal(grads.value[1], 0.0)


@pytest.mark.parametrize("kernel", ["reference"] + attnpy.supported_kernels()[1:])
def test_backward_with_an_infinite_scale_agrees_across_kernels(kernel):
    """scale=inf sends a negative score to -inf: the row has no weight and
    passes no gradient (the reference kernel's 0). The tiled backward computed
    dq = scale * (dS k) = inf * 0 = NaN. Found by tests/test_properties.py."""
    q = np.array([[1.0, -1.5, 1.0]], np.float32)
    k = np.array([[1.0, 1.5, -2.0]], np.float32)
    v = np.array([[0.5]], np.float32)
    with attnpy.use_kernel(kernel):
        g = attnpy.scaled_dot_product_attention_backward(
            np.ones((1, 1), np.float32), q, k, v, scale=float("inf"))
    for grad in g[:3]:
        np.testing.assert_array_equal(grad, 0.0)

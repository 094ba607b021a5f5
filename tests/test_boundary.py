"""The Python/C boundary (csrc/README.md): options by name, memory safety in the binding.

The private entry points (_core.sdpa, _core.sdpa_backward, _core.linear)
take their options by keyword only: a misspelt, missing or positional option
is a TypeError, never a silent default. The binding checks memory safety
(dtypes, shapes, writeability, overlap, sizes) whoever calls it, and the
multi-head layer is composed in Python from these calls (attnpy/_mha.py).
"""
import numpy as np
import pytest

import attnpy
from attnpy import _args, _core, _mha

rng = np.random.default_rng(0)
Q = rng.standard_normal((2, 3, 4))
K = rng.standard_normal((2, 5, 4))
V = rng.standard_normal((2, 5, 2))


# -- options by name --------------------------------------------------------------------

@pytest.mark.parametrize("fn, args", [
    (_core.sdpa, (Q, K, V)),
    (_core.sdpa_backward, (np.zeros((2, 3, 2)), Q, K, V)),
])
def test_a_misspelt_option_is_a_type_error(fn, args):
    with pytest.raises(TypeError, match="unexpected keyword argument 'is_casual'"):
        fn(*args, scale=0.5, is_casual=True)


def test_options_are_keyword_only():
    with pytest.raises(TypeError, match="keyword-only"):
        _core.sdpa(Q, K, V, 0.5)
    with pytest.raises(TypeError, match="keyword-only"):
        _core.linear(Q, np.ones((2, 4)), None, None)


def test_the_scale_has_no_default_in_the_binding():
    # Python resolves defaults (1 / sqrt(E)); the binding requires it by name
    with pytest.raises(TypeError, match="missing required argument 'scale'"):
        _core.sdpa(Q, K, V)


def test_an_option_given_twice_is_a_type_error():
    with pytest.raises(TypeError, match="multiple values for argument 'key'"):
        _core.sdpa(Q, K, V, key=K, scale=0.5)


def test_flags_must_be_bools():
    # no truthiness across the boundary: a flipped or mistyped flag is an error
    with pytest.raises(TypeError, match="is_causal must be a bool"):
        _core.sdpa(Q, K, V, scale=0.5, is_causal=1)


def test_mask_kinds_are_named():
    m = np.ones((3, 5), bool)
    for bad in ([(m, "Attend", "attn_mask")], [(m, "attend")], [(m, "attend", "a")] * 3, m):
        with pytest.raises(TypeError, match="masks must be a sequence"):
            _core.sdpa(Q, K, V, scale=0.5, masks=bad)
    # the same bool mask means opposite things under the two names
    out_a, w_a, *_ = _core.sdpa(Q, K, V, scale=0.5, masks=[(~np.eye(3, 5, dtype=bool), "attend", "m")])
    out_i, w_i, *_ = _core.sdpa(Q, K, V, scale=0.5, masks=[(np.eye(3, 5, dtype=bool), "ignore", "m")])
    np.testing.assert_array_equal(w_a, w_i)
    assert (w_a[:, np.arange(3), np.arange(3)] == 0).all()


def test_the_binding_refuses_array_likes():
    # Python converts lists (attnpy._args); the binding takes ndarrays only
    with pytest.raises(TypeError, match="query must be a NumPy array; got list"):
        _core.sdpa(Q.tolist(), K, V, scale=0.5)


def test_limits_come_from_the_core():
    assert _core.MAX_EXTENT == _args.MAX_EXTENT == 2**31 - 1
    assert _core.MAX_THREADS == _args.MAX_THREADS
    with pytest.raises(ValueError, match=f"between 1 and {_core.MAX_THREADS}"):
        attnpy.set_num_threads(_core.MAX_THREADS + 1)


# -- memory safety in the binding, whoever calls it ---------------------------------------

def test_linear_out_may_not_overlap_its_inputs():
    w = np.ones((4, 4))
    before = w.copy()
    with pytest.raises(ValueError, match="out shares memory with weight"):
        _core.linear(Q, w, out=np.lib.stride_tricks.as_strided(w, (2, 3, 4), (0, 32, 8)))
    np.testing.assert_array_equal(w, before)


def test_gradients_may_not_overwrite_what_the_backward_reads():
    # (review finding: gradient arrays that overlapped an input of the backward)
    q = Q.copy()
    before = q.copy()
    with pytest.raises(ValueError, match="gradient of query shares memory with query"):
        _core.sdpa_backward(np.zeros((2, 3, 2)), q, K, V, scale=0.5, grads=(q, None, None))
    np.testing.assert_array_equal(q, before)


def test_given_gradients_are_written_in_place():
    dout = rng.standard_normal((2, 3, 2))
    want = _core.sdpa_backward(dout, Q, K, V, scale=0.5)
    given = tuple(np.full(a.shape, 7.0) for a in (Q, K, V))
    got = _core.sdpa_backward(dout, Q, K, V, scale=0.5, grads=given)
    for g, a, w in zip(given, got, want):
        assert a is g
        np.testing.assert_allclose(g, w, rtol=1e-13, atol=1e-15)


def test_read_only_outputs_are_refused():
    out = np.zeros((2, 3, 2))
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out must be writeable"):
        _core.sdpa(Q, K, V, scale=0.5, out=out)


# -- the layer's composition (formerly one C entry point each way) ----------------------

def _forward(x, proj, H, Hkv, w_out=None, need_weights=True, trace=False):
    return _mha._layer_forward(x, x, x, proj, None, H, Hkv, None, False, w_out, None, masks=[],
                               scale=_args.default_scale(proj[0].shape[0] // H),
                               is_causal=False, dropout_p=0.0, seed=0,
                               need_weights=need_weights, trace=trace)


def test_multihead_zero_head_dim():
    # fuzzer finding 1: head_dim 0 gave NaN; the empty q k^T is 0, so weights are uniform
    x = np.ones((1, 2, 3))
    w0 = np.zeros((0, 3))
    out, w, *_ = _forward(x, (w0, w0, np.ones((2, 3)), None, None, None), 2, 2)
    np.testing.assert_allclose(w, np.full((1, 2, 2, 2), 0.5))
    np.testing.assert_allclose(out, np.full((1, 2, 2), 3.0))


def _wide(rows, cols):
    return np.broadcast_to(np.ones((1, 1)), (rows, cols))


@pytest.mark.parametrize("which", ["w_q", "w_v", "w_out"])
def test_multihead_projection_rows_beyond_limit_raise(which):
    # fuzzer finding 4: projection widths above 2**31 - 1 were accepted (8 GiB, minutes)
    x = np.ones((1, 2, 3))
    w = {"w_q": np.ones((2, 3)), "w_k": np.ones((2, 3)), "w_v": np.ones((2, 3)),
         "w_out": np.ones((2, 2))}
    if which == "w_out":
        w["w_out"] = _wide(2**31, 2)
    else:
        w[which] = _wide(2**31, 3)
        if which == "w_q":
            w["w_k"] = w["w_q"]
    with pytest.raises(ValueError, match=r"2\*\*31"):
        _forward(x, (w["w_q"], w["w_k"], w["w_v"], None, None, None), 1, 1, w_out=w["w_out"])


def test_multihead_backward_without_rows_zeroes_given_gradients():
    # fuzzer finding 8's neighbour: with no rows, the parameters' gradient
    # arrays are overwritten with zeros, not left as they were
    x = np.empty((2, 0, 2))
    w, b = np.ones((2, 2)), np.ones(2)
    layer_proj = (w, w, w, b, b, b)
    _, _, raw, _ = _mha._layer_forward(x, x, x, layer_proj, None, 1, 1, None, False, w, b,
                                    masks=[], scale=1.0, is_causal=False, dropout_p=0.0,
                                    seed=0, need_weights=True, trace=True)
    gw = [np.full((2, 2), 7.0) for _ in range(4)]
    gb = [np.full(2, 7.0) for _ in range(4)]
    _mha._layer_backward(x, x, x, layer_proj, raw, np.empty((2, 0, 2)), w,
                         (gw[0], gw[1], gw[2], gb[0], gb[1], gb[2]), gw[3], gb[3], None)
    for g in gw + gb:
        assert not g.any()


def test_bias_kv_gradients_come_together():
    # review finding: a NULL write when only one of bias_k / bias_v's gradients was
    # asked for; the layer now always computes both, as the sums of dk, dv at row S
    layer = attnpy.MultiheadAttention(8, 2, add_bias_kv=True, dtype=np.float64, seed=0)
    x = np.random.default_rng(1).standard_normal((1, 3, 8))
    res = layer(x, trace=True)
    grads = layer.backward(res, np.ones((1, 3, 8)))
    assert grads.params["bias_k"].shape == grads.params["bias_v"].shape == (1, 1, 8)
    assert grads.params["bias_k"].any() and grads.params["bias_v"].any()


def test_layer_heads_are_views_of_the_projections():
    # split and merge copy nothing: the trace's heads share the projections' memory
    layer = attnpy.MultiheadAttention(8, 2, dtype=np.float32, seed=0, batch_first=True)
    x = np.random.default_rng(2).standard_normal((2, 5, 8)).astype(np.float32)
    t = layer(x, trace=True).trace
    assert np.shares_memory(t.head_outputs, t.concat)
    assert t.q.base is not None and t.k.base is not None

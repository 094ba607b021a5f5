"""MultiheadAttention beyond torch's layer: grouped-query heads, dropout, the
trace's guarantees, and the textbook self_attention. Checked against the
float64 NumPy reference (reference.py; torch has no num_kv_heads)."""
import numpy as np
import pytest

import attnpy
from reference import mha_reference, self_attention_reference


def rng_for(name):
    return np.random.default_rng(abs(hash(name)) % 2**32)


def random_layer(E, H, Hkv=None, dtype=np.float64, **kw):
    mha = attnpy.MultiheadAttention(E, H, num_kv_heads=Hkv, dtype=dtype, seed=1, **kw)
    rng = np.random.default_rng(2)
    for p in mha.parameters():
        p[...] = rng.standard_normal(p.shape) * 0.5       # in place: parameters() are live
    return mha


@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2), (6, 3), (4, 1)], ids=["mha", "gqa2", "gqa3", "mqa"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_grouped_query_heads(H, Hkv, dtype):
    E = 24
    mha = random_layer(E, H, Hkv, dtype=dtype)
    rng = rng_for(f"gqa{H}{Hkv}")
    x = rng.standard_normal((2, 5, E)).astype(dtype)
    kv = rng.standard_normal((2, 7, E)).astype(dtype)
    padding = np.zeros((2, 7), bool)
    padding[1, 4:] = True
    res = mha(x, kv, kv, key_padding_mask=padding, trace=True)
    ref = mha_reference(mha, x, kv, kv, key_padding_mask=padding)
    ref_out, ref_w = ref["output"], ref["weights"]
    tol = 1e-4 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(res.output, ref_out, atol=tol, rtol=tol)
    np.testing.assert_allclose(res.weights, ref_w, atol=tol, rtol=tol)
    assert mha.state_dict()["in_proj_weight"].shape == (E + 2 * Hkv * (E // H), E)
    assert res.trace.k.shape == (2, Hkv, 7, E // H)


# ---------------------------------------------------------------- dropout

def test_dropout_is_seeded_and_only_in_training():
    x = rng_for("drop").standard_normal((2, 16, 32))
    a = random_layer(32, 4, dropout=0.3)
    out_eval = a(x).output
    a.train()
    b = attnpy.MultiheadAttention(32, 4, dropout=0.3, dtype=np.float64, seed=1)
    b.load_state_dict(a.state_dict())
    b._rng = np.random.default_rng(99)
    a._rng = np.random.default_rng(99)
    b.train()
    r1, r2 = a(x, trace=True), b(x, trace=True)
    np.testing.assert_array_equal(r1.output, r2.output)               # same seed, same result
    np.testing.assert_array_equal(r1.trace.dropout_mask, r2.trace.dropout_mask)
    assert not np.allclose(r1.output, out_eval)                        # dropout did something
    r3 = a(x, trace=True)                                              # the next call draws anew
    assert not np.array_equal(r3.trace.dropout_mask, r1.trace.dropout_mask)
    a.eval()
    np.testing.assert_array_equal(a(x).output, out_eval)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keeps_1_minus_p_and_rescales(p):
    mha = random_layer(32, 4, dropout=p).train()
    x = rng_for(f"p{p}").standard_normal((4, 64, 32))
    res = mha(x, trace=True)
    t = res.trace
    n = t.dropout_mask.size
    kept = t.dropout_mask.mean()
    # binomial: 5 standard deviations
    assert abs(kept - (1 - p)) <= 5 * np.sqrt(p * (1 - p) / n), (kept, 1 - p, n)
    expected = np.where(t.dropout_mask, t.weights / (1 - p), 0.0)
    np.testing.assert_allclose(t.dropped_weights, expected, rtol=1e-12, atol=0)
    # the returned weights are the post-dropout ones, as torch returns them
    assert res.weights_after_dropout
    np.testing.assert_array_equal(res.weights, t.dropped_weights)
    # and they are what multiplied v
    np.testing.assert_allclose(t.head_outputs, t.dropped_weights @ np.repeat(t.v, 1, axis=1),
                               rtol=1e-10, atol=1e-12)
    # the softmax itself is untouched: rows still sum to 1
    np.testing.assert_allclose(t.weights.sum(-1), 1.0, rtol=1e-12)


def test_streaming_dropout_equals_materialised_dropout():
    """need_weights=False streams over keys; the dropout decisions are the same
    hash of (seed, element), so both paths agree."""
    x = rng_for("stream").standard_normal((2, 130, 16))
    a = random_layer(16, 2, dropout=0.4).train()
    b = random_layer(16, 2, dropout=0.4).train()
    a._rng, b._rng = np.random.default_rng(5), np.random.default_rng(5)
    streamed = a(x, need_weights=False)
    materialised = b(x, need_weights=True)
    assert streamed.weights is None
    np.testing.assert_allclose(streamed.output, materialised.output, rtol=1e-12, atol=1e-12)


def test_dropout_p_one_drops_everything():
    mha = random_layer(8, 2, dropout=1.0, bias=False).train()
    res = mha(rng_for("p1").standard_normal((1, 3, 8)), trace=True)
    assert not res.trace.dropout_mask.any()
    np.testing.assert_array_equal(res.trace.head_outputs, 0.0)


# ---------------------------------------------------------------- the trace

def test_trace_is_read_only_and_outputs_are_not():
    mha = random_layer(8, 2)
    res = mha(rng_for("ro").standard_normal((2, 3, 8)), trace=True)
    for name in ("q", "k", "v", "scores", "logits", "weights", "head_outputs", "concat", "output"):
        arr = getattr(res.trace, name)
        assert not arr.flags.writeable, name
        with pytest.raises(ValueError):
            arr[...] = 0
    assert res.output.flags.writeable
    np.testing.assert_array_equal(res.trace.output, res.output)


def test_trace_head_outputs_are_concat_views():
    """Splitting and merging heads copies nothing: head_outputs and concat
    share memory, as do q and the projection buffer."""
    mha = random_layer(12, 3)
    t = mha(rng_for("views").standard_normal((2, 4, 12)), trace=True).trace
    assert np.shares_memory(t.head_outputs, t.concat)
    for h in range(3):
        np.testing.assert_array_equal(t.head_outputs[:, h], t.concat[:, :, 4 * h:4 * h + 4])


def test_no_trace_no_weights_keeps_nothing():
    mha = random_layer(8, 2)
    res = mha(rng_for("none").standard_normal((2, 3, 8)), need_weights=False)
    assert res.weights is None and res.trace is None


def test_unbatched_matches_batched():
    mha = random_layer(8, 2, add_bias_kv=True, add_zero_attn=True)
    x = rng_for("unb").standard_normal((5, 8))
    one = mha(x, trace=True)
    many = mha(x[None], trace=True)
    np.testing.assert_array_equal(one.output, many.output[0])
    np.testing.assert_array_equal(one.weights, many.weights[0])
    assert one.trace.k.shape == (2, 5 + 2, 4)


def test_parameters_are_live():
    mha = random_layer(8, 2)
    x = rng_for("live").standard_normal((1, 3, 8))
    before = mha(x).output
    for p in mha.parameters():
        p *= 0.0
    np.testing.assert_array_equal(mha(x).output, 0.0)
    assert not np.allclose(before, 0.0)


# ---------------------------------------------------------------- self_attention

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("causal", [False, True])
def test_self_attention_textbook(dtype, causal):
    rng = rng_for(f"sa{causal}")
    L, d_model, d_k, d_v = 6, 10, 4, 3
    x = rng.standard_normal((L, d_model)).astype(dtype)
    w_q, w_k = (rng.standard_normal((d_model, d_k)).astype(dtype) for _ in range(2))
    w_v = rng.standard_normal((d_model, d_v)).astype(dtype)
    res = attnpy.self_attention(x, w_q, w_k, w_v, is_causal=causal, trace=True)

    X = x.astype(np.float64)
    Q, K = X @ w_q, X @ w_k
    out, w = self_attention_reference(X, w_q, w_k, w_v, is_causal=causal)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(res.weights, w, atol=tol, rtol=tol)
    np.testing.assert_allclose(res.output, out, atol=tol, rtol=tol)
    np.testing.assert_allclose(res.trace.q[0], Q, atol=tol, rtol=tol)
    np.testing.assert_allclose(res.trace.scores[0], Q @ K.T, atol=10 * tol, rtol=tol)
    assert res.output.shape == (L, d_v)


def test_self_attention_mask_polarity_is_sdpa():
    rng = rng_for("sapol")
    x = rng.standard_normal((2, 4, 6))
    w = rng.standard_normal((6, 6))
    allowed = np.tril(np.ones((4, 4), bool))
    masked = attnpy.self_attention(x, w, w, w, attn_mask=allowed)
    causal = attnpy.self_attention(x, w, w, w, is_causal=True)
    np.testing.assert_allclose(masked.output, causal.output, rtol=1e-13, atol=1e-13)


def test_self_attention_bad_weights_name_the_argument():
    x = np.zeros((3, 4))
    with pytest.raises(ValueError, match="w_k"):
        attnpy.self_attention(x, np.zeros((4, 2)), np.zeros((5, 2)), np.zeros((4, 2)))
    with pytest.raises(TypeError, match="w_q"):
        attnpy.self_attention(x, np.zeros((4, 2), np.float32), np.zeros((4, 2)), np.zeros((4, 2)))


def test_nothing_given_is_written():
    """Inputs, masks, parameters and the forward's result are bit-identical
    after the forward, the backward and error paths."""
    rng = rng_for("untouched")
    mha = random_layer(8, 2, add_bias_kv=True, dropout=0.2).train()
    x = rng.standard_normal((2, 5, 8))
    kv = rng.standard_normal((2, 6, 8))
    kpm = rng.random((2, 6)) < 0.3
    am = rng.standard_normal((5, 6))
    g = rng.standard_normal((2, 5, 8))
    w = rng.standard_normal((8, 4))
    given = [x, kv, kpm, am, g, w] + mha.parameters()
    before = [a.copy() for a in given]
    res = mha(x, kv, kv, key_padding_mask=kpm, attn_mask=am, trace=True)
    trace_before = {f: getattr(res.trace, f).copy() for f in ("q", "k", "v", "weights", "concat")}
    mha.backward(res, g)
    attnpy.self_attention(x, w, w, w, is_causal=True, trace=True)
    with pytest.raises(ValueError):
        mha(x, kv, kv, key_padding_mask=kpm[:, :3])
    with pytest.raises(ValueError):
        mha.backward(res, g[:, :2])
    for a, b in zip(given, before):
        np.testing.assert_array_equal(a, b)
    for f, b in trace_before.items():
        np.testing.assert_array_equal(getattr(res.trace, f), b)

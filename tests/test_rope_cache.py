"""attnpy.rope, RoPE, sinusoidal_positions, relative_position_bucket and
KVCache (issue 15): against float64 references written here (rotation as
complex multiplication), Hugging Face's own functions (Llama's rotate_half,
GPT-J's rotate_every_two, GPT-NeoX's partial rotary, T5's buckets) and
full causal attention for the cache."""
import numpy as np
import pytest

import attnpy

from optional_torch import torch

TOL = {np.float32: 2e-6, np.float64: 1e-13}


def ref_rope(x, positions, base=10000.0, interleaved=False, rotary_dim=None, inverse=False):
    """float64 reference: each feature pair is a complex number times e^{i p theta}."""
    x = np.asarray(x, np.float64)
    D = x.shape[-1]
    r = D if rotary_dim is None else rotary_dim
    theta = np.array([base ** (-2.0 * i / r) for i in range(r // 2)])
    p = np.asarray(positions, np.float64)[..., None]
    turn = np.exp((-1j if inverse else 1j) * p * theta)
    if interleaved:
        z = x[..., 0:r:2] + 1j * x[..., 1:r:2]
    else:
        z = x[..., :r // 2] + 1j * x[..., r // 2:r]
    z = z * turn
    out = np.array(np.broadcast_to(x, np.broadcast_shapes(x.shape[:-1], p.shape[:-1]) + (D,)))
    if interleaved:
        out[..., 0:r:2], out[..., 1:r:2] = z.real, z.imag
    else:
        out[..., :r // 2], out[..., r // 2:r] = z.real, z.imag
    return out


def _x(shape, dtype, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# ---------------------------------------------------------------------------
# rope: the rotation


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [None, 4, 8])
@pytest.mark.parametrize("inverse", [False, True])
def test_rope_matches_the_complex_rotation(dtype, interleaved, rotary_dim, inverse):
    x = _x((2, 3, 7, 12), dtype)
    pos = np.array([0, 1, 2, 5, 100, 4095, 2**31 - 1])
    got = attnpy.rope(x, pos, interleaved=interleaved, rotary_dim=rotary_dim, inverse=inverse)
    want = ref_rope(x, pos, interleaved=interleaved, rotary_dim=rotary_dim, inverse=inverse)
    assert got.dtype == dtype and got.shape == x.shape
    # an angle of 2**31 radians rounds at float64's 2**-22 absolute
    tol = max(TOL[dtype], 1e-6 if pos.max() > 1e6 else 0)
    np.testing.assert_allclose(got, want, atol=tol * 4, rtol=0)


def test_rope_default_positions_and_base():
    x = _x((5, 8), np.float64)
    np.testing.assert_allclose(attnpy.rope(x), ref_rope(x, np.arange(5)), atol=1e-14)
    np.testing.assert_allclose(attnpy.rope(x, base=500000.0),
                               ref_rope(x, np.arange(5), base=500000.0), atol=1e-14)
    assert np.array_equal(attnpy.rope(x, np.zeros(5, int)), x)   # position 0: no turn


def test_rope_positions_broadcast_per_batch():
    x = _x((2, 3, 4, 8), np.float64)
    pos = np.array([[[0, 1, 2, 3]], [[7, 8, 9, 10]]])      # (N, 1, L)
    np.testing.assert_allclose(attnpy.rope(x, pos), ref_rope(x, pos), atol=1e-13)
    one = attnpy.rope(x[0], np.arange(4) + 0)                # and a wider result
    wide = attnpy.rope(x[0, 0], np.arange(4)[None] + np.array([[0], [7]]))
    assert wide.shape == (2, 4, 8)
    np.testing.assert_allclose(wide[0], one[0], atol=1e-15)


def test_rope_relative_property():
    """The score of a rotated pair depends only on the offset between them."""
    q, k = _x((1, 16), np.float64, 1), _x((1, 16), np.float64, 2)
    dots = [(attnpy.rope(q, [p + 3]) @ attnpy.rope(k, [p]).T).item() for p in (0, 5, 100, 9000)]
    np.testing.assert_allclose(dots, dots[0], rtol=1e-11)
    assert abs((attnpy.rope(q, [4]) @ attnpy.rope(k, [0]).T).item() - dots[0]) > 1e-3


def test_rope_inverse_is_the_adjoint():
    """<rope(x), g> = <x, rope(g, inverse=True)>: the backward of rope."""
    x, g = _x((3, 9, 10), np.float64, 1), _x((3, 9, 10), np.float64, 2)
    pos = np.arange(9) * 3
    for kw in (dict(), dict(interleaved=True), dict(rotary_dim=6)):
        lhs = np.sum(attnpy.rope(x, pos, **kw) * g)
        rhs = np.sum(x * attnpy.rope(g, pos, inverse=True, **kw))
        assert abs(lhs - rhs) < 1e-12 * np.sum(np.abs(x * g))
        np.testing.assert_allclose(attnpy.rope(attnpy.rope(x, pos, **kw), pos, inverse=True, **kw),
                                   x, atol=1e-14)


def test_rope_reads_any_strides_and_leaves_x_alone():
    base = _x((4, 6, 16), np.float32)
    x = base.transpose(1, 0, 2)[:, ::2, ::-1]             # (6, 2, 16), no copy
    x = x.swapaxes(0, 1)                                  # (2, 6, 16)
    before = base.copy()
    got = attnpy.rope(x, np.arange(6), rotary_dim=8)
    np.testing.assert_allclose(got, ref_rope(np.ascontiguousarray(x), np.arange(6), rotary_dim=8),
                               atol=1e-5)
    assert np.array_equal(base, before)


def test_rope_out_and_in_place():
    x = _x((3, 5, 8), np.float64)
    want = ref_rope(x, np.arange(5), interleaved=True, rotary_dim=6)
    out = np.full_like(x, np.nan)
    assert attnpy.rope(x, out=out, interleaved=True, rotary_dim=6) is out
    np.testing.assert_allclose(out, want, atol=1e-14)
    y = x.copy()
    attnpy.rope(y, out=y, interleaved=True, rotary_dim=6)
    np.testing.assert_allclose(y, want, atol=1e-14)


@pytest.mark.parametrize("call, exc, words", [
    (lambda x: attnpy.rope(x.astype(np.int32)), TypeError, "x must be a float32 or float64"),
    (lambda x: attnpy.rope(x[0, 0]), ValueError, "at least 2-D"),
    (lambda x: attnpy.rope(x, rotary_dim=3), ValueError, "rotary_dim must be even"),
    (lambda x: attnpy.rope(x, rotary_dim=10), ValueError, "in [2, D] with D = 8"),
    (lambda x: attnpy.rope(x, rotary_dim=2.0), TypeError, "rotary_dim must be an int"),
    (lambda x: attnpy.rope(x, [0, 1, 2]), ValueError, "broadcastable to (..., L) with L = 5"),
    (lambda x: attnpy.rope(x, np.arange(5) - 1), ValueError, "positions must be in [0, 2**31)"),
    (lambda x: attnpy.rope(x, np.arange(5) + 2**31), ValueError, "positions must be in"),
    (lambda x: attnpy.rope(x, np.arange(5.0)), TypeError, "positions must be an int array"),
    (lambda x: attnpy.rope(x, np.zeros((3, 5), int)), ValueError, "do not broadcast"),
    (lambda x: attnpy.rope(x, base=0), ValueError, "base must be a finite float > 0"),
    (lambda x: attnpy.rope(x, base="e"), TypeError, "base must be a float"),
    (lambda x: attnpy.rope(x, out=np.empty((2, 5, 8))), ValueError, "out must be an ndarray of"),
    (lambda x: attnpy.rope(x, out=x[:, ::-1]), ValueError, "out overlaps x"),
])
def test_rope_errors(call, exc, words):
    x = _x((2, 5, 8), np.float32)
    before = x.copy()
    with pytest.raises(exc) as e:
        call(x)
    assert words in str(e.value)
    assert np.array_equal(x, before)


def test_rope_class_carries_the_settings():
    r = attnpy.RoPE(base=100.0, interleaved=True, rotary_dim=4)
    x = _x((3, 8), np.float64)
    np.testing.assert_allclose(r(x), ref_rope(x, np.arange(3), 100.0, True, 4), atol=1e-14)
    with pytest.raises(ValueError, match="base must be"):
        attnpy.RoPE(base=-1.0)
    with pytest.raises(ValueError, match="rotary_dim must be even"):
        attnpy.RoPE(rotary_dim=5)


# ---------------------------------------------------------------------------
# rope against Hugging Face's implementations


@pytest.mark.torch
def test_rope_matches_llama_rotate_half():
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.models.llama import modeling_llama as ml
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=10000.0)
    emb = ml.LlamaRotaryEmbedding(cfg)
    q = _x((2, 4, 9, 16), np.float32, 1)
    k = _x((2, 4, 9, 16), np.float32, 2)
    pos = np.array([[0, 1, 2, 3, 4, 5, 6, 7, 8], [3, 4, 5, 6, 7, 8, 9, 10, 11]])
    cos, sin = emb(torch.from_numpy(q), torch.from_numpy(pos))
    hq, hk = ml.apply_rotary_pos_emb(torch.from_numpy(q), torch.from_numpy(k), cos, sin)
    np.testing.assert_allclose(attnpy.rope(q, pos[:, None]), hq.numpy(), atol=1e-5)
    np.testing.assert_allclose(attnpy.rope(k, pos[:, None]), hk.numpy(), atol=1e-5)


@pytest.mark.torch
def test_rope_matches_gptj_rotate_every_two():
    pytest.importorskip("transformers")
    from transformers.models.gptj import modeling_gptj as mj
    x = _x((2, 9, 3, 16), np.float32, 3)          # GPT-J rotates (N, L, H, D)
    rot = 8
    sincos = mj.create_sinusoidal_positions(64, rot)[torch.arange(9)][None].expand(2, -1, -1)
    sin, cos = torch.split(sincos, rot // 2, dim=-1)
    t = torch.from_numpy(x)
    want = torch.cat([mj.apply_rotary_pos_emb(t[..., :rot], sin, cos), t[..., rot:]], dim=-1)
    got = attnpy.rope(x.transpose(0, 2, 1, 3), interleaved=True, rotary_dim=rot)
    np.testing.assert_allclose(got.transpose(0, 2, 1, 3), want.numpy(), atol=1e-5)


@pytest.mark.torch
def test_rope_matches_gpt_neox_partial_rotary():
    pytest.importorskip("transformers")
    from transformers import GPTNeoXConfig
    from transformers.models.gpt_neox import modeling_gpt_neox as mn
    cfg = GPTNeoXConfig(hidden_size=64, num_attention_heads=2, rotary_pct=0.25)
    emb = mn.GPTNeoXRotaryEmbedding(cfg)
    q = _x((1, 2, 6, 32), np.float32, 4)
    cos, sin = emb(torch.from_numpy(q), torch.arange(6)[None])
    hq, _ = mn.apply_rotary_pos_emb(torch.from_numpy(q), torch.from_numpy(q), cos, sin)
    np.testing.assert_allclose(attnpy.rope(q, rotary_dim=8), hq.numpy(), atol=1e-5)


# ---------------------------------------------------------------------------
# sinusoidal_positions and relative_position_bucket


@pytest.mark.parametrize("d", [1, 6, 7])
def test_sinusoidal_positions_follow_the_paper(d):
    L = 11
    pe = attnpy.sinusoidal_positions(L, d, dtype=np.float64)
    assert pe.shape == (L, d) and pe.dtype == np.float64
    for p in range(L):
        for c in range(d):
            angle = p / 10000.0 ** ((c - c % 2) / d)
            want = np.sin(angle) if c % 2 == 0 else np.cos(angle)
            assert abs(pe[p, c] - want) < 1e-14
    assert attnpy.sinusoidal_positions(L, d).dtype == np.float32
    assert attnpy.sinusoidal_positions(0, d).shape == (0, d)


def test_sinusoidal_positions_errors():
    with pytest.raises(ValueError, match="d must be in"):
        attnpy.sinusoidal_positions(3, 0)
    with pytest.raises(ValueError, match="L must be in"):
        attnpy.sinusoidal_positions(-1, 4)
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        attnpy.sinusoidal_positions(3, 4, dtype=np.int64)


@pytest.mark.torch
@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (8, 20), (64, 300)])
def test_relative_position_bucket_matches_t5(bidirectional, num_buckets, max_distance):
    pytest.importorskip("transformers")
    from transformers.models.t5.modeling_t5 import T5Attention
    rel = np.arange(-2000, 2001)[None, :] + np.zeros((2, 1), np.int64)
    want = T5Attention._relative_position_bucket(torch.from_numpy(rel), bidirectional,
                                                 num_buckets, max_distance).numpy()
    got = attnpy.relative_position_bucket(rel, bidirectional=bidirectional,
                                          num_buckets=num_buckets, max_distance=max_distance)
    assert got.shape == rel.shape and got.dtype == np.int64
    assert np.array_equal(got, want)


def test_relative_position_bucket_near_and_far():
    got = attnpy.relative_position_bucket(np.array([0, 1, -1, 7, -7, 10**6, -10**6]))
    assert list(got[:5]) == [0, 17, 1, 23, 7]       # near offsets: one bucket each
    assert got[5] == 31 and got[6] == 15            # far: the last bucket of each side
    causal = attnpy.relative_position_bucket(np.array([3, 0, -3]), bidirectional=False)
    assert list(causal) == [0, 0, 3]
    with pytest.raises(TypeError, match="relative_position must be an int array"):
        attnpy.relative_position_bucket(np.array([0.5]))
    with pytest.raises(ValueError, match="num_buckets must be >= 4"):
        attnpy.relative_position_bucket(np.array([0]), num_buckets=2)


# ---------------------------------------------------------------------------
# KVCache


def test_kv_cache_append_returns_views_of_the_prefix():
    c = attnpy.KVCache(2, 3, 10, 4, value_dim=5, dtype=np.float64)
    assert len(c) == 0 and c.keys.shape == (2, 3, 10, 4) and c.values.shape == (2, 3, 10, 5)
    k1, v1 = _x((2, 3, 4, 4), np.float64, 1), _x((2, 3, 4, 5), np.float64, 2)
    keys, values = c.append(k1, v1)
    assert len(c) == 4 and keys.shape == (2, 3, 4, 4) and values.shape == (2, 3, 4, 5)
    assert np.shares_memory(keys, c.keys) and np.shares_memory(values, c.values)
    k2, v2 = _x((2, 3, 1, 4), np.float64, 3), _x((2, 3, 1, 5), np.float64, 4)
    keys, values = c.append(k2, v2)
    assert np.array_equal(keys, np.concatenate([k1, k2], axis=2))
    assert np.array_equal(values, np.concatenate([v1, v2], axis=2))
    c.reset()
    assert len(c) == 0
    assert "filled=0" in repr(c)


def test_kv_cache_refuses_and_changes_nothing():
    c = attnpy.KVCache(1, 2, 3, 4)
    c.append(np.ones((1, 2, 2, 4), np.float32), np.ones((1, 2, 2, 4), np.float32))
    before = c.keys.copy(), c.values.copy()
    cases = [
        ((np.ones((1, 2, 2, 4), np.float32),) * 2, ValueError, "2 of max_len = 3 positions"),
        ((np.ones((1, 2, 1, 4)),) * 2, TypeError, "k has dtype float64 but the cache holds"),
        ((np.ones((1, 3, 1, 4), np.float32),) * 2, ValueError, "k must have shape"),
        ((np.ones((1, 2, 1, 4), np.float32), np.ones((1, 2, 1, 3), np.float32)), ValueError,
         "v must have shape"),
        ((np.ones((1, 2, 1, 4), np.float32), np.ones((1, 2, 0, 4), np.float32)), ValueError,
         "same number of new positions"),
    ]
    for args, exc, words in cases:
        with pytest.raises(exc) as e:
            c.append(*args)
        assert words in str(e.value)
        assert len(c) == 2
        assert np.array_equal(c.keys, before[0]) and np.array_equal(c.values, before[1])
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        attnpy.KVCache(1, 1, 1, 1, dtype=np.int32)
    with pytest.raises(ValueError, match="max_len must be in"):
        attnpy.KVCache(1, 1, -1, 1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("steps", [[1] * 7, [3, 1, 1, 2], [7]])
def test_kv_cache_decoding_equals_full_causal_attention(dtype, steps):
    """Token by token (or a prompt and then tokens), bottom-right causal with
    query_offset = len(cache) - T, the outputs are the full causal call's."""
    N, H, Hkv, L, D = 2, 4, 2, sum(steps), 8
    q, k, v = _x((N, H, L, D), dtype, 1), _x((N, Hkv, L, D), dtype, 2), _x((N, Hkv, L, D), dtype, 3)
    full = attnpy.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    cache = attnpy.KVCache(N, Hkv, 16, D, dtype=dtype)
    start = 0
    for T in steps:
        keys, values = cache.append(k[:, :, start:start + T], v[:, :, start:start + T])
        step = attnpy.scaled_dot_product_attention(
            q[:, :, start:start + T], keys, values, is_causal=True,
            query_offset=len(cache) - T, enable_gqa=True)
        tol = 2e-6 if dtype == np.float32 else 1e-14
        np.testing.assert_allclose(step.output, full.output[:, :, start:start + T], atol=tol)
        np.testing.assert_allclose(step.weights, full.weights[:, :, start:start + T, :start + T],
                                   atol=tol)
        start += T

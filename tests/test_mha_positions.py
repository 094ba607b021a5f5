"""MultiheadAttention with rope= and kv_cache= (issue 15): the forward and
the trace against the layer written here in torch float64 (projections,
rotate_half, an explicit softmax), the backward against torch autograd of
it and against finite differences, decoding with the cache against the
full causal call, and the errors."""
import numpy as np
import pytest

import attnpy

from optional_torch import torch


def _layer(E=32, H=4, Hkv=2, dtype=np.float64, rope=attnpy.RoPE(), bias=True, seed=0):
    layer = attnpy.MultiheadAttention(E, H, num_kv_heads=Hkv, dtype=dtype, rope=rope, bias=bias,
                                      seed=seed)
    rng = np.random.default_rng(seed + 1)
    if bias:   # nonzero biases, so that a forgotten one shows
        for name in ("in_proj_bias", "out_proj.bias"):
            layer.state_dict()[name][...] = rng.standard_normal(layer.state_dict()[name].shape)
    return layer


def _torch_layer(layer, x, rope, causal=True):
    """The layer in torch float64, rotate_half written here; returns (out, weights, x)."""
    p = {k: torch.tensor(v, dtype=torch.float64) for k, v in layer.state_dict().items()}
    H, Hkv, D = layer.num_heads, layer.num_kv_heads, layer.head_dim
    E, kvE = layer.embed_dim, Hkv * D
    x = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    N, L, _ = x.shape
    w, b = p["in_proj_weight"], p.get("in_proj_bias")
    proj = x @ w.T + (b if b is not None else 0)
    q, k, v = proj[..., :E], proj[..., E:E + kvE], proj[..., E + kvE:]
    q = q.reshape(N, L, H, D).transpose(1, 2)
    k = k.reshape(N, L, Hkv, D).transpose(1, 2)
    v = v.reshape(N, L, Hkv, D).transpose(1, 2)
    r = D if rope.rotary_dim is None else rope.rotary_dim
    theta = rope.base ** (-torch.arange(0, r, 2, dtype=torch.float64) / r)
    angle = torch.arange(L, dtype=torch.float64)[:, None] * theta
    cos, sin = torch.cos(angle), torch.sin(angle)

    def turn(t):
        if rope.interleaved:
            a, c = t[..., 0:r:2], t[..., 1:r:2]
            rot = torch.stack([a * cos - c * sin, c * cos + a * sin], dim=-1).flatten(-2)
        else:
            a, c = t[..., :r // 2], t[..., r // 2:r]
            rot = torch.cat([a * cos - c * sin, c * cos + a * sin], dim=-1)
        return torch.cat([rot, t[..., r:]], dim=-1)

    q, k = turn(q), turn(k)
    k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
    s = q @ k.transpose(-1, -2) / D ** 0.5
    if causal:
        s = s.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    weights = torch.softmax(s, dim=-1)
    o = (weights @ v).transpose(1, 2).reshape(N, L, E)
    out = o @ p["out_proj.weight"].T + (p["out_proj.bias"] if "out_proj.bias" in p else 0)
    return out, weights, x, (q, k)


ROPES = [attnpy.RoPE(), attnpy.RoPE(base=500.0, interleaved=True), attnpy.RoPE(rotary_dim=4)]


@pytest.mark.torch
@pytest.mark.parametrize("rope", ROPES, ids=["halves", "pairs", "partial"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mha_rope_forward_and_trace(rope, dtype):
    layer = _layer(dtype=dtype, rope=rope)
    x = np.random.default_rng(2).standard_normal((2, 7, 32)).astype(dtype)
    res = layer(x, attn_mask=attnpy.causal_mask(7, dtype=dtype), trace=True)
    out, weights, _, (q, k) = _torch_layer(layer, x.astype(np.float64), rope)
    tol = 2e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(res.output, out.detach().numpy(), atol=tol)
    np.testing.assert_allclose(res.weights, weights.detach().numpy(), atol=tol)
    np.testing.assert_allclose(res.trace.q_rotated, q.detach().numpy(), atol=tol)
    np.testing.assert_allclose(res.trace.k_rotated, k.detach().numpy()[:, ::2], atol=tol)
    assert res.trace.q_rotated.shape == (2, 4, 7, 8) and res.trace.k_rotated.shape == (2, 2, 7, 8)
    plain = attnpy.MultiheadAttention(32, 4, num_kv_heads=2, dtype=dtype)(x, trace=True)
    assert plain.trace.q_rotated is None and plain.trace.k_rotated is None


@pytest.mark.torch
@pytest.mark.parametrize("rope", ROPES, ids=["halves", "pairs", "partial"])
def test_mha_rope_backward_matches_torch_autograd(rope):
    layer = _layer(rope=rope)
    x = np.random.default_rng(3).standard_normal((2, 6, 32))
    dout = np.random.default_rng(4).standard_normal((2, 6, 32))
    res = layer(x, attn_mask=attnpy.causal_mask(6, dtype=np.float64), trace=True)
    g = layer.backward(res, dout)
    out, _, xt, _ = _torch_layer(layer, x, rope)
    out.backward(torch.tensor(dout))
    # self-attention: the input's gradient is the sum of the three
    np.testing.assert_allclose(g.query + g.key + g.value, xt.grad.numpy(), atol=1e-10)
    # each parameter by finite differences on a few entries (float64)
    loss = lambda: float(np.sum(layer(x, attn_mask=attnpy.causal_mask(6, dtype=np.float64))
                                .output * dout))
    for name in ("in_proj_weight", "in_proj_bias", "out_proj.weight"):
        w = layer.state_dict()[name]
        flat = w.reshape(-1)
        for idx in (0, flat.size // 3, flat.size - 1):
            old = flat[idx]
            flat[idx] = old + 1e-6
            up = loss()
            flat[idx] = old - 1e-6
            down = loss()
            flat[idx] = old
            fd = (up - down) / 2e-6
            assert abs(g.params[name].reshape(-1)[idx] - fd) < 1e-6 * max(1, abs(fd)), name


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("steps", [[1] * 6, [4, 1, 1], [2, 3, 1]])
@pytest.mark.parametrize("rope", [None, attnpy.RoPE()], ids=["no_rope", "rope"])
def test_mha_kv_cache_decoding_equals_the_full_causal_call(dtype, steps, rope):
    layer = _layer(dtype=dtype, rope=rope)
    L = sum(steps)
    x = np.random.default_rng(5).standard_normal((2, L, 32)).astype(dtype)
    full = layer(x, attn_mask=attnpy.causal_mask(L, dtype=dtype))
    cache = attnpy.KVCache(2, 2, 8, 8, dtype=dtype)
    start = 0
    tol = 2e-5 if dtype == np.float32 else 1e-13
    for T in steps:
        res = layer(x[:, start:start + T], kv_cache=cache, trace=True)
        assert len(cache) == start + T
        assert res.weights.shape == (2, 4, T, start + T)
        np.testing.assert_allclose(res.output, full.output[:, start:start + T], atol=tol)
        np.testing.assert_allclose(res.weights, full.weights[:, :, start:start + T, :start + T],
                                   atol=tol)
        assert res.trace.k.shape == (2, 2, T, 8)
        start += T
    with pytest.raises(NotImplementedError, match="kv_cache"):
        layer.backward(res, np.ones_like(res.output))


def test_mha_kv_cache_unbatched_and_not_batch_first():
    layer = _layer()
    x = np.random.default_rng(6).standard_normal((5, 32))
    full = layer(x, attn_mask=attnpy.causal_mask(5, dtype=np.float64)).output
    cache = attnpy.KVCache(1, 2, 5, 8, dtype=np.float64)
    parts = [layer(x[i:i + 1], kv_cache=cache).output for i in range(5)]
    np.testing.assert_allclose(np.concatenate(parts), full, atol=1e-13)
    seq_first = _layer(seed=0)
    seq_first.batch_first = False
    cache.reset()
    out = seq_first(x[:, None], kv_cache=cache).output
    np.testing.assert_allclose(out[:, 0], full, atol=1e-13)


@pytest.mark.parametrize("call, exc, words", [
    (lambda m, x, c: m(x, kv_cache="cache"), TypeError, "kv_cache must be None or an attnpy.KVCache"),
    (lambda m, x, c: m(x, x.copy(), kv_cache=c), ValueError, "pass the new tokens as query alone"),
    (lambda m, x, c: m(x, attn_mask=np.zeros((2, 2)), kv_cache=c), ValueError,
     "attn_mask cannot go with kv_cache"),
    (lambda m, x, c: m(x, key_padding_mask=np.zeros((1, 2), bool), kv_cache=c), ValueError,
     "key_padding_mask cannot go with kv_cache"),
    (lambda m, x, c: m(x, kv_cache=attnpy.KVCache(1, 4, 9, 8, dtype=np.float64)), ValueError,
     "num_kv_heads = 2"),
    (lambda m, x, c: m(x, kv_cache=attnpy.KVCache(1, 2, 9, 8)), TypeError,
     "kv_cache holds float32"),
    (lambda m, x, c: m(x, kv_cache=attnpy.KVCache(3, 2, 9, 8, dtype=np.float64)), ValueError,
     "kv_cache holds a batch of 3"),
    (lambda m, x, c: [m(x, kv_cache=c) for _ in range(3)], ValueError, "do not fit"),
])
def test_mha_kv_cache_errors(call, exc, words):
    layer = _layer()
    x = np.random.default_rng(7).standard_normal((1, 2, 32))
    cache = attnpy.KVCache(1, 2, 5, 8, dtype=np.float64)
    with pytest.raises(exc) as e:
        call(layer, x, cache)
    assert words in str(e.value)
    assert len(cache) in (0, 4)     # the overflowing call appended nothing


def test_mha_rope_errors():
    with pytest.raises(TypeError, match="rope must be None or an attnpy.RoPE"):
        attnpy.MultiheadAttention(32, 4, rope=True)
    with pytest.raises(ValueError, match=r"rotary_dim \(16\) must be at most the head width"):
        attnpy.MultiheadAttention(32, 4, rope=attnpy.RoPE(rotary_dim=16))
    with pytest.raises(ValueError, match="appended keys have no position"):
        attnpy.MultiheadAttention(32, 4, add_bias_kv=True, rope=attnpy.RoPE())

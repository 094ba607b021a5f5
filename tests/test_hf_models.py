"""The attention of real model families, built offline from small seeded
Hugging Face configs (eager attention, random weights), reproduced with
attnpy's positions (issue 15): Llama and Qwen2 (RoPE + GQA), GPT-NeoX
(partial rotary), Mistral (sliding window), BLOOM (ALiBi), T5 (relative
position bias + padding, scale 1.0) and GPT-2 (decoding with a KV cache).

Each test takes the hidden states that enter the first layer's attention (a
forward hook) and the weights and output Hugging Face computes from them,
and computes the same with attnpy from the module's parameters. Float32 is
compared with the model itself (1e-5). In float64, Llama, Mistral, BLOOM and
T5 still take their rotary tables or their softmax in float32, so float64 is
compared with a torch float64 reconstruction made of the model's own pieces
(its projections, apply_rotary_pos_emb, repeat_kv, its bucket function) and
a float64 softmax (1e-10); GPT-2 runs wholly in float64 and is compared with
itself.
"""
import numpy as np
import pytest

import attnpy

from optional_torch import torch

pytestmark = pytest.mark.torch
transformers = pytest.importorskip("transformers")

TOL = {np.float32: 1e-5, np.float64: 1e-10}
N, L, VOCAB = 2, 12, 97


def _build(config_cls, model_cls, dtype, **cfg):
    torch.manual_seed(0)
    config = config_cls(vocab_size=VOCAB, num_hidden_layers=1, **cfg)
    config._attn_implementation = "eager"
    model = model_cls(config).eval()
    return model.to(torch.float64 if dtype == np.float64 else torch.float32), config


def _run(model, module, **inputs):
    """(hidden states into module, HF's attention weights, module's output[0])."""
    seen = {}

    def hook(mod, args, kwargs, output):
        seen["h"] = kwargs.get("hidden_states", args[0] if args else None).detach()
        seen["out"] = output[0].detach()
        seen["kwargs"] = kwargs

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            res = model(**inputs, output_attentions=True)
    finally:
        handle.remove()
    return seen, res


def _ids(seed=1):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, VOCAB, (N, L)))


def _np(t):
    return t.detach().numpy()


def _heads(x, H):
    """(N, L, H*D) -> (N, H, L, D)."""
    n, l, hd = x.shape
    return x.reshape(n, l, H, hd // H).transpose(0, 2, 1, 3)


def _merge(x):
    n, h, l, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(n, l, h * d)


def _lin(x, layer):
    """A torch Linear applied in NumPy float64 terms (x @ W.T + b), x's dtype."""
    w = _np(layer.weight)
    y = x @ w.T
    return y + _np(layer.bias) if layer.bias is not None else y


def _torch_attention(q, k, v, mask, scale):
    """float64 torch attention with an explicit float64 softmax: the reconstruction."""
    s = q @ k.transpose(-1, -2) * scale + mask
    w = torch.softmax(s, dim=-1)
    return w @ v, w


# ---------------------------------------------------------------------------
# Llama, Qwen2: RoPE + GQA, through attnpy.MultiheadAttention(rope=...)


LLAMA_LIKE = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", False),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", True),
}


def _llama_cfg():
    return dict(hidden_size=64, intermediate_size=64, num_attention_heads=4,
                num_key_value_heads=2, rope_theta=5000.0, max_position_embeddings=64)


def _as_layer(at, H, Hkv, base, dtype, bias):
    E = at.q_proj.weight.shape[1]
    layer = attnpy.MultiheadAttention(E, H, num_kv_heads=Hkv, bias=bias, dtype=dtype,
                                      rope=attnpy.RoPE(base=base))
    state = {"in_proj_weight": np.concatenate([_np(at.q_proj.weight), _np(at.k_proj.weight),
                                               _np(at.v_proj.weight)]),
             "out_proj.weight": _np(at.o_proj.weight)}
    if bias:
        state["in_proj_bias"] = np.concatenate([_np(at.q_proj.bias), _np(at.k_proj.bias),
                                                _np(at.v_proj.bias)])
        state["out_proj.bias"] = np.zeros(E)
    layer.load_state_dict(state)
    return layer


@pytest.mark.parametrize("family", sorted(LLAMA_LIKE))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_llama_like_rope_gqa(family, dtype):
    cfg_name, model_name, bias = LLAMA_LIKE[family]
    model, config = _build(getattr(transformers, cfg_name), getattr(transformers, model_name),
                           dtype, **_llama_cfg())
    at = model.model.layers[0].self_attn
    seen, res = _run(model, at, input_ids=_ids())
    h = _np(seen["h"]).astype(dtype)
    layer = _as_layer(at, 4, 2, 5000.0, dtype, bias)
    ours = layer(h, attn_mask=attnpy.causal_mask(L, dtype=dtype), trace=True)
    if dtype == np.float32:
        np.testing.assert_allclose(ours.weights, _np(res.attentions[0]), atol=TOL[dtype])
        np.testing.assert_allclose(ours.output, _np(seen["out"]), atol=TOL[dtype])
        return
    # float64: the model's own rotation, with float64 angles and softmax
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv
    D = 16
    theta = 5000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    angle = torch.arange(L, dtype=torch.float64)[:, None] * theta
    emb = torch.cat([angle, angle], dim=-1)[None]
    hs = seen["h"]
    q = at.q_proj(hs).view(N, L, 4, D).transpose(1, 2)
    k = at.k_proj(hs).view(N, L, 2, D).transpose(1, 2)
    v = at.v_proj(hs).view(N, L, 2, D).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, emb.cos(), emb.sin())
    causal = torch.full((L, L), float("-inf"), dtype=torch.float64).triu(1)
    o, w = _torch_attention(q, repeat_kv(k, 2), repeat_kv(v, 2), causal, D ** -0.5)
    out = at.o_proj(o.transpose(1, 2).reshape(N, L, 64))
    np.testing.assert_allclose(ours.weights, _np(w), atol=TOL[dtype])
    np.testing.assert_allclose(ours.trace.q_rotated, _np(q), atol=TOL[dtype])
    np.testing.assert_allclose(ours.output, _np(out), atol=TOL[dtype])


def test_llama_decoding_with_the_layer_cache():
    """Llama's layer decoding token by token with attnpy's cache gives the
    model's full-sequence attention output (float32)."""
    model, _ = _build(transformers.LlamaConfig, transformers.LlamaForCausalLM, np.float32,
                      **_llama_cfg())
    at = model.model.layers[0].self_attn
    seen, _ = _run(model, at, input_ids=_ids())
    layer = _as_layer(at, 4, 2, 5000.0, np.float32, False)
    cache = attnpy.KVCache(N, 2, L, 16)
    h = _np(seen["h"])
    steps = [layer(h[:, :5], kv_cache=cache).output]
    steps += [layer(h[:, t:t + 1], kv_cache=cache).output for t in range(5, L)]
    np.testing.assert_allclose(np.concatenate(steps, axis=1), _np(seen["out"]), atol=1e-5)


# ---------------------------------------------------------------------------
# GPT-NeoX: partial rotary, a fused (N, L, H, 3 D) projection


@pytest.mark.parametrize("dtype", [np.float32])
def test_gpt_neox_partial_rotary(dtype):
    model, config = _build(transformers.GPTNeoXConfig, transformers.GPTNeoXForCausalLM, dtype,
                           hidden_size=64, intermediate_size=64, num_attention_heads=4,
                           rotary_pct=0.25, rotary_emb_base=10000)
    at = model.gpt_neox.layers[0].attention
    seen, res = _run(model, at, input_ids=_ids())
    H, D = 4, 16
    # the fused weight's rows are (head, q/k/v, D)
    w = _np(at.query_key_value.weight).reshape(H, 3, D, 64)
    b = _np(at.query_key_value.bias).reshape(H, 3, D)
    layer = attnpy.MultiheadAttention(64, H, dtype=dtype, rope=attnpy.RoPE(rotary_dim=4))
    layer.load_state_dict({
        "in_proj_weight": np.concatenate([w[:, i].reshape(64, 64) for i in range(3)]),
        "in_proj_bias": np.concatenate([b[:, i].reshape(64) for i in range(3)]),
        "out_proj.weight": _np(at.dense.weight), "out_proj.bias": _np(at.dense.bias)})
    ours = layer(_np(seen["h"]), attn_mask=attnpy.causal_mask(L, dtype=dtype))
    np.testing.assert_allclose(ours.weights, _np(res.attentions[0]), atol=TOL[dtype])
    np.testing.assert_allclose(ours.output, _np(seen["out"]), atol=TOL[dtype])


# ---------------------------------------------------------------------------
# Mistral: sliding window, as window=(w - 1, 0) with is_causal


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mistral_sliding_window(dtype):
    w = 4
    model, config = _build(transformers.MistralConfig, transformers.MistralForCausalLM, dtype,
                           sliding_window=w, **_llama_cfg())
    at = model.model.layers[0].self_attn
    seen, res = _run(model, at, input_ids=_ids())
    h = _np(seen["h"])
    q = attnpy.rope(_heads(_lin(h, at.q_proj), 4), base=5000.0)
    k = attnpy.rope(_heads(_lin(h, at.k_proj), 2), base=5000.0)
    v = _heads(_lin(h, at.v_proj), 2)
    ours = attnpy.scaled_dot_product_attention(q, k, v, is_causal=True, window=(w - 1, 0),
                                               enable_gqa=True)
    out = _lin(_merge(ours.output), at.o_proj)
    if dtype == np.float32:
        hf_w = _np(res.attentions[0])
        hidden = np.tril(np.ones((L, L), bool), -w)          # keys w or more behind
        assert np.all(hf_w[..., hidden] == 0) and np.all(ours.weights[..., hidden] == 0)
        np.testing.assert_allclose(ours.weights, hf_w, atol=TOL[dtype])
        np.testing.assert_allclose(out, _np(seen["out"]), atol=TOL[dtype])
        return
    i, j = np.arange(L)[:, None], np.arange(L)[None]
    mask = torch.from_numpy(np.where((j <= i) & (j > i - w), 0.0, -np.inf))
    o, wt = _torch_attention(torch.from_numpy(q), torch.from_numpy(k).repeat_interleave(2, 1),
                             torch.from_numpy(v).repeat_interleave(2, 1), mask, 16 ** -0.5)
    np.testing.assert_allclose(ours.weights, _np(wt), atol=TOL[dtype])
    np.testing.assert_allclose(ours.output, _np(o), atol=TOL[dtype])
    # and the rotation itself against the model's own float32 tables
    hf_q = at.q_proj(seen["h"]).view(N, L, 4, 16).transpose(1, 2)
    cos, sin = model.model.rotary_emb(hf_q, torch.arange(L)[None])
    from transformers.models.mistral.modeling_mistral import apply_rotary_pos_emb
    rq, _ = apply_rotary_pos_emb(hf_q, hf_q, cos, sin)
    np.testing.assert_allclose(q, _np(rq), atol=1e-6)      # float32 angles


# ---------------------------------------------------------------------------
# BLOOM: ALiBi


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bloom_alibi(dtype):
    H = 4
    model, config = _build(transformers.BloomConfig, transformers.BloomForCausalLM, dtype,
                           hidden_size=64, n_head=H)
    at = model.transformer.h[0].self_attention
    mask = torch.ones(N, L, dtype=torch.long)
    mask[1, :3] = 0                                       # left padding, as BLOOM generates
    seen, res = _run(model, at, input_ids=_ids(), attention_mask=mask)
    h = _np(seen["h"])
    fused = _lin(h, at.query_key_value).reshape(N, L, H, 3, 16)
    q, k, v = (fused[..., i, :].transpose(0, 2, 1, 3) for i in range(3))
    keep = _np(mask).astype(bool)[:, None, None, :]       # (N, 1, 1, S), True = attend
    # BLOOM's causal mask is part of its attention_mask: with an explicit
    # attn_mask, is_causal goes into the same bool mask here
    causal = np.tril(np.ones((L, L), bool))
    ours = attnpy.scaled_dot_product_attention(q, k, v, attn_mask=keep & causal,
                                               alibi_slopes=attnpy.alibi_slopes(H))
    real = _np(mask).astype(bool)[:, None, :, None]       # rows of real tokens
    if dtype == np.float32:
        # BLOOM adds slope * (j - first real key): the same softmax as
        # -slope * |i - j| under the causal mask, row by row
        np.testing.assert_allclose(np.where(real, ours.weights, 0),
                                   np.where(real, _np(res.attentions[0]), 0), atol=TOL[dtype])
        return
    slopes = torch.from_numpy(attnpy.alibi_slopes(H))[:, None, None]
    i, j = torch.arange(L)[:, None], torch.arange(L)[None]
    m = torch.where(torch.from_numpy(keep & causal), 0.0, float("-inf")).double()
    o, wt = _torch_attention(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v),
                             m - slopes * (i - j).abs(), 16 ** -0.5)
    np.testing.assert_allclose(np.where(real, ours.weights, 0), np.where(real, _np(wt), 0),
                               atol=TOL[dtype])


# ---------------------------------------------------------------------------
# T5: relative position bias (buckets) + padding, scale = 1.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_t5_relative_bias_with_padding(dtype):
    H = 4
    model, config = _build(transformers.T5Config, transformers.T5EncoderModel, dtype,
                           d_model=64, d_kv=16, d_ff=64, num_heads=H, num_layers=1,
                           relative_attention_num_buckets=32, relative_attention_max_distance=20)
    at = model.encoder.block[0].layer[0].SelfAttention
    mask = torch.ones(N, L, dtype=torch.long)
    mask[1, -4:] = 0                                       # right padding
    seen, res = _run(model, at, input_ids=_ids(), attention_mask=mask)
    h = _np(seen["h"])
    q, k, v = (_heads(_lin(h, m), H) for m in (at.q, at.k, at.v))
    rel = np.arange(L)[None, :] - np.arange(L)[:, None]     # key - query
    bucket = attnpy.relative_position_bucket(rel, bidirectional=True, num_buckets=32,
                                             max_distance=20)
    bias = _np(at.relative_attention_bias.weight)[bucket].transpose(2, 0, 1)[None]  # (1, H, L, S)
    keep = _np(mask).astype(bool)[:, None, None, :]
    ours = attnpy.scaled_dot_product_attention(q, k, v, attn_mask=keep,
                                               attn_bias=bias.astype(dtype), scale=1.0)
    out = _merge(ours.output) @ _np(at.o.weight).T
    if dtype == np.float32:
        np.testing.assert_allclose(ours.weights, _np(res.attentions[0]), atol=TOL[dtype])
        np.testing.assert_allclose(out, _np(seen["out"]), atol=TOL[dtype])
        return
    # float64: T5's own bias (its bucket function and table), float64 softmax
    hf_bias = at.compute_bias(L, L)
    m = torch.where(torch.from_numpy(keep), 0.0, float("-inf")).double()
    o, wt = _torch_attention(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v),
                             hf_bias + m, 1.0)
    np.testing.assert_allclose(ours.weights, _np(wt), atol=TOL[dtype])
    np.testing.assert_allclose(ours.output, _np(o), atol=TOL[dtype])


# ---------------------------------------------------------------------------
# GPT-2: decoding token by token, HF's cache against attnpy's


def _gpt2_layer(at, dtype):
    layer = attnpy.MultiheadAttention(64, 4, dtype=dtype)
    layer.load_state_dict({   # Conv1D stores (in, out): the transpose of a Linear
        "in_proj_weight": _np(at.c_attn.weight).T, "in_proj_bias": _np(at.c_attn.bias),
        "out_proj.weight": _np(at.c_proj.weight).T, "out_proj.bias": _np(at.c_proj.bias)})
    return layer


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gpt2_decoding_with_a_cache(dtype):
    model, config = _build(transformers.GPT2Config, transformers.GPT2LMHeadModel, dtype,
                           n_embd=64, n_head=4, n_positions=64)
    at = model.transformer.h[0].attn
    layer = _gpt2_layer(at, dtype)
    ids = _ids()
    cache = attnpy.KVCache(N, 4, L, 16, dtype=dtype)
    past, start = None, 0
    for T in [4] + [1] * (L - 4):
        seen, res = _run(model, at, input_ids=ids[:, start:start + T], cache=past,
                         use_cache=True)
        past = res.past_key_values
        ours = layer(_np(seen["h"]), kv_cache=cache)
        np.testing.assert_allclose(ours.output, _np(seen["out"]), atol=TOL[dtype])
        np.testing.assert_allclose(ours.weights, _np(res.attentions[0]), atol=TOL[dtype])
        assert ours.weights.shape == (N, 4, T, start + T)
        start += T
    # HF's cached keys are attnpy's
    hf_keys = past.layers[0].keys if hasattr(past, "layers") else past[0][0]
    np.testing.assert_allclose(cache.keys[:, :, :L], _np(hf_keys), atol=TOL[dtype])

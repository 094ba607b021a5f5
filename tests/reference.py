"""The float64 NumPy reference for attention: the one every test and the fuzzer
(fuzz/fuzz_binding.py) compare attnpy with. Written from the math, never
calling attnpy:

    scores  = scale * q @ k^T + M          (M: 0 / -inf or an added float mask)
    weights = softmax(scores, axis=-1)     (a row of only -inf gives zeros)
    out     = weights @ v

and, for values that are not finite, the rules attnpy promises:
- a pair the mask sets to -inf (bool mask hiding it, causal, a float -inf) is
  never attended, whatever q . k is (NaN and inf included);
- with E = 0 every q . k is an empty sum, 0, whatever the scale (as torch);
- a key whose weight is exactly 0 is not read: NaN or inf in its value row
  does not reach the output (nor the gradients);
- a fully masked row has zero weights, zero output and passes no gradient;
- otherwise IEEE arithmetic: a NaN score makes its row NaN, and so does a
  +inf one (inf - inf).

Leading dims broadcast like np.matmul; with enable_gqa, query head h reads
key/value head h // (Hq // H) (a 2-D key or value is one head shared by all).
Everything is computed in float64 on copies of the inputs, whatever their
dtype or strides.

What is here:
- sdpa_forward / sdpa_reference: scaled dot-product attention, forward;
- sdpa_backward_reference: its gradients, summed back to the inputs' shapes;
- mha_reference / mha_backward_reference: every stage of a multi-head layer
  (torch.nn.MultiheadAttention's, plus grouped-query heads) and its gradients;
  mha_to_batch_first / mha_from_batch_first convert between its layouts;
- self_attention_reference: the textbook single-head self-attention;
- the pieces: additive_mask, softmax_rows, weighted_sum, expand_kv_heads.

Bool masks: for SDPA True attends (torch's SDPA), for the multi-head layer
True hides (torch's MultiheadAttention); additive_mask takes either polarity.
"""
import numpy as np

__all__ = ["additive_mask", "softmax_rows", "weighted_sum", "expand_kv_heads",
           "sdpa_forward", "sdpa_reference", "sdpa_backward_reference",
           "mha_to_batch_first", "mha_from_batch_first", "mha_reference",
           "mha_backward_reference", "self_attention_reference", "position_mask"]


def additive_mask(attn_mask, is_causal, L, S, true_attends=True):
    """The mask as a float64 array to add to the scores (None if no mask).

    bool: a pair is attended where the mask equals true_attends (-> 0), hidden
    elsewhere (-> -inf). float: taken as is. is_causal: top-left aligned
    tril(ones(L, S)) -> 0 on and below the diagonal, -inf above it.
    """
    if is_causal:
        allowed = np.tril(np.ones((L, S), dtype=bool))
        return np.where(allowed, 0.0, -np.inf)
    if attn_mask is None:
        return None
    m = np.asarray(attn_mask)
    if m.dtype == np.bool_:
        return np.where(m == true_attends, 0.0, -np.inf)
    return m.astype(np.float64)


def position_mask(L, S, *, is_causal=False, query_offset=0, window=None,
                  alibi_slopes=None):
    """What positions add to the scores, float64: (L, S), or (..., Hq, L, S)
    with ALiBi's slopes (..., Hq). Query i sits at position query_offset + i,
    key j at j; causal hides j > position, window (left, right) hides keys
    outside position - left .. position + right (-inf), and ALiBi adds
    -slope * |position - j|."""
    pos = query_offset + np.arange(L)[:, None]
    j = np.arange(S)[None, :]
    hidden = np.zeros((L, S), dtype=bool)
    if is_causal:
        hidden |= j > pos
    if window is not None:
        hidden |= (j < pos - window[0]) | (j > pos + window[1])
    mask = np.where(hidden, -np.inf, 0.0)
    if alibi_slopes is not None:
        slopes = np.asarray(alibi_slopes, dtype=np.float64)[..., None, None]
        mask = mask - slopes * np.abs(pos - j)
    return mask


def masked_scores(scores, mask):
    """scores + mask, where a -inf of the mask hides the pair whatever its score."""
    if mask is None:
        return scores
    with np.errstate(invalid="ignore", over="ignore"):
        return np.where(mask == -np.inf, -np.inf, scores + mask)


def softmax_rows(scores):
    """softmax along the last axis, float64; rows that are all -inf -> 0."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape[-1] == 0:
        return scores.copy()
    with np.errstate(invalid="ignore"):
        row_max = scores.max(axis=-1, keepdims=True)   # NaN when the row holds one
        dead = np.isneginf(row_max)
        shifted = scores - np.where(dead, 0.0, row_max)
        e = np.exp(shifted)  # exp(-inf) = 0; a +inf score gives inf - inf = NaN
        total = e.sum(axis=-1, keepdims=True)
        return np.where(dead, 0.0, e / np.where(dead, 1.0, total))


def weighted_sum(weights, v):
    """weights @ v, where a weight of exactly 0 does not read its value row."""
    if np.isfinite(v).all():
        return np.einsum("...ls,...sc->...lc", weights, v)
    with np.errstate(invalid="ignore", over="ignore"):
        terms = np.where(weights[..., None] == 0, 0.0, weights[..., None] * v[..., None, :, :])
    return terms.sum(axis=-2)


def expand_kv_heads(x, Hq):
    """GQA by index mapping: head h of the result is head h // (Hq // H) of x
    (a 2-D x is one head)."""
    x = x if x.ndim >= 3 else x[None]
    H = x.shape[-3]
    if H == 0 and Hq == 0:
        return x
    if H == 0 or Hq % H != 0:
        raise ValueError(f"Hq={Hq} is not a multiple of H={H}")
    group = Hq // H
    index = np.arange(Hq) // group if group else np.arange(0)
    return np.take(x, index, axis=-3)


def _default_scale(scale, E):
    if scale is None:
        return 1.0 / np.sqrt(E) if E else 1.0
    return float(scale)


def sdpa_forward(query, key, value, attn_mask=None, is_causal=False, scale=None,
                 enable_gqa=False):
    """Every stage in float64, broadcast to the full batch shape (...):
    q (..., L, E), k (..., S, E), v (..., S, Ev) (key/value heads expanded for
    GQA), scores (scale * q k^T), logits (scores with the mask), weights, out.
    Raises ValueError for shapes that do not fit together."""
    q = np.array(query, dtype=np.float64)  # copies: the inputs are never touched
    k = np.array(key, dtype=np.float64)
    v = np.array(value, dtype=np.float64)
    if q.ndim < 2 or k.ndim < 2 or v.ndim < 2:
        raise ValueError("query, key and value must be at least 2-D")
    L, E = q.shape[-2:]
    S = k.shape[-2]
    if k.shape[-1] != E or v.shape[-2] != S:
        raise ValueError("inconsistent E or S")
    scale = _default_scale(scale, E)

    if enable_gqa and q.ndim >= 3:
        Hq = q.shape[-3]
        k, v = expand_kv_heads(k, Hq), expand_kv_heads(v, Hq)

    batch = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    q = np.broadcast_to(q, batch + (L, E))
    k = np.broadcast_to(k, batch + (S, E))
    v = np.broadcast_to(v, batch + (S, v.shape[-1]))

    with np.errstate(invalid="ignore", over="ignore"):
        if E == 0:   # an empty sum: 0 whatever the scale (inf and NaN included)
            scores = np.zeros(batch + (L, S))
        else:
            scores = scale * np.einsum("...le,...se->...ls", q, k)
        m = additive_mask(attn_mask, is_causal, L, S)
        if m is not None and np.broadcast_shapes(scores.shape, m.shape) != scores.shape:
            raise ValueError(f"mask {m.shape} does not broadcast to {scores.shape}")
        logits = masked_scores(scores, m)
        weights = softmax_rows(logits)
        out = weighted_sum(weights, v)
    return dict(q=q, k=k, v=v, scale=scale, scores=scores, logits=logits, weights=weights,
                out=out)


def sdpa_reference(query, key, value, attn_mask=None, is_causal=False, scale=None,
                   enable_gqa=False, with_values=False):
    """Return (out, weights) in float64 for torch-SDPA semantics.

    out: (..., Hq, L, Ev), weights: (..., Hq, L, S). with_values=True also
    returns the value rows each problem reads, broadcast to (..., Hq, S, Ev).
    """
    f = sdpa_forward(query, key, value, attn_mask, is_causal, scale, enable_gqa)
    return (f["out"], f["weights"], f["v"]) if with_values else (f["out"], f["weights"])


def _sum_to_shape(g, shape):
    """Sum a gradient over the dims broadcasting added to reach `shape`."""
    while g.ndim > len(shape):
        g = g.sum(0)
    for ax, n in enumerate(shape):
        if n == 1 and g.shape[ax] != 1:
            g = g.sum(ax, keepdims=True)
    return g


def _fold_heads(g, Hk):
    """The gradient of GQA-expanded key/value heads (axis -3) back to Hk heads:
    the query heads of each key/value head summed."""
    return g.reshape(g.shape[:-3] + (Hk, g.shape[-3] // Hk) + g.shape[-2:]).sum(-3)


def _grad_to_input(g, shape, Hq=None):
    """A gradient of the broadcast (and, given Hq, GQA-expanded) problems
    summed back to an input's shape."""
    if Hq is None:
        return _sum_to_shape(g, shape).reshape(shape)
    Hk = shape[-3] if len(shape) >= 3 else 1
    expanded = tuple(shape[:-3]) + (Hq,) + tuple(shape[-2:])
    return _fold_heads(_sum_to_shape(g, expanded), Hk).reshape(shape)


def sdpa_backward_reference(grad_output, query, key, value, attn_mask=None, is_causal=False,
                            scale=None, enable_gqa=False, with_intermediates=False):
    """dq, dk, dv in float64, summed back to the inputs' shapes (and, with
    with_intermediates, the gradients of the weights dP and of the logits dS).
    Keys of zero weight pass and receive nothing."""
    qs, ks, vs = (np.shape(a) for a in (query, key, value))
    gqa = enable_gqa and len(qs) >= 3
    if gqa and qs[-3] == 0:   # no query heads: nothing flows back
        zeros = (np.zeros(qs), np.zeros(ks), np.zeros(vs))
        return zeros + (None, None) if with_intermediates else zeros
    f = sdpa_forward(query, key, value, attn_mask, is_causal, scale, enable_gqa)
    qb, kb, vb, P = f["q"], f["k"], f["v"], f["weights"]
    E = qs[-1]
    scale = f["scale"] if E else 0.0   # E = 0: the scores do not depend on q, k
    dout = np.broadcast_to(np.asarray(grad_output, dtype=np.float64), f["out"].shape)
    live = P != 0
    with np.errstate(invalid="ignore", over="ignore"):
        dP = np.einsum("...lc,...sc->...ls", dout, vb)
        D = np.where(live, P * dP, 0.0).sum(-1, keepdims=True)
        dS = np.where(live, P * (dP - D), 0.0)
        dV = np.where(live[..., None], P[..., None] * dout[..., :, None, :], 0.0).sum(-3)
        dQ = np.where(live[..., None], scale * dS[..., None] * kb[..., None, :, :], 0.0).sum(-2)
        dK = np.where(live[..., None], scale * dS[..., None] * qb[..., :, None, :], 0.0).sum(-3)
    Hq = qs[-3] if gqa else None
    grads = (_grad_to_input(dQ, qs), _grad_to_input(dK, ks, Hq), _grad_to_input(dV, vs, Hq))
    return grads + (dP, dS) if with_intermediates else grads


# ---------------------------------------------------------------------------
# the multi-head layer (torch.nn.MultiheadAttention's stages, grouped heads too)


def mha_to_batch_first(layer, x):
    """An input of the layer as float64 (N, L, E): unbatched (L, E) gets
    N = 1, sequence-first (L, N, E) is transposed unless layer.batch_first."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 2:
        return x[None]
    return x if layer.batch_first else x.swapaxes(0, 1)


def mha_from_batch_first(layer, a, unbatched):
    """The inverse of mha_to_batch_first for an output (N, L, ...)."""
    if unbatched:
        return a[0]
    return a if layer.batch_first else a.swapaxes(0, 1)


def _mha_projections(layer, p):
    H, Hkv, E = layer.num_heads, layer.num_kv_heads, layer.embed_dim
    kvE = Hkv * (E // H)
    if "in_proj_weight" in p:
        w = p["in_proj_weight"]
        wq, wk, wv = w[:E], w[E:E + kvE], w[E + kvE:]
    else:
        wq, wk, wv = p["q_proj_weight"], p["k_proj_weight"], p["v_proj_weight"]
    b = p.get("in_proj_bias", np.zeros(E + 2 * kvE))
    return (wq, wk, wv), (b[:E], b[E:E + kvE], b[E + kvE:])


def _mha_mask(m, N, H, L, S, true_attends):
    """attn_mask (L, S), (N * H, L, S) or (N, H, L, S), key_padding_mask (N, S)
    or (S,): additive, broadcast to (N, H, L, S)."""
    m = np.asarray(m)
    if m.ndim == 3:
        m = m.reshape(N, H, L, S)
    add = additive_mask(m, False, L, S, true_attends)
    return np.broadcast_to(add, (N, H, L, S))


def mha_reference(layer, query, key, value, key_padding_mask=None, attn_mask=None,
                  mask_true_attends=False):
    """Every stage of the layer in float64 (eval mode: no dropout), from
    batch-first (N, L, E) inputs (see mha_to_batch_first).

    Masks take the layer's shapes: attn_mask (L, S), (N * H, L, S) or
    (N, H, L, S), key_padding_mask (N, S) (or anything that reshapes to
    (N, 1, 1, S)); bool True hides a key unless mask_true_attends. The extra
    keys (bias_k, add_zero_attn's zero key) are never masked. Returns a dict:
    the trace's stages q, k, v (per head, before GQA expansion), scores
    (q k^T, unscaled), logits, weights, head_outputs, concat, output, and what
    the backward needs."""
    p = {n: np.asarray(a, dtype=np.float64) for n, a in layer.state_dict().items()}
    H, Hkv, E = layer.num_heads, layer.num_kv_heads, layer.embed_dim
    D = E // H
    kvE = Hkv * D
    (wq, wk, wv), (bq, bk, bv) = _mha_projections(layer, p)
    x, y, z = (np.asarray(a, dtype=np.float64) for a in (query, key, value))
    N, L, S = x.shape[0], x.shape[1], y.shape[1]
    with np.errstate(invalid="ignore", over="ignore"):
        q, k, v = x @ wq.T + bq, y @ wk.T + bk, z @ wv.T + bv
    extra = []
    if "bias_k" in p:
        extra.append((p["bias_k"].reshape(1, 1, kvE), p["bias_v"].reshape(1, 1, kvE)))
    if layer.add_zero_attn:
        extra.append((np.zeros((1, 1, kvE)), np.zeros((1, 1, kvE))))
    for ek, ev in extra:
        k = np.concatenate([k, np.broadcast_to(ek, (N, 1, kvE))], axis=1)
        v = np.concatenate([v, np.broadcast_to(ev, (N, 1, kvE))], axis=1)
    S2 = S + len(extra)
    heads = lambda a, h: a.reshape(a.shape[0], a.shape[1], h, D).transpose(0, 2, 1, 3)  # noqa
    qh, kh, vh = heads(q, H), heads(k, Hkv), heads(v, Hkv)
    kx, vx = expand_kv_heads(kh, H), expand_kv_heads(vh, H)
    M = np.zeros((N, H, L, S2))
    masks = ((attn_mask, None), (key_padding_mask, (N, 1, 1, S)))
    for m, shape in masks:
        if m is None:
            continue
        m = np.asarray(m).reshape(shape) if shape else m
        with np.errstate(invalid="ignore"):
            M[..., :S] = M[..., :S] + _mha_mask(m, N, H, L, S, mask_true_attends)
    with np.errstate(invalid="ignore", over="ignore"):
        scores = np.einsum("nhld,nhsd->nhls", qh, kx)
        logits = masked_scores(scores / np.sqrt(D), M)
        weights = softmax_rows(logits)
        ho = weighted_sum(weights, vx)
    concat = ho.transpose(0, 2, 1, 3).reshape(N, L, E)
    with np.errstate(invalid="ignore", over="ignore"):
        out = concat @ p["out_proj.weight"].T + p.get("out_proj.bias", 0.0)
    return dict(q=qh, k=kh, v=vh, scores=scores, logits=logits, weights=weights,
                head_outputs=ho, concat=concat, output=out, params=p,
                proj_weights=(wq, wk, wv), inputs=(x, y, z), S=S, k_expanded=kx,
                v_expanded=vx)


def mha_backward_reference(layer, ref, dout):
    """Gradients of the three inputs and of every parameter, in float64, by the
    chain rule through the stages of ref = mha_reference(...); dout batch-first.
    Returns (dquery, dkey, dvalue, {parameter name: gradient})."""
    p, (wq, wk, wv), (x, y, z) = ref["params"], ref["proj_weights"], ref["inputs"]
    H, Hkv, E, S = layer.num_heads, layer.num_kv_heads, layer.embed_dim, ref["S"]
    D = E // H
    N, L = x.shape[:2]
    P, concat = ref["weights"], ref["concat"]
    dconcat = dout @ p["out_proj.weight"]
    g = {"out_proj.weight": np.einsum("nlo,nle->oe", dout, concat)}
    if "out_proj.bias" in p:
        g["out_proj.bias"] = dout.sum((0, 1))
    dho = dconcat.reshape(N, L, H, D).transpose(0, 2, 1, 3)
    scale = 1.0 / np.sqrt(D)
    dV = np.einsum("nhls,nhld->nhsd", P, dho)
    dP = np.einsum("nhld,nhsd->nhls", dho, ref["v_expanded"])
    dS = P * (dP - (P * dP).sum(-1, keepdims=True))
    dQ = scale * np.einsum("nhls,nhsd->nhld", dS, ref["k_expanded"])
    dK = scale * np.einsum("nhls,nhld->nhsd", dS, ref["q"])
    dK, dV = _fold_heads(dK, Hkv), _fold_heads(dV, Hkv)
    merge = lambda a: a.transpose(0, 2, 1, 3).reshape(a.shape[0], a.shape[2],  # noqa: E731
                                                      a.shape[1] * a.shape[3])
    dq, dk, dv = merge(dQ), merge(dK), merge(dV)
    if "bias_k" in p:
        g["bias_k"] = dk[:, S].sum(0).reshape(1, 1, -1)
        g["bias_v"] = dv[:, S].sum(0).reshape(1, 1, -1)
    dk, dv = dk[:, :S], dv[:, :S]
    gw = [np.einsum("nlo,nli->oi", d, a) for d, a in ((dq, x), (dk, y), (dv, z))]
    if "in_proj_weight" in p:
        g["in_proj_weight"] = np.concatenate(gw)
    else:
        g["q_proj_weight"], g["k_proj_weight"], g["v_proj_weight"] = gw
    if "in_proj_bias" in p:
        g["in_proj_bias"] = np.concatenate([d.sum((0, 1)) for d in (dq, dk, dv)])
    return dq @ wq, dk @ wk, dv @ wv, g


def self_attention_reference(x, w_q, w_k, w_v, attn_mask=None, is_causal=False, scale=None):
    """The textbook single-head self-attention in float64: q, k, v = x @ w_q,
    x @ w_k, x @ w_v, then SDPA over (N, 1 head, L, .) problems (bool masks:
    True attends). x (L, d) (N = 1) or (N, L, d); a 3-D mask is one (L, L) mask
    per sequence, a 4-D one broadcasts to (N, 1, L, L). Returns (out, weights)
    without the head axis, and without N for an unbatched x (unless the mask
    holds more than one sequence)."""
    X = np.array(x, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        Q, K, V = (X @ np.asarray(w, dtype=np.float64) for w in (w_q, w_k, w_v))
    unbatched = X.ndim == 2
    one_head = (lambda a: a[None, None]) if unbatched else (lambda a: a[:, None])
    m = attn_mask
    if m is not None and np.ndim(m) == 3:
        m = np.asarray(m)[:, None]
    out, w = sdpa_reference(one_head(Q), one_head(K), one_head(V), m, is_causal, scale)
    out, w = out[:, 0], w[:, 0]
    if unbatched and out.shape[0] == 1:
        return out[0], w[0]
    return out, w

"""An independent float64 NumPy reference for scaled dot-product attention.

Written from the math, not from attnpy's code:

    scores  = scale * q @ k^T + M          (M: 0 / -inf or an added float mask)
    weights = softmax(scores, axis=-1)     (a row of only -inf gives zeros)
    out     = weights @ v

and, for values that are not finite, the rules attnpy promises:
- a pair the mask sets to -inf (bool False, causal, a float -inf) is never
  attended, whatever q . k is (NaN and inf included);
- with E = 0 every q . k is an empty sum, 0, whatever the scale (as torch);
- a key whose weight is exactly 0 is not read: NaN or inf in its value row
  does not reach the output;
- otherwise IEEE arithmetic: a NaN score makes its row NaN, and so does a
  +inf one (inf - inf).

Leading dims broadcast like np.matmul; with enable_gqa, query head h reads
key/value head h // (Hq // H). Everything is computed in float64 on copies of
the inputs, whatever their dtype or strides.
"""
import numpy as np

__all__ = ["sdpa_reference", "additive_mask", "softmax_rows", "weighted_sum"]


def additive_mask(attn_mask, is_causal, L, S):
    """The mask as a float64 array to add to the scores (None if no mask).

    bool: True = attend -> 0, False -> -inf. float: taken as is.
    is_causal: top-left aligned tril(ones(L, S)) -> 0 on and below the
    diagonal, -inf above it.
    """
    if is_causal:
        allowed = np.tril(np.ones((L, S), dtype=bool))
        return np.where(allowed, 0.0, -np.inf)
    if attn_mask is None:
        return None
    m = np.asarray(attn_mask)
    if m.dtype == np.bool_:
        return np.where(m, 0.0, -np.inf)
    return m.astype(np.float64)


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


def _expand_kv_heads(x, Hq):
    """GQA by index mapping: head h of the result is head h // (Hq // H) of x."""
    H = x.shape[-3]
    if H == 0 and Hq == 0:
        return x
    if H == 0 or Hq % H != 0:
        raise ValueError(f"Hq={Hq} is not a multiple of H={H}")
    group = Hq // H
    index = np.arange(Hq) // group
    return np.take(x, index, axis=-3)


def sdpa_reference(query, key, value, attn_mask=None, is_causal=False, scale=None,
                   enable_gqa=False, with_values=False):
    """Return (out, weights) in float64 for torch-SDPA semantics.

    out: (..., Hq, L, Ev), weights: (..., Hq, L, S). with_values=True also
    returns the value rows each problem reads, broadcast to (..., Hq, S, Ev).
    """
    q = np.array(query, dtype=np.float64)  # copies: the inputs are never touched
    k = np.array(key, dtype=np.float64)
    v = np.array(value, dtype=np.float64)
    if q.ndim < 2 or k.ndim < 2 or v.ndim < 2:
        raise ValueError("query, key and value must be at least 2-D")
    L, E = q.shape[-2:]
    S = k.shape[-2]
    if k.shape[-1] != E or v.shape[-2] != S:
        raise ValueError("inconsistent E or S")
    if scale is None:
        scale = 1.0 / np.sqrt(E) if E else 1.0

    if enable_gqa and q.ndim >= 3:
        Hq = q.shape[-3]
        k = _expand_kv_heads(k if k.ndim >= 3 else k[None], Hq)
        v = _expand_kv_heads(v if v.ndim >= 3 else v[None], Hq)

    batch = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    q = np.broadcast_to(q, batch + (L, E))
    k = np.broadcast_to(k, batch + (S, E))
    v = np.broadcast_to(v, batch + (S, v.shape[-1]))

    with np.errstate(invalid="ignore", over="ignore"):
        if E == 0:
            scores = np.zeros(batch + (L, S))
        else:
            scores = float(scale) * np.einsum("...le,...se->...ls", q, k)
        m = additive_mask(attn_mask, is_causal, L, S)
        if m is not None:
            if np.broadcast_shapes(scores.shape, m.shape) != scores.shape:
                raise ValueError(f"mask {m.shape} does not broadcast to {scores.shape}")
            scores = np.where(m == -np.inf, -np.inf, scores + m)
        weights = softmax_rows(scores)
        out = weighted_sum(weights, v)
    return (out, weights, v) if with_values else (out, weights)


def weighted_sum(weights, v):
    """weights @ v, where a weight of exactly 0 does not read its value row."""
    if np.isfinite(v).all():
        return np.einsum("...ls,...sc->...lc", weights, v)
    with np.errstate(invalid="ignore", over="ignore"):
        terms = np.where(weights[..., None] == 0, 0.0, weights[..., None] * v[..., None, :, :])
    return terms.sum(axis=-2)

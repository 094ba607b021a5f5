"""Coursework: write a NumPy function, check it against attnpy's C core.

    >>> import numpy as np
    >>> from attnpy import exercises
    >>> def softmax(scores):
    ...     e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    ...     return e / e.sum(axis=-1, keepdims=True)
    >>> print(exercises.check("softmax", softmax))
    softmax: correct (4 cases)

Each exercise runs the student's function on generated inputs and compares it
stage by stage with what the core computes (the forward's trace, the backward's
trace). A wrong answer gets a diagnosis: the checker computes the usual
mistakes on the same inputs and names the one the answer matches.

Exercises (``exercises.EXERCISES`` has their signatures):
  softmax(scores)                      weights along the last axis
  scaled_scores(q, k)                  q k^T / sqrt(d_k)
  masking(scores, mask)                -inf where mask is False (True = attend)
  attention(q, k, v, mask=None)        one head: softmax(q k^T / sqrt(d_k) + mask) v
  split_heads(x, num_heads)            (N, L, E) -> (N, H, L, E / H)
  merge_heads(x)                       (N, H, L, D) -> (N, L, H * D)
  softmax_backward(weights, grad_weights)   the gradient of the softmax's input
  rope(x, positions, base=10000.0)     rotary embedding, Llama's halves convention
  kv_cache_step(q, k_cache, v_cache, k_new, v_new)   new queries over cache + new keys
  induction_score(weights, tokens)     per head: weight on the token after an earlier occurrence
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ._mha import MultiheadAttention, self_attention
from ._positions import rope as _rope
from ._sdpa import scaled_dot_product_attention, scaled_dot_product_attention_backward
from .viz import induction_score as _induction_score

__all__ = ["EXERCISES", "CheckResult", "check"]

EXERCISES = {
    "softmax": "softmax(scores) -> weights: softmax along the last axis (keys)",
    "scaled_scores": "scaled_scores(q, k) -> q @ k.T / sqrt(d_k); q (L, d_k), k (S, d_k)",
    "masking": "masking(scores, mask) -> scores with -inf where mask is False (True = attend)",
    "attention": "attention(q, k, v, mask=None) -> softmax(q k^T / sqrt(d_k) + mask) @ v",
    "split_heads": "split_heads(x, num_heads) -> (N, H, L, E // H) from x (N, L, E)",
    "merge_heads": "merge_heads(x) -> (N, L, H * D) from x (N, H, L, D)",
    "softmax_backward": "softmax_backward(weights, grad_weights) -> gradient of the scores",
    "rope": "rope(x, positions, base=10000.0) -> x (L, D) rotated: feature i pairs with "
            "i + D/2, turned by positions[l] * base**(-2i/D)",
    "kv_cache_step": "kv_cache_step(q, k_cache, v_cache, k_new, v_new) -> (T, d_v): T new "
                     "queries over the P cached and T new keys, new token t sees keys "
                     "0 .. P + t",
    "induction_score": "induction_score(weights, tokens) -> (H,): weights (H, L, L), tokens "
                       "(L,) ints; over the queries i whose token occurred at some k < i, the "
                       "mean of the weight on the keys k + 1",
}


@dataclass
class CheckResult:
    """The outcome of :func:`check`; true when the answer is correct."""

    exercise: str
    ok: bool
    message: str
    cases: int = 0
    mistake: str | None = None
    details: dict = field(default_factory=dict)

    def __bool__(self):
        return self.ok

    def __str__(self):
        return self.message


def _softmax(x, axis=-1):
    m = np.max(np.where(np.isneginf(x), -np.inf, x), axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(x - m)
    s = e.sum(axis=axis, keepdims=True)
    return np.divide(e, s, out=np.zeros_like(e), where=s > 0)


# --------------------------------------------------------------------------
# cases: inputs, the core's answer, and the usual mistakes on the same inputs

def _cases_softmax(rng):
    # the last case has scores in the hundreds: exp overflows unless the row
    # maximum is subtracted first
    for shape, spread in (((4, 5), 1.0), ((2, 3, 6), 2.0), ((3, 7), 1.0), ((2, 4), 300.0)):
        q = rng.standard_normal(shape[:-1] + (4,)) * np.sqrt(spread)
        k = rng.standard_normal(shape[:-2] + (shape[-1], 4)) * np.sqrt(spread)
        scores = q @ np.swapaxes(k, -1, -2)
        weights = scaled_dot_product_attention(q, k, k, scale=1.0).weights  # the core's softmax
        mistakes = {
            "softmax over the wrong axis: normalise over the keys, the last axis "
            "(each row of weights sums to 1)": _softmax(scores, axis=-2),
            "not normalised: divide exp(scores) by its sum over the keys": np.exp(
                scores - scores.max(-1, keepdims=True)),
        }
        yield (scores,), weights, mistakes


def _cases_scaled_scores(rng):
    for L, d in ((4, 8), (7, 16), (5, 4)):
        x = rng.standard_normal((L, 12))
        w_q, w_k = rng.standard_normal((2, 12, d)) / 3
        res = self_attention(x, w_q, w_k, w_k, trace=True)       # unbatched: trace (1, L, ...)
        q, k = res.trace.q[0], res.trace.k[0]
        logits = res.trace.logits[0]
        raw = q @ k.T
        mistakes = {
            "missing the 1/sqrt(d_k) scaling": raw,
            "scaled by 1/d_k instead of 1/sqrt(d_k)": raw / d,
            "k not transposed the right way: scores are q @ k.T (queries down, keys across)":
                k @ q.T / np.sqrt(d),
        }
        yield (q, k), logits, mistakes


def _cases_masking(rng):
    for L in (4, 6):
        x = rng.standard_normal((L, 8))
        mask = rng.random((L, L)) < 0.6
        mask[:, 0] = True
        res = self_attention(x, np.eye(8), np.eye(8), np.eye(8), attn_mask=mask, trace=True)
        scores = res.trace.scores[0] / np.sqrt(8)
        expected = res.trace.logits[0]
        mistakes = {
            "mask inverted: True means attend, so -inf goes where the mask is False":
                np.where(mask, -np.inf, scores),
            "masked scores must be -inf, not 0 (exp(0) = 1 still gives them weight)":
                np.where(mask, scores, 0.0),
        }
        yield (scores, mask), expected, mistakes


def _cases_attention(rng):
    for L, S, d, masked in ((4, 4, 8, False), (3, 6, 4, True), (5, 5, 16, True)):
        q, k, v = rng.standard_normal((L, d)), rng.standard_normal((S, d)), rng.standard_normal((S, 3))
        mask = None
        if masked:
            mask = rng.random((L, S)) < 0.6
            mask[:, 0] = True
        out = scaled_dot_product_attention(q, k, v, attn_mask=mask).output
        add = 0.0 if mask is None else np.where(mask, 0.0, -np.inf)
        s = q @ k.T
        mistakes = {
            "missing the 1/sqrt(d_k) scaling": _softmax(s + add) @ v,
            "softmax over the wrong axis: normalise over the keys, the last axis":
                _softmax(s / np.sqrt(d) + add, axis=0) @ v if L == S else None,
        }
        if mask is not None:
            mistakes["mask inverted: True means attend"] = _softmax(
                s / np.sqrt(d) + np.where(mask, -np.inf, 0.0)) @ v
        yield (q, k, v, mask), out, mistakes


def _identity_layer(E, H):
    layer = MultiheadAttention(E, H, bias=False, dtype=np.float64)
    layer.load_state_dict({"in_proj_weight": np.vstack([np.eye(E)] * 3),
                           "out_proj.weight": np.eye(E)})
    return layer


def _cases_split_heads(rng):
    for N, L, E, H in ((2, 3, 8, 2), (1, 5, 12, 3), (2, 4, 8, 4)):
        x = rng.standard_normal((N, L, E))
        q = _identity_layer(E, H)(x, trace=True).trace.q       # the core's head split
        mistakes = {
            "heads split in the wrong order: reshape to (N, L, H, D), then move H before L":
                x.reshape(N, H, L, E // H),
            "heads not moved in front of the positions: the answer has shape (N, L, H, D)":
                x.reshape(N, L, H, E // H),
        }
        yield (x, H), q, mistakes


def _cases_merge_heads(rng):
    for N, L, E, H in ((2, 3, 8, 2), (1, 5, 12, 3)):
        x = rng.standard_normal((N, L, E))
        t = _identity_layer(E, H)(x, trace=True).trace
        heads = np.array(t.head_outputs)
        mistakes = {
            "heads merged in the wrong order: move H back after L, then reshape to "
            "(N, L, H * D)": heads.reshape(N, L, E),
        }
        yield (heads,), t.concat, mistakes


def _cases_softmax_backward(rng):
    for L, S in ((3, 4), (5, 5)):
        q, k, v = rng.standard_normal((L, 4)), rng.standard_normal((S, 4)), rng.standard_normal((S, 3))
        dout = rng.standard_normal((L, 3))
        res = scaled_dot_product_attention(q, k, v)
        g = scaled_dot_product_attention_backward(dout, q, k, v, trace=True)
        w, gw = res.weights, g.trace.grad_weights
        mistakes = {
            "missing the -sum_j(w * g) term: the softmax Jacobian is diag(w) - w w^T":
                w * gw,
            "the sum taken over the wrong axis: sum over the keys, the last axis":
                w * (gw - (w * gw).sum(0, keepdims=True)),
        }
        yield (w, gw), g.trace.grad_scores, mistakes


def _rope_numpy(x, positions, base, *, pair_halves=True, exponent=2.0, sign=1.0, swap=False):
    """The rotary embedding with one convention changed: the checker's mistakes."""
    L, D = x.shape
    half = D // 2
    theta = base ** (-exponent * np.arange(half) / D)
    angle = sign * np.asarray(positions, np.float64)[:, None] * theta
    cos, sin = (np.sin(angle), np.cos(angle)) if swap else (np.cos(angle), np.sin(angle))
    a, b = (x[:, :half], x[:, half:]) if pair_halves else (x[:, 0::2], x[:, 1::2])
    out = np.empty_like(x)
    ra, rb = a * cos - b * sin, b * cos + a * sin
    if pair_halves:
        out[:, :half], out[:, half:] = ra, rb
    else:
        out[:, 0::2], out[:, 1::2] = ra, rb
    return out


def _cases_rope(rng):
    for L, D, start, base in ((4, 8, 0, 10000.0), (5, 6, 3, 10000.0), (3, 16, 10, 500.0)):
        x = rng.standard_normal((L, D))
        positions = start + np.arange(L)
        expected = _rope(x, positions, base=base)                # the core's rotation
        mistakes = {
            "features paired as (2i, 2i+1) (GPT-J's interleaved pairs); here feature i "
            "pairs with i + D/2 (the two halves, Llama's rotate_half)":
                _rope(x, positions, base=base, interleaved=True),
            "turned the wrong way: x_a' = x_a cos - x_b sin, x_b' = x_b cos + x_a sin":
                _rope(x, positions, base=base, inverse=True),
            "frequencies base**(-i/D): the exponent is -2i/D (one frequency per pair)":
                _rope_numpy(x, positions, base, exponent=1.0),
            "sin and cos swapped":
                _rope_numpy(x, positions, base, swap=True),
            "positions ignored: token l turns by positions[l] * theta, not l * theta":
                _rope(x, np.arange(L), base=base) if start else None,
            "the positions are off by one: the first token of a sequence is at 0":
                _rope(x, positions + 1, base=base),
        }
        yield (x, positions, base), expected, mistakes


def _cases_kv_cache_step(rng):
    for P, T, d, dv in ((5, 1, 4, 3), (6, 3, 4, 4), (4, 2, 8, 2)):
        q = rng.standard_normal((T, d))
        k_cache, v_cache = rng.standard_normal((P, d)), rng.standard_normal((P, dv))
        k_new, v_new = rng.standard_normal((T, d)), rng.standard_normal((T, dv))
        keys, values = np.concatenate([k_cache, k_new]), np.concatenate([v_cache, v_new])
        # the core: bottom-right causal, query t at position P + t
        out = scaled_dot_product_attention(q, keys, values, is_causal=True, query_offset=P).output
        s = q @ keys.T / np.sqrt(d)
        top_left = np.tril(np.ones((T, P + T), bool))
        mistakes = {
            "the cache is left out: the new queries attend to the new keys only":
                _softmax(s[:, P:] + np.where(np.tril(np.ones((T, T), bool)), 0, -np.inf))
                @ v_new,
            "the new keys are left out: append k_new and v_new to the cache first (a token "
            "attends to itself)": _softmax(s[:, :P]) @ v_cache,
            "the causal mask is aligned top-left: new token t is at position P + t and "
            "sees keys 0 .. P + t": _softmax(s + np.where(top_left, 0, -np.inf)) @ values,
            "no causal mask among the new tokens: new token t must not see new tokens "
            "after it": _softmax(s) @ values if T > 1 else None,
            "the new keys are put before the cache: keys are kept in position order, the "
            "cache first": scaled_dot_product_attention(
                q, np.concatenate([k_new, k_cache]), np.concatenate([v_new, v_cache]),
                is_causal=True, query_offset=P).output,
        }
        yield (q, k_cache, v_cache, k_new, v_new), out, mistakes


def _induction_numpy(w, tokens, *, after=1, own=False, every_query=False):
    """The induction score with one rule changed: the checker's mistakes."""
    L = len(tokens)
    out = np.zeros(w.shape[0])
    for h in range(w.shape[0]):
        scores = []
        for i in range(L):
            keys = {k + after for k in range(i + own) if tokens[k] == tokens[i] and k + after < L}
            if keys or every_query:
                scores.append(sum(w[h, i, j] for j in keys))
        out[h] = np.mean(scores) if scores else 0.0
    return out


def _cases_induction_score(rng):
    for H, T, causal, extra in ((2, 5, False, False), (3, 6, True, False), (2, 6, False, True)):
        first = rng.choice(40, T, replace=False)
        if extra:
            first[T - 1] = first[1]           # a token seen twice before its repeat
        tokens = np.concatenate([first, first])
        L = 2 * T
        logits = rng.standard_normal((H, L, L)) * 2
        if causal:
            logits = np.where(np.tril(np.ones((L, L), bool)), logits, -np.inf)
        w = _softmax(logits)
        mistakes = {
            "off by one: this is the weight on the earlier occurrence itself; an induction "
            "head attends to the token after it (key k + 1)":
                _induction_numpy(w, tokens, after=0),
            "off by one: this is the weight two tokens after the earlier occurrence; the "
            "target is key k + 1": _induction_numpy(w, tokens, after=2),
            "the query's own position counted as an earlier occurrence of its token: look "
            "at k < i only": _induction_numpy(w, tokens, own=True),
            "averaged over every query: only the queries whose token occurred before (the "
            "repeated half) count": _induction_numpy(w, tokens, every_query=True),
        }
        yield (w, tokens), _induction_score(w, tokens), mistakes


CASES = {
    "softmax": _cases_softmax,
    "scaled_scores": _cases_scaled_scores,
    "masking": _cases_masking,
    "attention": _cases_attention,
    "split_heads": _cases_split_heads,
    "merge_heads": _cases_merge_heads,
    "softmax_backward": _cases_softmax_backward,
    "rope": _cases_rope,
    "kv_cache_step": _cases_kv_cache_step,
    "induction_score": _cases_induction_score,
}


def _close(a, b, tol):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return a.shape == b.shape and np.allclose(a, b, rtol=tol, atol=tol, equal_nan=True)


def _answer(got):
    """The student's return value as a real float array, or (None, why not)."""
    if got is None:
        return None, "the function returned None (a missing return?)"
    if isinstance(got, tuple) and any(isinstance(g, np.ndarray) for g in got):
        return None, (f"the function returned a {type(got).__name__} of {len(got)} items; "
                      "return one array")
    try:
        arr = np.asarray(got)
    except (ValueError, TypeError) as e:
        return None, f"the answer is not an array of numbers ({type(got).__name__}: {e})"
    if arr.dtype.kind == "c":
        return None, (f"the answer is complex (dtype {arr.dtype}); attention's numbers are "
                      "real: look for a stray 1j or np.sqrt of a negative number")
    if arr.dtype.kind not in "fiub":
        return None, (f"the answer has dtype {arr.dtype} ({type(got).__name__}); expected an "
                      "array of floats")
    return arr.astype(np.float64), None


def _first_difference(expected, got, tol):
    """'at [i, ...]: expected [...], got [...]' for the first row that differs."""
    bad = ~np.isclose(got, expected, rtol=tol, atol=tol, equal_nan=True)
    where = tuple(int(i) for i in np.argwhere(bad)[0])
    row = where[:-1]
    fmt = dict(precision=4, suppress_small=True, max_line_width=200)
    label = f"row {list(row)}" if row else "the answer"
    return (f"{label}: expected {np.array2string(expected[row][:8], **fmt)}, got "
            f"{np.array2string(got[row][:8], **fmt)}")


def _masking_large_negative(args, got, expected, tol):
    """masking with a large finite number (-1e9) instead of -inf: explain."""
    scores, mask = args
    hidden = ~np.asarray(mask, bool)
    if got.shape != expected.shape or not hidden.any():
        return None
    if np.all(np.isfinite(got[hidden])) and np.all(got[hidden] <= -1e4) and \
            _close(got[~hidden], expected[~hidden], tol):
        big = float(got[hidden].max())
        return (f"masked scores are {big:.3g} instead of -inf. After the softmax this "
                "usually gives the same weights, but -inf is exactly zero weight whatever "
                "the other scores are (a row of scores near -1e9, or float16, would break "
                f"{big:.3g}), and it is what torch and this checker expect: use -np.inf")
    return None


def _attention_stage(fn, args, tol):
    """Which stage of attention(q, k, v, mask) is wrong: the weights are read
    off by passing v = identity (out = weights @ I = weights)."""
    q, k, v, mask = args
    L, d = q.shape
    S = k.shape[0]
    try:
        w, why = _answer(fn(q.copy(), k.copy(), np.eye(S), None if mask is None else mask.copy()))
    except Exception:  # the student's code fails on this input: no diagnosis
        return None
    if why or w.shape != (L, S):
        return None
    add = 0.0 if mask is None else np.where(mask, 0.0, -np.inf)
    s = q @ k.T
    logits = s / np.sqrt(d) + add
    weights = _softmax(logits)
    if _close(w, weights, tol):
        return ("the weights are right (checked with v = identity): the mistake is in the "
                "last step, out = weights @ v")
    row_max = logits.max(-1, keepdims=True)
    stages = {
        "softmax over the wrong axis: normalise over the keys, the last axis (with v = "
        "identity your weights' columns sum to 1, not their rows)": _softmax(logits, axis=0),
        "the weights are not normalised (with v = identity your rows do not sum to 1): "
        "divide exp(scores) by its sum over the keys": np.exp(logits - row_max),
        "missing the 1/sqrt(d_k) scaling of the scores": _softmax(s + add),
        "scores scaled by 1/d_k instead of 1/sqrt(d_k)": _softmax(s / d + add),
    }
    if mask is not None:
        stages["mask inverted: True means attend"] = _softmax(
            s / np.sqrt(d) + np.where(mask, -np.inf, 0.0))
        stages["the mask is not applied"] = _softmax(s / np.sqrt(d))
    for stage, wrong in stages.items():
        if wrong.shape == w.shape and _close(w, wrong, tol):
            return stage
    return ("the weights are wrong (checked with v = identity): "
            + _first_difference(weights, w, tol))


DIAGNOSE = {"masking": _masking_large_negative}


def check(name, fn, *, seed=0, tol=1e-6):
    """Run ``fn`` on the exercise's cases and compare with the C core.

    Parameters
    ----------
    name : str
        One of ``EXERCISES``.
    fn : callable
        The student's function, with the exercise's signature.
    seed : int
        Seeds the generated inputs.
    tol : float
        Relative and absolute tolerance.

    Returns
    -------
    CheckResult
        True when every case matches; otherwise its message says which case
        failed and, when the answer matches a common mistake, which one; for
        ``attention``, which stage (scores, mask, softmax, weighted sum) is
        wrong; otherwise the first row that differs, expected and got.
    """
    if name not in CASES:
        raise ValueError(f"name must be one of {sorted(CASES)}; got {name!r}")
    rng = np.random.default_rng(seed)
    n = 0
    for n, (args, expected, mistakes) in enumerate(CASES[name](rng), start=1):
        try:
            got = fn(*[a.copy() if isinstance(a, np.ndarray) else a for a in args])
        except Exception as e:  # the student's code: report, don't crash the notebook
            return CheckResult(name, False, f"{name}: case {n} raised {type(e).__name__}: {e}",
                               n - 1)
        got, why = _answer(got)
        if why:
            return CheckResult(name, False, f"{name}: case {n}: {why}", n - 1)
        if _close(got, expected, tol):
            continue
        expected = np.asarray(expected, dtype=np.float64)
        for mistake, wrong in mistakes.items():
            if wrong is not None and _close(got, wrong, tol):
                return CheckResult(name, False, f"{name}: case {n}: {mistake}", n - 1,
                                   mistake=mistake)
        explained = DIAGNOSE[name](args, got, expected, tol) if name in DIAGNOSE else None
        if explained is None and name == "attention" and got.shape == expected.shape:
            explained = _attention_stage(fn, args, tol)
        shapes = ", ".join(str(np.shape(a)) for a in args if isinstance(a, np.ndarray))
        if explained:
            msg = f"{name}: case {n} (inputs {shapes}): {explained}"
        elif got.shape != expected.shape:
            msg = f"{name}: case {n}: expected shape {expected.shape}, got {got.shape}"
        elif np.isnan(got).any() and not np.isnan(expected).any():
            msg = (f"{name}: case {n}: NaN in the answer (exp overflowing? subtract the row "
                   "maximum before exp)")
        else:
            err = float(np.nanmax(np.abs(got - expected)))
            msg = (f"{name}: case {n} (inputs {shapes}): wrong values (largest difference "
                   f"{err:.3g}); {_first_difference(expected, got, tol)}")
        return CheckResult(name, False, msg, n - 1, mistake=explained,
                           details={"expected": expected, "got": got, "inputs": args})
    return CheckResult(name, True, f"{name}: correct ({n} cases)", n)

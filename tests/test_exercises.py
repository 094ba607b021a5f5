"""The coursework checker: a correct solution passes every exercise, and each
planted mistake is diagnosed by name."""
import numpy as np
import pytest

from attnpy import exercises


def softmax(scores):
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def scaled_scores(q, k):
    return q @ k.T / np.sqrt(q.shape[-1])


def masking(scores, mask):
    return np.where(mask, scores, -np.inf)


def attention(q, k, v, mask=None):
    s = scaled_scores(q, k)
    if mask is not None:
        s = masking(s, mask)
    return softmax(s) @ v


def split_heads(x, num_heads):
    N, L, E = x.shape
    return x.reshape(N, L, num_heads, E // num_heads).transpose(0, 2, 1, 3)


def merge_heads(x):
    N, H, L, D = x.shape
    return x.transpose(0, 2, 1, 3).reshape(N, L, H * D)


def softmax_backward(w, g):
    return w * (g - (w * g).sum(-1, keepdims=True))


def rope(x, positions, base=10000.0, *, pairs="halves", exponent=2.0, turn=1.0, shift=0):
    """Written here from the RoFormer formula (with switches for the mistakes)."""
    L, D = x.shape
    theta = base ** (-exponent * np.arange(D // 2) / D)
    angle = turn * (np.asarray(positions)[:, None] + shift) * theta
    idx = np.arange(D).reshape(2, -1) if pairs == "halves" else np.arange(D).reshape(-1, 2).T
    a, b = x[:, idx[0]], x[:, idx[1]]
    out = np.empty_like(x)
    out[:, idx[0]] = a * np.cos(angle) - b * np.sin(angle)
    out[:, idx[1]] = b * np.cos(angle) + a * np.sin(angle)
    return out


def kv_cache_step(q, k_cache, v_cache, k_new, v_new, *, causal="bottom-right", cache=True):
    keys = np.concatenate([k_cache, k_new]) if cache else k_new
    values = np.concatenate([v_cache, v_new]) if cache else v_new
    T, S = len(q), len(keys)
    allowed = np.arange(S)[None, :] <= np.arange(T)[:, None] + (S - T if causal == "bottom-right"
                                                                 else 0)
    return softmax(np.where(allowed, scaled_scores(q, keys), -np.inf)) @ values


def induction_score(weights, tokens, *, after=1, own=False, every_query=False):
    """Written here from the definition, with masks instead of loops."""
    t = np.asarray(tokens)
    L = len(t)
    i, k = np.arange(L)[:, None], np.arange(L)[None, :]
    earlier = (t[:, None] == t[None, :]) & ((k <= i) if own else (k < i))   # (query i, key k)
    targets = np.zeros((L, L), bool)
    if after < L:
        targets[:, after:] = earlier[:, :L - after]
    counted = np.ones(L, bool) if every_query else targets.any(1)
    per_query = (weights * targets).sum(-1)[:, counted]
    return per_query.mean(-1) if counted.any() else np.zeros(len(weights))


CORRECT = dict(softmax=softmax, scaled_scores=scaled_scores, masking=masking,
               attention=attention, split_heads=split_heads, merge_heads=merge_heads,
               softmax_backward=softmax_backward, rope=rope, kv_cache_step=kv_cache_step,
               induction_score=induction_score)

MISTAKES = [
    ("softmax", lambda s: np.exp(s) / np.exp(s).sum(-2, keepdims=True), "wrong axis"),
    ("softmax", lambda s: np.exp(s - s.max(-1, keepdims=True)), "not normalised"),
    ("softmax", lambda s: np.exp(s) / np.exp(s).sum(-1, keepdims=True), "subtract the row maximum"),  # noqa: E501
    ("scaled_scores", lambda q, k: q @ k.T, "missing the 1/sqrt(d_k)"),
    ("scaled_scores", lambda q, k: k @ q.T / np.sqrt(q.shape[-1]), "k not transposed"),
    ("scaled_scores", lambda q, k: q @ k.T / q.shape[-1], "1/d_k instead"),
    ("masking", lambda s, m: np.where(m, -np.inf, s), "mask inverted"),
    ("masking", lambda s, m: np.where(m, s, 0.0), "not 0"),
    ("attention", lambda q, k, v, mask=None: softmax(
        q @ k.T + (0 if mask is None else np.where(mask, 0, -np.inf))) @ v,
     "missing the 1/sqrt(d_k)"),
    ("attention", lambda q, k, v, mask=None: softmax(
        scaled_scores(q, k) + (0 if mask is None else np.where(mask, -np.inf, 0))) @ v,
     "mask inverted"),
    ("split_heads", lambda x, h: x.reshape(x.shape[0], h, x.shape[1], -1), "wrong order"),
    ("split_heads", lambda x, h: x.reshape(x.shape[0], x.shape[1], h, -1), "not moved in front"),
    ("merge_heads", lambda x: x.reshape(x.shape[0], x.shape[2], -1), "merged in the wrong order"),
    ("softmax_backward", lambda w, g: w * g, "missing the -sum_j"),
    ("softmax_backward", lambda w, g: w * (g - (w * g).sum(0, keepdims=True)), "wrong axis"),
    ("rope", lambda x, p, base=1e4: rope(x, p, base, pairs="interleaved"), "interleaved pairs"),
    ("rope", lambda x, p, base=1e4: rope(x, p, base, turn=-1.0), "turned the wrong way"),
    ("rope", lambda x, p, base=1e4: rope(x, p, base, exponent=1.0), "exponent is -2i/D"),
    ("rope", lambda x, p, base=1e4: rope(x, p, base, shift=1), "off by one"),
    ("rope", lambda x, p, base=1e4: rope(x, p, base)[:, ::-1], "wrong values"),
    ("kv_cache_step", lambda *a: kv_cache_step(*a, cache=False), "the cache is left out"),
    ("kv_cache_step", lambda q, kc, vc, kn, vn: softmax(scaled_scores(q, kc)) @ vc,
     "the new keys are left out"),
    ("kv_cache_step", lambda *a: kv_cache_step(*a, causal="top-left"), "aligned top-left"),
    ("induction_score", lambda w, t: induction_score(w, t, after=0), "the earlier occurrence itself"),
    ("induction_score", lambda w, t: induction_score(w, t, after=2), "two tokens after"),
    ("induction_score", lambda w, t: induction_score(w, t, own=True), "own position counted"),
    ("induction_score", lambda w, t: induction_score(w, t, every_query=True),
     "averaged over every query"),
    ("induction_score", lambda w, t: induction_score(w, t).sum(), "expected shape (2,)"),
]


@pytest.mark.parametrize("name", sorted(exercises.EXERCISES))
def test_correct_solutions_pass(name):
    result = exercises.check(name, CORRECT[name])
    assert result, result.message
    assert result.cases >= 2


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the planted mistakes overflow on purpose
@pytest.mark.parametrize("name, fn, words", MISTAKES,
                         ids=[f"{m[0]}-{m[2].split(':')[0]}" for m in MISTAKES])
def test_mistakes_are_diagnosed(name, fn, words):
    result = exercises.check(name, fn)
    assert not result
    assert words in result.message, result.message


def test_rope_positions_ignored_and_sin_cos_swapped_are_named():
    ignored = exercises.check("rope", lambda x, p, base=1e4: rope(x, np.arange(len(x)), base))
    assert "positions ignored" in ignored.message, ignored.message

    def swapped(x, p, base=1e4):
        L, D = x.shape
        angle = np.asarray(p)[:, None] * base ** (-2 * np.arange(D // 2) / D)
        a, b = x[:, :D // 2], x[:, D // 2:]
        s, c = np.cos(angle), np.sin(angle)
        return np.concatenate([a * c - b * s, b * c + a * s], axis=1)
    assert "sin and cos swapped" in exercises.check("rope", swapped).message


def test_kv_cache_step_without_causal_among_new_tokens_is_named():
    def unmasked(q, kc, vc, kn, vn):
        return softmax(scaled_scores(q, np.concatenate([kc, kn]))) @ np.concatenate([vc, vn])
    result = exercises.check("kv_cache_step", unmasked)
    assert "no causal mask among the new tokens" in result.message, result.message


def test_other_failures_are_reported_not_raised():
    assert "raised ZeroDivisionError" in str(exercises.check("softmax", lambda s: 1 / 0))
    assert "returned None" in str(exercises.check("softmax", lambda s: None))
    assert "expected shape" in str(exercises.check("masking", lambda s, m: s[:1]))
    assert "wrong values" in str(exercises.check("scaled_scores", lambda q, k: q @ k.T * 0.5))
    with pytest.raises(ValueError, match="name"):
        exercises.check("softmaxx", softmax)


# Issue 12, item 6: the checker crashed on answers that are not arrays of
# numbers, called complex and string answers correct, called -1e9 masking
# plain "wrong values", and could not say which stage of attention was wrong.
@pytest.mark.parametrize("fn, words", [
    (lambda s: "todo", "dtype <U4"),
    (lambda s: (softmax(s), s), "returned a tuple of 2 items; return one array"),
    (lambda s: softmax(s) + 5j, "complex"),
    (lambda s: softmax(s).astype(str), "expected an array of floats"),
    (lambda s: [softmax(s), softmax(s)[:1]], "not an array of numbers"),
])
def test_answers_that_are_not_arrays_of_numbers_are_explained(fn, words):
    result = exercises.check("softmax", fn)
    assert not result
    assert words in result.message, result.message


def test_a_list_of_lists_is_an_answer():
    assert exercises.check("softmax", lambda s: softmax(s).tolist())


def test_masking_with_a_large_negative_number_is_explained():
    result = exercises.check("masking", lambda s, m: np.where(m, s, -1e9))
    assert not result
    assert "masked scores are -1e+09 instead of -inf" in result.message, result.message
    assert "use -np.inf" in result.message


@pytest.mark.parametrize("fn, words", [
    # the wrong axis where L != S (the case-level mistake list could not build it)
    (lambda q, k, v, mask=None: exercises._softmax(
        scaled_scores(q, k) + (0 if mask is None else np.where(mask, 0, -np.inf)), axis=0) @ v,
     "softmax over the wrong axis"),
    (lambda q, k, v, mask=None: softmax(scaled_scores(q, k)) @ v, "the mask is not applied"),
    (lambda q, k, v, mask=None: attention(q, k, np.abs(v), mask),
     "the weights are right (checked with v = identity): the mistake is in the last step"),
    (lambda q, k, v, mask=None: softmax(scaled_scores(q, k) * 1.3 + (
        0 if mask is None else np.where(mask, 0, -np.inf))) @ v,
     "the weights are wrong (checked with v = identity): row [0]: expected"),
])
def test_attention_names_the_wrong_stage(fn, words):
    result = exercises.check("attention", fn)
    assert not result
    assert words in result.message, result.message


def test_wrong_values_show_the_numbers():
    result = exercises.check("scaled_scores", lambda q, k: q @ k.T * 0.5)
    msg = result.message
    assert "wrong values" in msg and "inputs (4, 8), (4, 8)" in msg
    assert "row [0]: expected [" in msg and "got [" in msg

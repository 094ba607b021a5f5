"""attnpy.viz.induction_targets and induction_score: the induction-head score,
checked against a loop written here and on maps whose answers are known.
No matplotlib needed."""
import numpy as np
import pytest

from attnpy import viz


def score_by_loops(w, tokens):
    """The definition, one query at a time: over the queries i whose token
    occurred at some k < i, the mean of the weight on the keys k + 1."""
    H, L, _ = w.shape
    out = np.zeros(H)
    for h in range(H):
        scores = []
        for i in range(L):
            keys = {k + 1 for k in range(i) if tokens[k] == tokens[i]}
            if keys:
                scores.append(sum(w[h, i, j] for j in keys))
        out[h] = np.mean(scores) if scores else 0.0
    return out


def repeated(rng, T, vocab=50):
    first = rng.choice(vocab, T, replace=False)
    return np.concatenate([first, first])


def induction_map(tokens):
    """Each query with an earlier occurrence attends to the token after it;
    the others to themselves."""
    L = len(tokens)
    w = np.eye(L)
    for i in range(L):
        earlier = [k for k in range(i) if tokens[k] == tokens[i]]
        if earlier:
            w[i] = 0
            w[i, earlier[-1] + 1] = 1
    return w


def test_a_perfect_induction_head_scores_one_and_a_previous_token_head_zero():
    tokens = repeated(np.random.default_rng(0), 7)
    L = len(tokens)
    previous = np.eye(L, k=-1)
    previous[0, 0] = 1
    uniform = np.tril(np.ones((L, L))) / np.arange(1, L + 1)[:, None]
    got = viz.induction_score(np.stack([induction_map(tokens), previous, np.eye(L), uniform]),
                              tokens)
    # uniform causal: query T + t (t = 0..T-1) puts 1 / (T + t + 1) on its target
    T = L // 2
    np.testing.assert_allclose(got, [1, 0, 0, np.mean(1 / (T + np.arange(T) + 1))], atol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_against_the_loops_on_random_maps_and_repeating_tokens(seed):
    rng = np.random.default_rng(seed)
    L, H = 13, 3
    tokens = rng.integers(0, 4, L)            # few distinct tokens: many earlier occurrences
    logits = rng.standard_normal((H, L, L))
    w = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)   # not causal: every key counts
    np.testing.assert_allclose(viz.induction_score(w, tokens), score_by_loops(w, tokens),
                               rtol=1e-12)


def test_targets_are_the_keys_after_earlier_occurrences():
    tokens = np.array([5, 6, 5, 7, 5])
    t = viz.induction_targets(tokens)
    assert t.shape == (5, 5) and t.dtype == bool
    assert [list(np.flatnonzero(row)) for row in t] == [[], [], [1], [], [1, 3]]


def test_batch_dims_broadcast_and_new_tokens_score_zero():
    rng = np.random.default_rng(3)
    tokens = np.stack([repeated(rng, 5), rng.permutation(10)])    # row 1: no repeats
    logits = rng.standard_normal((2, 2, 10, 10))
    w = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    got = viz.induction_score(w, tokens)
    assert got.shape == (2, 2)
    np.testing.assert_allclose(got[0], score_by_loops(w[0], tokens[0]), rtol=1e-12)
    np.testing.assert_array_equal(got[1], 0.0)
    # one token row for several layers of one sequence
    layers = np.stack([w[0], w[0][::-1]])                         # (layers, H, L, L)
    np.testing.assert_allclose(viz.induction_score(layers, tokens[0])[0], got[0])


@pytest.mark.parametrize("weights, tokens, error, words", [
    (np.ones((4, 4)), np.arange(4), ValueError, "weights must have shape (..., H, L, L)"),
    (np.ones((1, 4, 5)), np.arange(5), ValueError, "weights must have shape (..., H, L, L)"),
    (np.ones((1, 4, 4)), np.arange(5), ValueError, "tokens must have length L = 4"),
    (np.ones((1, 4, 4)), np.ones(4), TypeError, "tokens must be an integer array"),
    # one token row per head is a mistake: the tokens do not depend on the head
    (np.ones((3, 4, 4)), np.zeros((3, 4), int), ValueError,
     "tokens' leading dims (3,) must broadcast to the weights' dims before H, ()"),
    (np.ones((2, 3, 4, 4)), np.zeros((3, 4), int), ValueError,
     "tokens' leading dims (3,) must broadcast to the weights' dims before H, (2,)"),
])
def test_bad_arguments_are_named(weights, tokens, error, words):
    with pytest.raises(error) as e:
        viz.induction_score(weights, tokens)
    assert words in str(e.value)

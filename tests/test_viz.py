"""attnpy.viz: what the pictures show, and the numbers behind them, checked on
maps whose answers are known."""
import io

import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

import numpy as np

import attnpy
from attnpy import viz

TOKENS = ["the", "cat", "sat", "on", "the", "mat"]


def maps(H=3, L=6):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((H, L, 8))
    return attnpy.scaled_dot_product_attention(x, x, x, is_causal=True).weights


def test_heatmap_draws_the_map_with_labels_and_values():
    w = maps()[0]
    ax = viz.heatmap(w, TOKENS, TOKENS)
    np.testing.assert_array_equal(ax.images[0].get_array(), w)
    assert [t.get_text() for t in ax.get_xticklabels()] == TOKENS
    assert [t.get_text() for t in ax.get_yticklabels()] == TOKENS
    assert len(ax.texts) == w.size                     # small map: values printed
    assert ax.images[0].get_clim() == (0.0, pytest.approx(w.max()))


def test_heatmap_marks_masked_cells_and_crops():
    w = maps()[0]
    masked = np.triu(np.ones((6, 6), bool), 1)
    ax = viz.heatmap(w, TOKENS, TOKENS, masked=masked, crop=(slice(2, 5), None))
    assert len(ax.images) == 2                          # the map, then the grey overlay
    hatched = [p for p in ax.patches if p.get_hatch() == "///"]
    assert len(hatched) == int(masked[2:5].sum())
    assert [t.get_text() for t in ax.get_yticklabels()] == TOKENS[2:5]
    big = viz.heatmap(np.full((40, 40), 1 / 40), annotate=None)
    assert len(big.texts) == 0                          # long input: no printed values


def test_heads_grid_shares_one_colour_scale():
    w = maps(H=5)
    fig = viz.heads(w, TOKENS)
    images = [ax.images[0] for ax in fig.axes if ax.images]
    assert len(images) == 5
    assert len({im.get_clim() for im in images}) == 1
    assert images[0].get_clim()[1] == pytest.approx(w.max())
    hidden = [ax for ax in fig.axes if not ax.axison]
    assert len(hidden) == 6 - 5                         # 2 x 3 grid, 1 empty cell


def test_layers_grid_and_saving_in_three_formats():
    fig = viz.layers([maps(H=4), maps(H=4), maps(H=2)], TOKENS)
    assert sum(1 for ax in fig.axes if ax.images) == 4 + 4 + 2
    for fmt, magic in (("png", b"\x89PNG"), ("svg", b"<?xml"), ("pdf", b"%PDF")):
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt)
        assert buf.getvalue().startswith(magic), fmt


def test_head_stats_on_maps_with_known_answers():
    L = 5
    identity = np.eye(L)
    uniform = np.full((L, L), 1 / L)
    previous = np.eye(L, k=-1)
    previous[0, 0] = 1.0                                # the first token attends to itself
    first = np.zeros((L, L))
    first[:, 0] = 1.0
    stats = viz.head_stats(np.stack([identity, uniform, previous, first]))
    np.testing.assert_allclose(stats["entropy"], [0, np.log(L), 0, 0], atol=1e-12)
    np.testing.assert_allclose(stats["distance"][[0, 2]], [0, (L - 1) / L], atol=1e-12)
    np.testing.assert_allclose(stats["distance"][1], np.mean([np.mean(np.abs(i - np.arange(L)))
                                                              for i in range(L)]))
    np.testing.assert_allclose(stats["previous"], [0, 1 / L, 1, 1 / (L - 1)], atol=1e-12)
    # "previous": rows 0 and 1 both look at key 0
    np.testing.assert_allclose(stats["first"], [1 / L, 1 / L, 2 / L, 1], atol=1e-12)
    fig = viz.plot_head_stats(np.stack([identity, uniform, previous, first]))
    assert len(fig.axes) == 4 and all(len(ax.patches) == 4 for ax in fig.axes)


def test_rollout_against_a_hand_computation():
    rng = np.random.default_rng(1)
    layer_maps = []
    for _ in range(3):
        x = rng.standard_normal((2, 4, 4))
        layer_maps.append(attnpy.scaled_dot_product_attention(x, x, x).weights)
    expected = np.eye(4)
    for w in layer_maps:
        a = 0.5 * w.mean(0) + 0.5 * np.eye(4)
        a = a / a.sum(1, keepdims=True)
        expected = a @ expected
    np.testing.assert_allclose(viz.rollout(layer_maps), expected, rtol=1e-6)
    # identity attention everywhere: nothing moves
    np.testing.assert_allclose(viz.rollout([np.eye(4)[None]] * 3, residual=False), np.eye(4))
    np.testing.assert_allclose(viz.rollout(layer_maps, head_fusion="max").sum(1), 1.0)
    with pytest.raises(ValueError, match="head_fusion"):
        viz.rollout(layer_maps, head_fusion="median")
    with pytest.raises(ValueError, match="L = S"):
        viz.rollout([np.ones((1, 2, 3)) / 3])


def test_bad_maps_name_the_argument():
    with pytest.raises(ValueError, match="weights"):
        viz.heatmap(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="weights"):
        viz.heads(np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"list_of_weights\[1\]"):
        viz.layers([np.zeros((2, 3, 3)), np.zeros((3, 3))])


def test_long_inputs_stay_readable_and_linear():
    # 500 tokens, causal: the drawing holds a fixed number of artists, not one
    # per cell, and at most 60 labels per axis
    L = 500
    tokens = [f"tok{i}" for i in range(L)]
    w = np.tril(np.ones((L, L)))
    w /= w.sum(-1, keepdims=True)
    masked = np.triu(np.ones((L, L), bool), 1)
    ax = viz.heatmap(w, tokens, tokens, masked=masked)
    assert len(ax.patches) == 0 and len(ax.texts) == 0
    assert len(ax.images) == 2                          # the map and the grey overlay
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert 30 <= len(labels) <= 60 and labels[:2] == ["tok0", "tok9"]
    # a window of the same map keeps the labels of that window
    ax = viz.heatmap(w, tokens, tokens, masked=masked, crop=(slice(100, 120), slice(90, 110)))
    assert [t.get_text() for t in ax.get_yticklabels()] == tokens[100:120]
    assert ax.images[0].get_array().shape == (20, 20)
    hatched = [p for p in ax.patches if p.get_hatch() == "///"]
    assert len(hatched) == int(masked[100:120, 90:110].sum())
    assert max(viz.heatmap(w, tokens, tokens).figure.get_size_inches()) <= 14
    assert max(viz.heads(np.stack([w, w]), tokens).get_size_inches()) <= 12


# Tokens were parsed as mathtext (issue 12, item 4): '$\frac{}$' raised a
# ParseSyntaxException when drawn, '$x$' was drawn as math.
@pytest.mark.parametrize("token", ["$\\frac{}$", "$x$", "$5 and $10", "a_b^c"])
def test_labels_are_drawn_as_literal_text(token):
    w = np.full((3, 3), 1 / 3)
    tokens = [token, "b", "c"]
    for fig in (viz.heatmap(w, tokens, tokens, title=token).figure, viz.heads(w[None], tokens),
                viz.layers([w[None]], tokens)):
        fig.canvas.draw()                        # the draw itself raised before
        shown = [t for ax in fig.axes for t in ax.get_xticklabels() + ax.get_yticklabels()]
        drawn = [t for t in shown if t.get_text() == token]
        assert drawn and not any(t.get_parse_math() for t in drawn)
        matplotlib.pyplot.close(fig)


# Label counts were not checked (issue 12, item 5): one label short drew a
# grid whose last row and column had none.
def test_label_count_mismatch_names_argument_and_lengths():
    w = maps()
    with pytest.raises(ValueError, match=r"tokens has 5 labels but the map has 6"):
        viz.heads(w, TOKENS[:-1])
    with pytest.raises(ValueError, match=r"x_labels has 5 labels but the map has 6 key"):
        viz.heatmap(w[0], TOKENS[:-1], TOKENS)
    with pytest.raises(ValueError, match=r"y_labels has 7 labels but the map has 6 query"):
        viz.heatmap(w[0], TOKENS, TOKENS + ["!"])
    with pytest.raises(ValueError, match=r"tokens has 5 labels"):
        viz.layers([w], TOKENS[:-1])
    with pytest.raises(TypeError, match="tokens must be a sequence of str"):
        viz.heads(w, "the cat sat on the mat")
    with pytest.raises(ValueError, match="cross-attention"):
        viz.heads(np.full((1, 2, 3), 1 / 3), ["a", "b"])


# Issue 12, item 7: head_view with no tokens blamed top_k, an inf weight put
# -9223372036854775808 into the page, a lone surrogate in a title made
# save_html raise UnicodeEncodeError.
def test_head_view_messages_and_unwritable_text(tmp_path):
    w = maps()
    with pytest.raises(ValueError, match="tokens is empty"):
        viz.head_view(np.zeros((2, 0, 0)), [])
    bad = w.copy()
    bad[1, 2, 0] = np.inf
    with pytest.raises(ValueError, match=r"weights\[0\] holds inf at head 1, query 2, key 0"):
        viz.head_view(bad, TOKENS)
    view = viz.head_view(w, TOKENS[:-1] + ["bad\udce9"], title="caf\udce9")
    path = view.save_html(tmp_path / "view.html")
    page = path.read_text(encoding="utf-8")
    assert "caf\ufffd" in page          # the title, as text
    assert "bad\\ufffd" in page         # the token, inside the page's JSON


# Regression: viz's figure class (AttnpyFigure, which Jupyter shows once) was
# local to a function, and its figures could not be pickled.
def test_figures_pickle_like_matplotlibs():
    import pickle
    w = np.full((2, 3, 3), 1 / 3)
    for fig in (viz.heads(w), viz.heatmap(w[0]).figure, viz.plot_head_stats(w)):
        again = pickle.loads(pickle.dumps(fig))
        assert type(again) is type(fig) and len(again.axes) == len(fig.axes)

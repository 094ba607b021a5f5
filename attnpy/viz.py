"""Pictures of attention: heat maps, per-head grids, whole models, head
statistics and attention rollout. Needs matplotlib (``pip install matplotlib``, or
``pip install ".[viz]"`` in attnpy's source tree).

Every figure function returns what it drew on (an Axes, or a Figure for
grids), so it can be adjusted or saved with ``savefig`` as PNG, SVG or PDF.
The statistics are NumPy on the weights the core returned; nothing here
computes attention.
"""
from __future__ import annotations

import html
import json
import uuid
from pathlib import Path

import numpy as np

__all__ = ["heatmap", "heads", "layers", "head_stats", "induction_targets", "induction_score",
           "plot_head_stats", "rollout", "head_view", "HeadView"]

ANNOTATE_MAX = 12   # maps up to this many rows and columns get their values printed
HATCH_MAX = 2000    # above this many masked cells, the grey overlay alone marks them
LABELS_MAX = 60     # above this many tokens, every k-th label is shown (at most 60)


def _plt():
    try:
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - exercised only without matplotlib
        raise ImportError("attnpy.viz needs matplotlib: pip install matplotlib (or, in "
                          "attnpy's source tree, pip install '.[viz]')") from e
    return plt


def _subplots(plt, *args, **kwargs):
    """plt.subplots for the figures viz returns: in a notebook each is shown
    once, whether it is the cell's value or not (see _show_once)."""
    made = plt.subplots(*args, FigureClass=_figure_class(), **kwargs)
    _show_once()  # after: pyplot loads its backend (and its printers) with a first figure
    return made


_FIGURE_CLASS = None


def _figure_class():
    """AttnpyFigure, made on first use (matplotlib is imported lazily)."""
    global _FIGURE_CLASS
    if _FIGURE_CLASS is None:
        from matplotlib.figure import Figure

        class AttnpyFigure(Figure):
            """A Figure shown once by Jupyter's inline backend (see _show_once)."""

        # pickled by name as attnpy.viz.AttnpyFigure (found by __getattr__ below)
        AttnpyFigure.__module__, AttnpyFigure.__qualname__ = __name__, "AttnpyFigure"
        _FIGURE_CLASS = AttnpyFigure
    return _FIGURE_CLASS


def __getattr__(name):
    if name == "AttnpyFigure":
        return _figure_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_REGISTERED = set()   # the IPython formatters that know AttnpyFigure


def _show_once():
    """A figure that is a cell's value is drawn by IPython's formatter and then
    again by the inline backend, which draws every open pyplot figure at the
    cell's end: shown twice. For viz's figures, the formatter draws it and
    closes it in pyplot, so the backend's flush skips it; an assigned figure
    (or a line ending in ';') is not formatted and the flush shows it once.
    Registered once per formatter; the Figure printer of the moment (png,
    svg, ...) is looked up at each drawing, so later %config changes hold."""
    try:
        from IPython import get_ipython
        formatters = getattr(getattr(get_ipython(), "display_formatter", None),
                             "formatters", {})
        from matplotlib.figure import Figure
        for mime, fmt in formatters.items():
            if id(fmt) in _REGISTERED or mime == "text/plain":
                continue
            try:
                fmt.lookup_by_type(Figure)    # a format the backend draws figures in
            except KeyError:
                continue
            fmt.for_type(_figure_class(), lambda fig, fmt=fmt: _draw_and_close(fig, fmt))
            _REGISTERED.add(id(fmt))
    except Exception:  # no IPython, or one unlike the expected: figures as plain ones
        return


def _draw_and_close(fig, fmt):
    import matplotlib
    from matplotlib.figure import Figure
    try:
        draw = fmt.lookup_by_type(Figure)  # the inline backend's printer for this format
    except KeyError:
        return None                        # none now: this format shows nothing
    if "inline" in matplotlib.get_backend():  # only that backend flushes open figures
        _plt().close(fig)
    return draw(fig)


def _as_maps(weights, name, ndim):
    w = np.asarray(weights)
    if w.ndim != ndim or not np.issubdtype(w.dtype, np.floating):
        shape = {2: "(L, S)", 3: "(H, L, S)"}[ndim]
        raise ValueError(f"{name} must be a float array of shape {shape}; got {w.dtype} "
                         f"{w.shape}")
    return w


def _labels(labels, n, name, axis):
    """labels as a list of str, checked to be one per row or column: n of them."""
    if labels is None:
        return None
    if isinstance(labels, str):
        raise TypeError(f"{name} must be a sequence of str, one per {axis}; got the string "
                        f"{labels!r} (split it into tokens first)")
    labels = [str(t) for t in labels]
    if len(labels) != n:
        raise ValueError(f"{name} has {len(labels)} labels but the map has {n} {axis}s: "
                         f"pass one label per {axis}")
    return labels


def _set_tick_labels(ax, which, labels, **text):
    """Tick labels drawn as the text they are: tokens such as '$x$' or
    '$5 and $10' are not mathtext (parse_math=False)."""
    ticks, shown = _ticks(labels)
    getattr(ax, f"set_{which}ticks")(ticks, shown, parse_math=False, **text)


def _window(w, crop):
    """crop=(rows, cols): two slices (or None) applied to the last two axes."""
    if crop is None:
        return w, slice(None), slice(None)
    rows, cols = crop
    rows = rows if rows is not None else slice(None)
    cols = cols if cols is not None else slice(None)
    return w[..., rows, cols], rows, cols


def _ticks(labels):
    """Tick positions and labels; long inputs get every k-th label, so that the
    labels stay readable and their number stays bounded."""
    step = max(1, -(-len(labels) // LABELS_MAX))
    ticks = range(0, len(labels), step)
    return ticks, [labels[i] for i in ticks]


def heatmap(weights, x_labels=None, y_labels=None, ax=None, *, masked=None, crop=None,
            cmap="viridis", vmin=0.0, vmax=None, annotate=None, colorbar=True, title=None):
    """One attention map: queries down, keys across.

    Parameters
    ----------
    weights : array_like, shape (L, S)
    x_labels : sequence of str, length S, optional
        Key tokens (columns).
    y_labels : sequence of str, length L, optional
        Query tokens (rows).
    ax : matplotlib Axes, optional
    masked : array_like of bool, shape (L, S), optional
        True where the key was masked: those cells are drawn hatched grey, so
        that a masked key and a key with a tiny weight look different.
    crop : (slice or None, slice or None), optional
        Rows and columns to draw, for long inputs (labels follow).
    annotate : bool, optional
        Print the values on the cells; default for maps of at most 12 x 12.
    vmin, vmax : float
        Colour scale; ``vmax`` defaults to the map's maximum.

    Returns
    -------
    matplotlib Axes
    """
    plt = _plt()
    w = _as_maps(weights, "weights", 2)
    x_labels = _labels(x_labels, w.shape[1], "x_labels", "key column")
    y_labels = _labels(y_labels, w.shape[0], "y_labels", "query row")
    w, rows, cols = _window(w, crop)
    L, S = w.shape
    if ax is None:
        # grows with the tokens up to a page: longer inputs get smaller cells
        _, ax = _subplots(plt, figsize=(min(14.0, max(3.0, 0.45 * S + 1.5)),
                                      min(12.0, max(2.5, 0.4 * L + 1.0))),
                             constrained_layout=True)
    vmax = float(np.nanmax(w)) if vmax is None and w.size else (1.0 if vmax is None else vmax)
    im = ax.imshow(w, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    m = None
    if masked is not None:
        m = np.asarray(masked, bool)
        m = np.broadcast_to(m, np.asarray(weights).shape)[rows, cols]
        overlay = np.ma.masked_where(~m, np.ones(m.shape))
        ax.imshow(overlay, cmap="Greys", vmin=0, vmax=2.5, aspect="auto",
                  interpolation="nearest")
        ys, xs = np.nonzero(m)
        if len(ys) <= HATCH_MAX:                  # one patch per cell: only for small maps
            for y, x in zip(ys, xs):
                ax.add_patch(plt.Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, hatch="///",
                                           edgecolor="0.45", linewidth=0))
    if x_labels is not None:
        _set_tick_labels(ax, "x", x_labels[cols], rotation=90)
    if y_labels is not None:
        _set_tick_labels(ax, "y", y_labels[rows])
    if annotate is None:
        annotate = L <= ANNOTATE_MAX and S <= ANNOTATE_MAX
    if annotate:
        for (y, x), val in np.ndenumerate(w):
            if m is not None and m[y, x]:
                continue                                # masked: hatched, no number
            ax.text(x, y, f"{val:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if val < 0.6 * vmax else "black")
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    if title:
        ax.set_title(title, parse_math=False)
    if colorbar:
        ax.figure.colorbar(im, ax=ax, shrink=0.85, label="weight")
    return ax


def heads(weights, tokens=None, *, cols=None, masked=None, crop=None, cmap="viridis",
          titles=None, figsize=None):
    """A grid of per-head maps on one colour scale.

    Parameters
    ----------
    weights : array_like, shape (H, L, S)
        One head per map (any number of heads).
    tokens : sequence of str, optional
        Labels for queries and keys (self-attention: L = S).
    cols : int, optional
        Maps per row; default ``ceil(sqrt(H))``.

    Returns
    -------
    matplotlib Figure
    """
    plt = _plt()
    w = _as_maps(weights, "weights", 3)
    H = w.shape[0]
    if tokens is not None:
        if w.shape[1] != w.shape[2]:
            raise ValueError(f"tokens label both queries and keys, but the maps are "
                             f"{w.shape[1]} x {w.shape[2]}: use heatmap(w[h], x_labels, "
                             f"y_labels) for cross-attention")
        tokens = _labels(tokens, w.shape[1], "tokens", "token")
    cols = cols or max(1, int(np.ceil(np.sqrt(H))))
    rows = int(np.ceil(H / cols))
    shown, _, _ = _window(w, crop)
    L, S = shown.shape[-2:]
    size = figsize or (cols * min(6.0, max(2.4, 0.3 * S + 1.2)),
                       rows * min(5.5, max(2.2, 0.28 * L + 1.0)))
    fig, axes = _subplots(plt, rows, cols, figsize=size, squeeze=False, constrained_layout=True)
    vmax = float(np.nanmax(shown)) if shown.size else 1.0
    for h, ax in enumerate(axes.flat):
        if h >= H:
            ax.axis("off")
            continue
        heatmap(w[h], tokens, tokens, ax=ax, masked=None if masked is None else
                np.broadcast_to(masked, w.shape)[h], crop=crop, cmap=cmap, vmax=vmax,
                annotate=False, colorbar=False,
                title=titles[h] if titles is not None else f"head {h}")
    fig.colorbar(axes.flat[0].images[0], ax=axes, shrink=0.8, label="weight")
    return fig


def layers(list_of_weights, tokens=None, *, cmap="viridis", thumb=1.3):
    """A layers x heads grid of thumbnails for a whole model.

    Parameters
    ----------
    list_of_weights : sequence of array_like, each shape (H, L, S)
        One entry per layer (e.g. ``[res.weights[0] for res in results]``).
    tokens : sequence of str, optional
        Shown on the first column's rows and the last row's columns.

    Returns
    -------
    matplotlib Figure
    """
    plt = _plt()
    maps = [_as_maps(w, f"list_of_weights[{i}]", 3) for i, w in enumerate(list_of_weights)]
    if not maps:
        raise ValueError("list_of_weights is empty")
    n_layers, n_heads = len(maps), max(m.shape[0] for m in maps)
    if tokens is not None:
        for i, m in enumerate(maps):
            _labels(tokens, m.shape[1], "tokens", f"query row of list_of_weights[{i}]")
            _labels(tokens, m.shape[2], "tokens", f"key column of list_of_weights[{i}]")
        tokens = [str(t) for t in tokens]
    fig, axes = _subplots(plt, n_layers, n_heads,
                          figsize=(thumb * n_heads + 1, thumb * n_layers + 0.5),
                          squeeze=False, constrained_layout=True)
    for i, m in enumerate(maps):
        for h in range(n_heads):
            ax = axes[i, h]
            ax.set_xticks([])
            ax.set_yticks([])
            if h >= m.shape[0]:
                ax.axis("off")
                continue
            ax.imshow(m[h], cmap=cmap, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
            if tokens is not None and h == 0:
                _set_tick_labels(ax, "y", tokens, fontsize=6)
            if tokens is not None and i == n_layers - 1:
                _set_tick_labels(ax, "x", tokens, rotation=90, fontsize=6)
            if i == 0:
                ax.set_title(f"head {h}", fontsize=8)
            if h == 0:
                ax.set_ylabel(f"layer {i}", fontsize=8)
    return fig


def head_stats(weights):
    """Numbers that describe what each head does.

    Parameters
    ----------
    weights : array_like, shape (..., H, L, S)
        Leading dims (batch, layers) are kept.

    Returns
    -------
    dict of str to ndarray, each of shape (..., H)
        ``entropy``: mean over queries of -sum_j w log w (nats; 0 = one key,
        log S = uniform). ``distance``: mean over queries of sum_j w |i - j|.
        ``previous``: mean weight on key i - 1 (queries 1..L-1).
        ``first``: mean weight on key 0.
        Fully masked rows (all zero) count as zero everywhere.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim < 3:
        raise ValueError(f"weights must have shape (..., H, L, S); got {w.shape}")
    L, S = w.shape[-2:]
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(w > 0, w * np.log(w), 0.0)
    entropy = -plogp.sum(-1).mean(-1)
    i = np.arange(L)[:, None]
    j = np.arange(S)[None, :]
    distance = (w * np.abs(i - j)).sum(-1).mean(-1)
    previous = (np.diagonal(w[..., 1:, :], offset=0, axis1=-2, axis2=-1).mean(-1)
                if L > 1 and S > 1 else np.zeros(w.shape[:-2]))
    first = w[..., 0].mean(-1) if S else np.zeros(w.shape[:-2])
    return {"entropy": entropy, "distance": distance, "previous": previous, "first": first}


def induction_targets(tokens):
    """Where an induction head looks: the token after each earlier occurrence.

    Parameters
    ----------
    tokens : array_like of int, shape (..., L)

    Returns
    -------
    ndarray of bool, shape (..., L, L)
        ``targets[..., i, j]`` is True when ``j = k + 1`` for some ``k < i``
        with ``tokens[k] == tokens[i]``: query ``i``'s token occurred at
        ``k`` before, and an induction head copies what came next. So
        ``j <= i``, and a row is all False when its token is new.
    """
    t = np.asarray(tokens)
    if t.ndim < 1 or t.dtype.kind not in "iub":
        raise TypeError(f"tokens must be an integer array of shape (..., L); got dtype "
                        f"{t.dtype} and shape {t.shape}")
    L = t.shape[-1]
    same = t[..., :, None] == t[..., None, :]                 # (..., query i, earlier k)
    earlier = np.tril(np.ones((L, L), bool), -1)              # k < i
    occurred = same & earlier
    targets = np.zeros(occurred.shape, bool)
    targets[..., 1:] = occurred[..., :-1]                     # key j = k + 1
    return targets


def induction_score(weights, tokens):
    """How much each head acts as an induction head on ``tokens``.

    Parameters
    ----------
    weights : array_like, shape (..., H, L, L)
        Self-attention maps over ``tokens``.
    tokens : array_like of int, shape (L,) or (..., L)
        The input ids; leading dims broadcast against the weights' dims
        before ``H`` (a batch ``(N, L)`` with weights ``(N, H, L, L)``).

    Returns
    -------
    ndarray, shape (..., H)
        The mean, over the queries whose token occurred earlier (for a
        repeated sequence: the repeated half), of the weight on the keys
        :func:`induction_targets` marks. 1: a perfect induction head; 0
        when no query's token occurred before.

    See Also
    --------
    head_stats : its ``previous`` is the previous-token score, the other
        half of the induction circuit.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim < 3 or w.shape[-1] != w.shape[-2]:
        raise ValueError(f"weights must have shape (..., H, L, L); got {w.shape}")
    targets = induction_targets(tokens)
    if targets.shape[-1] != w.shape[-1]:
        raise ValueError(f"tokens must have length L = {w.shape[-1]} (the weights' last axis); "
                         f"got shape {np.shape(tokens)}")
    lead, batch = targets.shape[:-2], w.shape[:-3]
    try:
        fits = np.broadcast_shapes(lead, batch) == batch
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(f"tokens' leading dims {lead} must broadcast to the weights' dims "
                         f"before H, {batch} (weights {w.shape}: (..., H, L, L)); got tokens "
                         f"of shape {np.shape(tokens)}")
    targets = targets[..., None, :, :]                        # broadcast over heads
    per_query = (w * targets).sum(-1)                         # (..., H, L)
    counted = np.broadcast_to(targets.any(-1), per_query.shape)
    n = counted.sum(-1)
    total = np.where(counted, per_query, 0.0).sum(-1)
    return np.divide(total, n, out=np.zeros(total.shape), where=n > 0)


def plot_head_stats(weights, *, figsize=None):
    """The four statistics of :func:`head_stats` as small multiples (one bar
    per head). weights: shape (H, L, S). Returns the Figure."""
    plt = _plt()
    stats = head_stats(_as_maps(weights, "weights", 3))
    fig, axes = _subplots(plt, 1, 4, figsize=figsize or (12, 2.6), constrained_layout=True)
    titles = {"entropy": "entropy (nats)", "distance": "mean distance",
              "previous": "weight on previous token", "first": "weight on first token"}
    for ax, (name, values) in zip(axes, stats.items()):
        ax.bar(range(len(values)), values, color="#4c72b0")
        ax.set_title(titles[name], fontsize=9)
        ax.set_xlabel("head")
    return fig


def rollout(list_of_weights, *, head_fusion="mean", residual=True):
    """Attention rollout (Abnar & Zuidema, 2020): how much each input token
    reaches each position through all layers.

    Per layer the heads are fused (mean, max or min), the residual connection
    is added as ``0.5 A + 0.5 I`` and rows are renormalised; the layers'
    matrices are multiplied from the first to the last:
    ``R = A_last @ ... @ A_first``.

    Parameters
    ----------
    list_of_weights : sequence of array_like, each shape (H, L, L)
        Self-attention maps, first layer first.
    head_fusion : {"mean", "max", "min"}
    residual : bool, default True

    Returns
    -------
    ndarray, shape (L, L)
        Row i: where position i's representation comes from.
    """
    fuse = {"mean": np.mean, "max": np.max, "min": np.min}.get(head_fusion)
    if fuse is None:
        raise ValueError(f"head_fusion must be 'mean', 'max' or 'min'; got {head_fusion!r}")
    result = None
    for idx, weights in enumerate(list_of_weights):
        w = _as_maps(weights, f"list_of_weights[{idx}]", 3).astype(np.float64)
        if w.shape[-1] != w.shape[-2]:
            raise ValueError(f"rollout needs self-attention maps (L = S); layer {idx} is "
                             f"{w.shape[-2]} x {w.shape[-1]}")
        a = fuse(w, axis=0)
        if residual:
            a = 0.5 * a + 0.5 * np.eye(a.shape[0])
        sums = a.sum(-1, keepdims=True)
        a = np.divide(a, sums, out=np.zeros_like(a), where=sums > 0)
        result = a if result is None else a @ result
    if result is None:
        raise ValueError("list_of_weights is empty")
    return result


# --- the interactive head view ----------------------------------------------

# one colour per head (cycled past 12): matplotlib's tab10 plus two
HEAD_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
               "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#637939"]

_STYLE = """
.attnpy-view { font: 13px sans-serif; color: #222; }
.attnpy-view .attnpy-controls { margin-bottom: 6px; }
.attnpy-view .attnpy-head { border: 0; color: white; margin-right: 2px; min-width: 22px;
  cursor: pointer; border-radius: 3px; }
.attnpy-view .attnpy-note { margin-left: 8px; color: #666; }
.attnpy-view .attnpy-hint { color: #666; margin-bottom: 4px; }
.attnpy-view .attnpy-scroll { overflow: auto; display: inline-block; }
.attnpy-view .attnpy-token { cursor: default; fill: #222; }
.attnpy-view .attnpy-weight { font-family: monospace; }
"""


class HeadView:
    """An interactive head view: shows itself in Jupyter (classic Notebook and
    JupyterLab) and writes a standalone page with :meth:`save_html`.

    The HTML holds its data, its script (plain JavaScript and SVG) and its
    style: no CDN, no internet, no require.js. Made by :func:`head_view`.
    """

    def __init__(self, payload, title):
        self._payload = payload
        self.title = _text(title)

    def _fragment(self):
        root_id = "attnpy-hv-" + uuid.uuid4().hex[:12]
        # JSON inside <script>: "<", ">" and "&" escaped so a token such as
        # "</script>" cannot end the element
        data = (json.dumps(self._payload, separators=(",", ":"))
                .replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))
        script = _SCRIPT.replace("ATTNPY_ROOT_ID", root_id)
        return (f'<div class="attnpy-view" id="{root_id}">'
                f'<style>{_STYLE}</style>'
                f'<div class="attnpy-title"><b>{html.escape(self.title)}</b></div>'
                f'<script type="application/json" class="attnpy-data">{data}</script>'
                f'</div><script>{script}</script>')

    def _repr_html_(self):
        return self._fragment()

    def to_html(self):
        """The whole standalone page, as a string."""
        return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
                f"<title>{html.escape(self.title)}</title></head>\n<body>\n"
                f"{self._fragment()}\n</body></html>\n")

    def save_html(self, path):
        """Write the view as one self-contained HTML file; returns the path."""
        path = Path(path)
        path.write_text(self.to_html(), encoding="utf-8")
        return path

    def __repr__(self):
        layers = self._payload["layers"]
        return (f"HeadView({self.title!r}: {len(layers)} layer(s), "
                f"{len(self._payload['tokens'])} x {len(self._payload['key_tokens'])} tokens)")


_SCRIPT = (Path(__file__).with_name("_headview.js")).read_text(encoding="utf-8")


def _text(s):
    """str(s) that UTF-8 can write: a lone surrogate (from a bad decode) becomes
    U+FFFD instead of making save_html raise UnicodeEncodeError."""
    return str(s).encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _top_lines(w, top_k, min_weight):
    """The lines of one layer, w of shape (H, L, S): for every head and query
    its top_k keys with weight >= min_weight, as a flat int list
    [query, key, head, round(1000 * weight), ...]. At most H * L * top_k
    lines, so long inputs stay linear in L."""
    H, L, S = w.shape
    k = min(top_k, S)
    if k == 0:
        return []
    idx = np.argpartition(-np.nan_to_num(w, nan=0.0), k - 1, axis=-1)[..., :k]   # (H, L, k)
    vals = np.take_along_axis(w, idx, axis=-1)
    h, q, j = np.nonzero(vals >= min_weight)
    keys = idx[h, q, j]
    milli = np.rint(vals[h, q, j] * 1000).astype(np.int64)
    return np.stack([q, keys, h, milli], axis=1).ravel().tolist()


def head_view(weights, tokens, key_tokens=None, *, layer_names=None, top_k=None,
              min_weight=0.01, max_lines=20000, width=720, row_height=26, font_size=15,
              max_height=640, title="attention"):
    """An interactive head view: hover a token to see what it attends to.

    Parameters
    ----------
    weights : array_like, shape (H, L, S) or (layers, H, L, S), or a list of (H, L, S)
        Attention weights per head (for example ``res.weights[0]`` from
        :class:`attnpy.MultiheadAttention` with ``average_attn_weights=False``),
        one entry per layer for a whole model.
    tokens : sequence of str, length L
        The queries (left column).
    key_tokens : sequence of str, length S, optional
        The keys (right column); default ``tokens`` (self-attention).
    layer_names : sequence of str, optional
        Names in the layer menu; default ``layer 0``, ``layer 1``, ...
    top_k : int, optional
        Lines kept per (head, query): its ``top_k`` largest weights. Default
        all keys up to S = 64, else 16: the page then grows linearly with L.
    min_weight : float, default 0.01
        Lines below this weight are left out (they would be invisible).
    max_lines : int, default 20000
        Above this many lines in a layer, lines are drawn only for the hovered
        token.
    width : int, default 720
        Pixels across: the two token columns, their weights and the lines
        between (at least room for the labels and 120 px of lines).
    row_height, font_size : int, default 26 and 15
        Pixels per token row, and the tokens' font size.
    max_height : int, default 640
        Pixels; longer inputs scroll.

    Returns
    -------
    HeadView
        Shows itself in Jupyter; ``.save_html(path)`` writes a standalone page.
    """
    if isinstance(weights, (list, tuple)):
        maps = [_as_maps(w, f"weights[{i}]", 3) for i, w in enumerate(weights)]
    else:
        w = np.asarray(weights)
        if w.ndim == 3:
            maps = [_as_maps(w, "weights", 3)]
        elif w.ndim == 4:
            maps = [_as_maps(m, f"weights[{i}]", 3) for i, m in enumerate(w)]
        else:
            raise ValueError("weights must have shape (H, L, S) or (layers, H, L, S); "
                             f"got {w.shape}")
    if not maps:
        raise ValueError("weights is empty: no layer to show")
    tokens = [_text(t) for t in tokens]
    key_tokens = tokens if key_tokens is None else [_text(t) for t in key_tokens]
    if not tokens or not key_tokens:
        which = "tokens" if not tokens else "key_tokens"
        raise ValueError(f"{which} is empty: the head view needs one token per query row "
                         "and per key column")
    for i, m in enumerate(maps):
        if m.shape[1:] != (len(tokens), len(key_tokens)):
            raise ValueError(f"weights[{i}] has shape {m.shape}; with {len(tokens)} tokens "
                             f"and {len(key_tokens)} key_tokens it must be "
                             f"(H, {len(tokens)}, {len(key_tokens)})")
        if np.isinf(m).any():
            h, q, k = (int(x) for x in np.argwhere(np.isinf(m))[0])
            raise ValueError(f"weights[{i}] holds {m[h, q, k]} at head {h}, query {q}, key "
                             f"{k}: attention weights are between 0 and 1")
    if layer_names is None:
        layer_names = [f"layer {i}" for i in range(len(maps))]
    elif len(layer_names) != len(maps):
        raise ValueError(f"layer_names has {len(layer_names)} names for {len(maps)} layers")
    S = len(key_tokens)
    if top_k is None:
        top_k = S if S <= 64 else 16
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1; got {top_k}")
    for name, value, least in (("width", width, 1), ("row_height", row_height, 4),
                               ("font_size", font_size, 4), ("max_height", max_height, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise ValueError(f"{name} must be an int of at least {least} (pixels); got {value!r}")
    longest = max([len(t) for t in tokens + key_tokens] + [1])
    label_width = min(int(0.65 * font_size * longest) + 12, 300)  # a wide glyph: 0.65 em
    weight_width = int(3.3 * font_size) + 8    # "0.000" in monospace: 5 x 0.6 em, and a gap
    payload = {
        "tokens": tokens,
        "key_tokens": key_tokens,
        "layers": [{"name": _text(name), "heads": int(m.shape[0]),
                    "lines": _top_lines(m.astype(np.float64), top_k, min_weight)}
                   for name, m in zip(layer_names, maps)],
        "colors": HEAD_COLORS,
        "label_width": label_width,
        "gap": max(120, int(width) - 2 * (label_width + weight_width)),
        "weight_width": weight_width,
        "row_height": int(row_height),
        "font_size": int(font_size),
        "max_lines": int(max_lines),
        "max_height": int(max_height),
    }
    return HeadView(payload, title)

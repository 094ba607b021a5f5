"""Short text and HTML representations of results, for notebooks: the shapes
and dtypes of what a call returned (printing every array of an (8, 64, 64)
result was 9,174 characters), and the first head's map."""
import html

import numpy as np

from . import _core

MAP_CELLS = 16   # the HTML map shows at most this many queries and keys


def _describe(value):
    if isinstance(value, np.ndarray):
        return f"<{value.dtype} {value.shape}>"
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_describe(v)}" for k, v in value.items()) + "}"
    if hasattr(value, "__dataclass_fields__") or hasattr(value, "_fields"):
        return type(value).__name__ + "(...)"
    return type(value).__name__


def short_repr(obj, fields):
    """TypeName(field=<dtype shape>, ..., kernel='avx512')."""
    body = [f"{f}={_describe(getattr(obj, f))}" for f in fields]
    kernel = getattr(obj, "kernel", None)
    if kernel is not None:
        reason = obj.kernel_reason
        body.append(f"kernel={kernel!r}" if reason == "use_tiled" else
                    f"kernel={kernel!r} ({reason.removeprefix('use_ref:')})")
    return f"{type(obj).__name__}({', '.join(body)})"


class Ran:
    """The kernel a result was computed by, for results that keep the code
    _core.sdpa returned in ``_ran`` (None: not known)."""

    @property
    def kernel(self):
        """The kernel that computed the attention: 'avx512', 'avx2',
        'neon', 'baseline' or 'reference' (None when not known)."""
        ran = self.__dict__.get("_ran")
        return None if ran is None else _core.ran_name(ran)[0]

    @property
    def kernel_reason(self):
        """Why that kernel: the planner's reason, 'use_tiled' for a tiled
        kernel, else why the reference ran ('use_ref:selected',
        'use_ref:qk_overflow', ...), or 'empty' for nothing to compute."""
        ran = self.__dict__.get("_ran")
        return None if ran is None else _core.ran_name(ran)[1]


def _first_map(weights):
    """The first head's (L, S) map of a weights array, or None."""
    if not isinstance(weights, np.ndarray) or weights.ndim < 2 or weights.size == 0:
        return None
    return weights.reshape((-1,) + weights.shape[-2:])[0]


def html_repr(obj, fields, weights):
    """The short repr, and the first head's weights as a small coloured table."""
    text = f"<pre>{html.escape(short_repr(obj, fields))}</pre>"
    w = _first_map(weights)
    if w is None:
        return text
    L, S = w.shape
    shown = np.asarray(w[:MAP_CELLS, :MAP_CELLS], dtype=np.float64)
    top = np.nanmax(shown) if np.isfinite(shown).any() else 1.0
    top = top if top > 0 else 1.0
    rows = []
    for i, row in enumerate(shown):
        cells = []
        for j, x in enumerate(row):
            if np.isfinite(x):
                level = int(round(255 * (1 - min(max(x / top, 0.0), 1.0))))
                colour = f"#{level:02x}{level:02x}ff"
            else:
                colour = "#e33"                     # NaN or inf: impossible to miss
            cells.append(f'<td title="{i},{j}: {x:.4g}" style="background:{colour}"></td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    note = ("" if (L, S) == shown.shape else
            f" (the first {shown.shape[0]} x {shown.shape[1]} of {L} x {S})")
    return (f"{text}<div>weights of the first head{note}; darker = more weight, "
            f"hover for (query, key): value</div>"
            f"<style>.attnpy-map td{{width:12px;height:12px;padding:0}}</style>"
            f"<table class=\"attnpy-map\" style=\"border-collapse:collapse\">"
            f"{''.join(rows)}</table>")

"""Numerical parity of attnpy.scaled_dot_product_attention.

Every case is compared with the float64 NumPy reference (tests/reference.py)
and with torch: the output with torch's SDPA, the weights with
torch.softmax(q @ k.mT * scale + mask, -1). The torch semantics relied on are
themselves checked against the reference first (the test_torch_* tests).

The matrix is deterministic: every case seeds its own generator from its id.
"""
import json
import math
import zlib
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pytest

import attnpy
from optional_torch import F, torch
from reference import sdpa_reference

TOL = {
    np.float32: dict(atol=1e-5, rtol=1e-5),
    np.float64: dict(atol=1e-12, rtol=1e-12),
}
# need_weights=False (streaming kernel) against need_weights=True output
# need_weights=False vs True. In float32 the fast kernels sum the two paths in
# different orders (online rescaling vs one normalisation): a few ulps apart,
# hence a relative part; still 5x tighter than TOL.
STREAM_TOL = {np.float32: dict(atol=1e-6, rtol=2e-6), np.float64: dict(atol=1e-13, rtol=0)}
DTYPES = (np.float32, np.float64)
ERRORS_JSON = "/tmp/attnpy_parity_errors.json"

NONC_LAYOUTS = ("transposed", "stepped", "reversed", "fortran", "mixed")


# --------------------------------------------------------------------------
# helpers: arrays with a given memory layout


def seeded_rng(*parts):
    """A generator seeded from the parts' text: deterministic across runs."""
    return np.random.default_rng(zlib.crc32("|".join(map(str, parts)).encode()))


def relayout(x, layout):
    """An array with x's values, shape and dtype but the given memory layout.

    c: C-contiguous. fortran: Fortran order. transposed: built as (..., n, m)
    and swapped to (..., m, n). stepped: every axis is a [::2] slice of a
    buffer twice as large whose other elements are NaN (True for bool).
    reversed: every axis is a [::-1] view (negative strides).
    """
    x = np.asarray(x)
    if layout == "transposed" and x.ndim < 2:
        layout = "reversed"
    if layout == "c":
        y = np.array(x, order="C")
    elif layout == "fortran":
        y = np.array(x, order="F")
    elif layout == "transposed":
        y = np.ascontiguousarray(np.swapaxes(x, -1, -2)).swapaxes(-1, -2)
    elif layout == "stepped":
        big = np.empty(tuple(2 * n for n in x.shape), dtype=x.dtype)
        big[...] = True if x.dtype == np.bool_ else np.nan
        steps = (slice(None, None, 2),) * x.ndim
        big[steps] = x
        y = big[steps]
    elif layout == "reversed":
        flip = (slice(None, None, -1),) * x.ndim
        y = np.ascontiguousarray(x[flip])[flip]
    else:
        raise ValueError(layout)
    assert y.dtype == x.dtype and y.shape == x.shape and np.array_equal(y, x)
    return y


def root_buffer(a):
    """The ndarray that owns a view's memory (to check that nothing wrote to it)."""
    while isinstance(a, np.ndarray) and isinstance(a.base, np.ndarray):
        a = a.base
    return a


def snapshot(arrays):
    return [None if a is None else root_buffer(a).tobytes() for a in arrays]


def assert_untouched(arrays, before):
    for a, b in zip(arrays, before):
        if a is not None:
            assert root_buffer(a).tobytes() == b, "an input buffer was written"


# --------------------------------------------------------------------------
# the scenarios


@dataclass(frozen=True)
class Scenario:
    name: str
    q: tuple
    k: tuple
    v: tuple
    mask: Optional[str] = None  # "bool", "float", "float_neginf"
    mask_shape: Optional[tuple] = None
    dead_rows: bool = False  # force some fully masked rows in the mask
    is_causal: bool = False
    scale: Optional[float] = None
    gqa: bool = False
    views: bool = False  # pass q, k, v as np.broadcast_to views (stride 0)


SCENARIOS = [
    # shapes: 2-D, L != S, Ev != E, L = 1, S = 1, 0..3 leading dims
    Scenario("2d", (5, 8), (7, 8), (7, 8)),
    Scenario("2d_L1", (1, 8), (9, 8), (9, 3)),
    Scenario("2d_S1", (6, 4), (1, 4), (1, 5)),
    Scenario("3d_Ev_ne_E", (3, 5, 8), (3, 7, 8), (3, 7, 6)),
    Scenario("4d", (2, 3, 6, 16), (2, 3, 9, 16), (2, 3, 9, 8)),
    Scenario("5d", (2, 2, 2, 4, 8), (2, 2, 2, 5, 8), (2, 2, 2, 5, 3)),
    Scenario("L_gt_S", (2, 2, 11, 8), (2, 2, 3, 8), (2, 2, 3, 5)),
    Scenario("L1_S1", (2, 1, 1, 4), (2, 1, 1, 4), (2, 1, 1, 2)),
    Scenario("S_150", (1, 2, 3, 16), (1, 2, 150, 16), (1, 2, 150, 4)),
    # broadcast batch dims
    Scenario("bcast_kv_batch1", (3, 2, 4, 8), (1, 2, 6, 8), (1, 2, 6, 8)),
    Scenario("bcast_kv_view", (3, 2, 4, 8), (1, 2, 6, 8), (1, 2, 6, 5), views=True),
    Scenario("bcast_fewer_dims", (3, 2, 4, 8), (2, 6, 8), (6, 5)),
    Scenario("bcast_q_batch1", (1, 2, 4, 8), (3, 2, 6, 8), (3, 1, 6, 8)),
    Scenario("bcast_q_view", (1, 1, 4, 8), (3, 2, 6, 8), (3, 2, 6, 4), views=True),
    Scenario("bcast_q_2d", (4, 8), (2, 3, 6, 8), (3, 6, 5)),
    Scenario("bcast_head_only", (2, 4, 3, 8), (2, 1, 5, 8), (2, 1, 5, 8)),
    # masks
    Scenario("bool_LS", (2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 8), "bool", (5, 7)),
    Scenario("bool_full_dead", (2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 4), "bool",
             (2, 3, 5, 7), dead_rows=True),
    Scenario("bool_S", (2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 8), "bool", (7,)),
    Scenario("bool_B11S_dead", (3, 2, 4, 8), (3, 2, 6, 8), (3, 2, 6, 8), "bool",
             (3, 1, 1, 6), dead_rows=True),
    Scenario("bool_2d_dead", (6, 8), (9, 8), (9, 5), "bool", (6, 9), dead_rows=True),
    Scenario("float_1S", (2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 8), "float", (1, 7)),
    Scenario("float_H1S", (2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 8), "float", (3, 1, 7)),
    Scenario("float_neginf_dead", (2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 6),
             "float_neginf", (2, 3, 5, 7), dead_rows=True),
    Scenario("float_neginf_LS", (4, 6, 8), (4, 70, 8), (4, 70, 8), "float_neginf", (6, 70)),
    Scenario("bool_bcast_view", (3, 2, 4, 8), (1, 2, 6, 8), (1, 2, 6, 8), "bool",
             (2, 4, 6), dead_rows=True, views=True),
    # causal
    Scenario("causal_L_lt_S", (2, 2, 4, 8), (2, 2, 9, 8), (2, 2, 9, 6), is_causal=True),
    Scenario("causal_L_gt_S", (2, 2, 9, 8), (2, 2, 4, 8), (2, 2, 4, 6), is_causal=True),
    Scenario("causal_2d_long", (70, 8), (70, 8), (70, 3), is_causal=True),
    # grouped-query attention
    Scenario("gqa_4_2", (2, 4, 5, 8), (2, 2, 7, 8), (2, 2, 7, 6), gqa=True),
    Scenario("gqa_6_1_3d", (6, 5, 8), (1, 7, 8), (1, 7, 8), gqa=True),
    Scenario("gqa_4_2_causal", (2, 4, 6, 8), (2, 2, 9, 8), (2, 2, 9, 8), gqa=True,
             is_causal=True),
    Scenario("gqa_6_1_bool_dead", (2, 6, 5, 8), (2, 1, 7, 8), (2, 1, 7, 4), "bool",
             (6, 5, 7), dead_rows=True, gqa=True),
    Scenario("gqa_bcast_batch", (3, 4, 5, 8), (1, 2, 7, 8), (1, 2, 7, 8), gqa=True),
    Scenario("gqa_q_fewer_dims", (4, 5, 8), (2, 2, 7, 8), (2, 2, 7, 3), gqa=True),
    Scenario("gqa_equal_heads", (2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 8), gqa=True),
    # scale
    Scenario("scale_0.37", (2, 3, 5, 16), (2, 3, 7, 16), (2, 3, 7, 8), scale=0.37),
    Scenario("scale_1.5_float", (2, 2, 5, 8), (2, 2, 7, 8), (2, 2, 7, 8), "float", (5, 7),
             scale=1.5),
    Scenario("scale_int_2", (2, 5, 8), (2, 6, 8), (2, 6, 8), scale=2),
    Scenario("scale_neg_causal", (2, 5, 8), (2, 5, 8), (2, 5, 8), is_causal=True, scale=-0.5),
]


def make_inputs(sc, dtype, layout):
    """q, k, v and the keyword arguments for one case (deterministic)."""
    rng = seeded_rng(sc.name, np.dtype(dtype).name, layout)

    def lay():
        return NONC_LAYOUTS[rng.integers(4)] if layout == "mixed" else layout

    q = relayout(rng.standard_normal(sc.q).astype(dtype), lay())
    k = relayout(rng.standard_normal(sc.k).astype(dtype), lay())
    v = relayout(rng.standard_normal(sc.v).astype(dtype), lay())
    if sc.views:
        batch = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
        q, k, v = (np.broadcast_to(x, batch + x.shape[-2:]) for x in (q, k, v))
        assert 0 in q.strides + k.strides + v.strides  # really stride-0 views

    mask = None
    if sc.mask == "bool":
        mask = rng.random(sc.mask_shape) < 0.75
    elif sc.mask in ("float", "float_neginf"):
        mask = 2.0 * rng.standard_normal(sc.mask_shape)
        if sc.mask == "float_neginf":
            mask[rng.random(sc.mask_shape) < 0.3] = -np.inf
        mask = mask.astype(dtype)
    if mask is not None and sc.dead_rows:
        rows = mask.reshape(-1, mask.shape[-1])
        dead = rng.choice(len(rows), size=max(1, len(rows) // 4), replace=False)
        rows[dead] = False if mask.dtype == np.bool_ else -np.inf
    if mask is not None:
        mask = relayout(mask, lay())
    if mask is not None and sc.views:  # the mask as a stride-0 view of the weights' shape
        w_shape = np.broadcast_shapes(q.shape[:-2], k.shape[:-2]) + (q.shape[-2], k.shape[-2])
        mask = np.broadcast_to(mask, w_shape)
    kwargs = dict(attn_mask=mask, is_causal=sc.is_causal, scale=sc.scale, enable_gqa=sc.gqa)
    return q, k, v, kwargs


# --------------------------------------------------------------------------
# torch side


def to_torch(a):
    return torch.from_numpy(np.array(a, order="C", copy=True))  # writable copy


def torch_mask(mask):
    if mask is None:
        return None
    return to_torch(mask if mask.ndim >= 2 else mask[None])  # torch wants >= 2-D


def torch_sdpa(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    with torch.no_grad():
        return F.scaled_dot_product_attention(
            to_torch(q), to_torch(k), to_torch(v), attn_mask=torch_mask(attn_mask),
            is_causal=is_causal, scale=scale, enable_gqa=enable_gqa).numpy()


def torch_weights(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    """torch.softmax(q @ k.mT * scale + mask, -1); fully masked rows come out NaN."""
    tq, tk = to_torch(q), to_torch(k)
    L, S = q.shape[-2], k.shape[-2]
    if enable_gqa and q.ndim >= 3:
        tk = tk.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = tq @ tk.mT * scale
    tm = torch_mask(attn_mask)
    if is_causal:
        s = s.masked_fill(~torch.ones(L, S, dtype=torch.bool).tril(), -math.inf)
    elif tm is not None and tm.dtype == torch.bool:
        s = s.masked_fill(~tm, -math.inf)
    elif tm is not None:
        s = s + tm
    return torch.softmax(s, dim=-1).numpy()


# --------------------------------------------------------------------------
# comparisons


def max_err(actual, desired, dtype):
    """(max abs error, max of |a - d| / (atol + rtol |d|)); <= 1 means allclose."""
    actual = np.asarray(actual, dtype=np.float64)
    desired = np.asarray(desired, dtype=np.float64)
    if actual.size == 0:
        return 0.0, 0.0
    diff = np.abs(actual - desired)
    tol = TOL[dtype]["atol"] + TOL[dtype]["rtol"] * np.abs(desired)
    return float(diff.max()), float((diff / tol).max())


def assert_close(actual, desired, dtype, what):
    assert actual.shape == desired.shape, f"{what}: shape {actual.shape} != {desired.shape}"
    np.testing.assert_allclose(actual, desired, **TOL[dtype], err_msg=what, equal_nan=False)


def call(q, k, v, kwargs, need_weights=True, out=None):
    return attnpy.scaled_dot_product_attention(q, k, v, **kwargs, need_weights=need_weights,
                                               out=out)


def compare_case(q, k, v, kwargs):
    """All comparisons of one case; returns the errors and the streaming diff."""
    res = call(q, k, v, kwargs)
    res_nw = call(q, k, v, kwargs, need_weights=False)
    ref_out, ref_w = sdpa_reference(q, k, v, **kwargs)
    t_out = torch_sdpa(q, k, v, **kwargs)
    t_w = torch_weights(q, k, v, **kwargs)
    live = ref_w.sum(axis=-1) > 0  # rows with at least one key allowed
    return dict(
        res=res, res_nw=res_nw, ref_out=ref_out, ref_w=ref_w, t_out=t_out, t_w=t_w,
        live=live)


CASES = []
for _i, _sc in enumerate(SCENARIOS):
    for _dtype in DTYPES:
        for _layout in ("c", NONC_LAYOUTS[_i % 5], NONC_LAYOUTS[(_i + 2) % 5]):
            for _nw in (True, False):
                CASES.append(pytest.param(
                    _sc, _dtype, _layout, _nw,
                    id=f"{_sc.name}-{np.dtype(_dtype).name}-{_layout}-"
                       f"{'weights' if _nw else 'noweights'}"))


@pytest.mark.torch
@pytest.mark.parametrize("sc, dtype, layout, need_weights", CASES)
def test_parity(sc, dtype, layout, need_weights):
    q, k, v, kwargs = make_inputs(sc, dtype, layout)
    inputs = (q, k, v, kwargs["attn_mask"])
    before = snapshot(inputs)

    res = call(q, k, v, kwargs, need_weights=need_weights)
    assert_untouched(inputs, before)
    out, weights = res

    ref_out, ref_w = sdpa_reference(q, k, v, **kwargs)
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert_close(out, ref_out, dtype, "output vs float64 reference")
    assert_close(out, torch_sdpa(q, k, v, **kwargs), dtype, "output vs torch SDPA")

    dead = ref_w.sum(axis=-1) == 0  # fully masked rows
    assert np.all(out[dead] == 0), "a fully masked row has a non-zero output"

    if not need_weights:
        assert weights is None
        # the streaming kernel agrees with the materialising one
        out_w = call(q, k, v, kwargs, need_weights=True).output
        np.testing.assert_allclose(out, out_w, **STREAM_TOL[dtype],
                                   err_msg="need_weights=False vs need_weights=True")
        return

    assert weights.dtype == dtype and weights.shape == ref_w.shape
    assert_close(weights, ref_w, dtype, "weights vs float64 reference")
    assert np.all(weights[dead] == 0), "a fully masked row has non-zero weights"
    t_w = torch_weights(q, k, v, **kwargs)
    assert np.array_equal(np.isnan(t_w).all(axis=-1), dead)  # torch: NaN exactly there
    assert_close(weights[~dead], t_w[~dead], dtype, "weights vs torch softmax (live rows)")


def test_result_is_a_named_tuple():
    q = np.eye(3)
    res = attnpy.scaled_dot_product_attention(q, q, q)
    assert isinstance(res, attnpy.AttentionResult) and res._fields == ("output", "weights")
    out, weights = res
    assert out is res.output and weights is res.weights


def test_parity_matrix_size():
    """The matrix covers every layout in both dtypes, with and without weights."""
    ids = {(p.values[1], p.values[2], p.values[3]) for p in CASES}
    for dtype in DTYPES:
        for layout in ("c",) + NONC_LAYOUTS:
            for nw in (True, False):
                assert (dtype, layout, nw) in ids
    assert 300 <= len(CASES) <= 600


@pytest.mark.slow
@pytest.mark.torch
def test_max_errors_report():
    """Sweep every (scenario, dtype, layout); print and save the max errors."""
    report = {}
    for p in CASES:
        sc, dtype, layout, nw = p.values
        if not nw:
            continue
        q, k, v, kwargs = make_inputs(sc, dtype, layout)
        c = compare_case(q, k, v, kwargs)
        live = c["live"]
        r = report.setdefault(np.dtype(dtype).name, {
            "cases": 0, "output_vs_torch": [0.0, 0.0], "weights_vs_torch": [0.0, 0.0],
            "output_vs_reference": [0.0, 0.0], "weights_vs_reference": [0.0, 0.0],
            "torch_output_vs_reference": [0.0, 0.0], "noweights_vs_weights_output": 0.0})
        r["cases"] += 1
        pairs = {
            "output_vs_torch": (c["res"].output, c["t_out"]),
            "weights_vs_torch": (c["res"].weights[live], c["t_w"][live]),
            "output_vs_reference": (c["res"].output, c["ref_out"]),
            "weights_vs_reference": (c["res"].weights, c["ref_w"]),
            "torch_output_vs_reference": (c["t_out"], c["ref_out"]),
        }
        for key, (a, d) in pairs.items():
            err = max_err(a, d, dtype)
            r[key] = [max(r[key][0], err[0]), max(r[key][1], err[1])]
        r["noweights_vs_weights_output"] = max(
            r["noweights_vs_weights_output"],
            float(np.abs(c["res_nw"].output.astype(np.float64) - c["res"].output).max(
                initial=0.0)))

    summary = {dt: {key: (val[0] if isinstance(val, list) else val) for key, val in r.items()}
               for dt, r in report.items()}
    for dt, r in report.items():
        summary[dt]["max_tolerance_ratio"] = max(
            val[1] for key, val in r.items() if isinstance(val, list))
    with open(ERRORS_JSON, "w") as f:
        json.dump({"tolerances": {np.dtype(d).name: TOL[d] for d in DTYPES},
                   "max_abs_errors": summary}, f, indent=2)
    print("\nattnpy max abs errors (written to %s):" % ERRORS_JSON)
    for dt, r in summary.items():
        print(f"  {dt}: " + ", ".join(f"{key}={val:.3g}" for key, val in r.items()))

    assert set(report) == {"float32", "float64"}
    for dt, r in report.items():
        for key, val in r.items():
            if isinstance(val, list):
                assert val[1] <= 1.0, f"{dt} {key}: max abs error {val[0]:.3g} over tolerance"
        tol = STREAM_TOL[np.dtype(dt).type]
        assert r["noweights_vs_weights_output"] <= tol["atol"] + tol["rtol"] * 10


# --------------------------------------------------------------------------
# torch semantics the comparisons rely on, checked against the reference


def _rand(rng, shape, dtype=np.float64):
    return rng.standard_normal(shape).astype(dtype)


def _torch_vs_reference(q, k, v, ref_kwargs, **torch_kwargs):
    t_out = torch_sdpa(q, k, v, **torch_kwargs)
    ref_out, _ = sdpa_reference(q, k, v, **ref_kwargs)
    return float(np.abs(t_out - ref_out).max())


@pytest.mark.torch
@pytest.mark.parametrize("L, S", [(5, 5), (4, 9), (9, 4)], ids=["square", "L<S", "L>S"])
def test_torch_bool_mask_true_means_attend(L, S):
    rng = seeded_rng("torch-bool", L, S)
    q, k, v = _rand(rng, (2, L, 8)), _rand(rng, (2, S, 8)), _rand(rng, (2, S, 8))
    mask = rng.random((L, S)) < 0.6
    mask[:, 0] = True  # no fully masked row in either polarity
    mask[:, -1] = False
    same = _torch_vs_reference(q, k, v, dict(attn_mask=mask), attn_mask=mask)
    inverted = _torch_vs_reference(q, k, v, dict(attn_mask=~mask), attn_mask=mask)
    assert same < 1e-12
    assert inverted > 1e-3


@pytest.mark.torch
@pytest.mark.parametrize("L, S", [(5, 5), (4, 9), (9, 4)], ids=["square", "L<S", "L>S"])
def test_torch_is_causal_is_top_left_tril(L, S):
    rng = seeded_rng("torch-causal", L, S)
    q, k, v = _rand(rng, (2, L, 8)), _rand(rng, (2, S, 8)), _rand(rng, (2, S, 8))
    top_left = np.tril(np.ones((L, S), dtype=bool))
    assert _torch_vs_reference(q, k, v, dict(attn_mask=top_left), is_causal=True) < 1e-12
    assert _torch_vs_reference(q, k, v, dict(is_causal=True), is_causal=True) < 1e-12
    if L != S:
        bottom_right = np.tril(np.ones((L, S), dtype=bool), k=S - L)
        bottom_right[:, 0] = True  # keep every row alive
        assert _torch_vs_reference(q, k, v, dict(attn_mask=bottom_right), is_causal=True) > 1e-3


@pytest.mark.torch
@pytest.mark.parametrize("kind", ["bool", "float_neginf"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_torch_fully_masked_row_gives_zero_output(kind, dtype):
    rng = seeded_rng("torch-dead", kind, np.dtype(dtype).name)
    q, k, v = (_rand(rng, (2, 3, 5, 8), dtype), _rand(rng, (2, 3, 7, 8), dtype),
               _rand(rng, (2, 3, 7, 8), dtype))
    allowed = rng.random((2, 3, 5, 7)) < 0.7
    allowed[..., 0] = True
    allowed[0, 1, 2] = False
    allowed[1, 2, 4] = False
    mask = allowed if kind == "bool" else np.where(allowed, 0, -np.inf).astype(dtype)
    t_out = torch_sdpa(q, k, v, attn_mask=mask)
    assert np.all(t_out[0, 1, 2] == 0) and np.all(t_out[1, 2, 4] == 0)
    np.testing.assert_allclose(t_out, sdpa_reference(q, k, v, attn_mask=mask)[0],
                               **TOL[dtype])


@pytest.mark.torch
@pytest.mark.parametrize("Hq, H", [(4, 2), (6, 1), (6, 3), (6, 2)],
                         ids=["4-2", "6-1", "6-3", "6-2"])
def test_torch_gqa_maps_head_h_to_h_div_group(Hq, H):
    rng = seeded_rng("torch-gqa", Hq, H)
    q, k, v = _rand(rng, (2, Hq, 5, 8)), _rand(rng, (2, H, 7, 8)), _rand(rng, (2, H, 7, 6))
    assert _torch_vs_reference(q, k, v, dict(enable_gqa=True), enable_gqa=True) < 1e-12
    group = Hq // H
    explicit = np.arange(Hq) // group
    kk, vv = k[:, explicit], v[:, explicit]
    assert float(np.abs(torch_sdpa(q, k, v, enable_gqa=True) -
                        sdpa_reference(q, kk, vv)[0]).max()) < 1e-12
    if H > 1:  # the other plausible mapping, h % H, is not what torch does
        modulo = np.arange(Hq) % H
        wrong = sdpa_reference(q, k[:, modulo], v[:, modulo])[0]
        assert float(np.abs(torch_sdpa(q, k, v, enable_gqa=True) - wrong).max()) > 1e-3


@pytest.mark.torch
def test_torch_default_scale_is_one_over_sqrt_E_and_float_mask_is_added():
    rng = seeded_rng("torch-scale")
    q, k, v = _rand(rng, (2, 5, 16)), _rand(rng, (2, 7, 16)), _rand(rng, (2, 7, 3))
    mask = _rand(rng, (5, 7))
    assert _torch_vs_reference(q, k, v, dict(scale=0.25, attn_mask=mask), attn_mask=mask) < 1e-12
    assert _torch_vs_reference(q, k, v, dict(scale=1 / math.sqrt(3)), attn_mask=None) > 1e-3
    assert _torch_vs_reference(q, k, v, dict(scale=0.7), scale=0.7) < 1e-12


@pytest.mark.torch
def test_torch_batch_dims_broadcast_like_matmul():
    rng = seeded_rng("torch-bcast")
    q, k, v = _rand(rng, (3, 2, 4, 8)), _rand(rng, (1, 2, 6, 8)), _rand(rng, (2, 6, 5))
    assert torch_sdpa(q, k, v).shape == (3, 2, 4, 5)
    assert _torch_vs_reference(q, k, v, {}) < 1e-12


def test_reference_softmax_rows_and_dead_rows():
    """The reference itself on a hand-computed example."""
    q = np.array([[1.0, 0.0], [0.0, 1.0]])
    k = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    v = np.array([[1.0], [2.0], [4.0]])
    mask = np.array([[True, False, True], [False, False, False]])
    out, w = sdpa_reference(q, k, v, attn_mask=mask, scale=1.0)
    # row 0: scores 1, -, 1 -> weights 1/2, 0, 1/2; row 1 fully masked
    np.testing.assert_array_equal(w, [[0.5, 0.0, 0.5], [0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(out, [[2.5], [0.0]])


# --------------------------------------------------------------------------
# out=, need_weights=False, lists, causal_mask


@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "noweights"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", ["4d", "bcast_kv_view", "gqa_4_2_causal", "bool_full_dead",
                                  "2d_L1"])
def test_out_receives_the_output(name, dtype, need_weights):
    sc = next(s for s in SCENARIOS if s.name == name)
    q, k, v, kwargs = make_inputs(sc, dtype, "mixed")
    expected = call(q, k, v, kwargs, need_weights=need_weights).output
    out = np.full(expected.shape, np.nan, dtype=dtype)
    res = call(q, k, v, kwargs, need_weights=need_weights, out=out)
    assert res.output is out
    np.testing.assert_array_equal(out, expected)
    assert (res.weights is None) == (not need_weights)


@pytest.mark.parametrize("L, S", [(4, 4), (3, 7), (7, 3), (1, 5), (5, 1)],
                         ids=["4x4", "3x7", "7x3", "1x5", "5x1"])
@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
def test_causal_mask_values(align, L, S):
    offset = 0 if align == "top_left" else S - L
    allowed = np.tril(np.ones((L, S), dtype=bool), k=offset)
    for dtype in DTYPES:
        m = attnpy.causal_mask(L, S, align=align, dtype=dtype)
        assert m.dtype == dtype and m.shape == (L, S)
        np.testing.assert_array_equal(m, np.where(allowed, 0.0, -np.inf).astype(dtype))


def test_causal_mask_defaults():
    m = attnpy.causal_mask(5)
    assert m.dtype == np.float32
    np.testing.assert_array_equal(m, attnpy.causal_mask(5, 5, align="top_left"))


@pytest.mark.parametrize("L, S", [(4, 9), (9, 4), (6, 6)], ids=["L<S", "L>S", "square"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_causal_mask_top_left_equals_is_causal(dtype, L, S):
    rng = seeded_rng("cm-is-causal", L, S, np.dtype(dtype).name)
    q, k, v = _rand(rng, (2, 2, L, 8), dtype), _rand(rng, (2, 2, S, 8), dtype), \
        _rand(rng, (2, 2, S, 5), dtype)
    a = attnpy.scaled_dot_product_attention(q, k, v, is_causal=True)
    b = attnpy.scaled_dot_product_attention(q, k, v, attn_mask=attnpy.causal_mask(
        L, S, dtype=dtype))
    np.testing.assert_allclose(a.output, b.output, **STREAM_TOL[dtype])
    np.testing.assert_allclose(a.weights, b.weights, **STREAM_TOL[dtype])


@pytest.mark.torch
@pytest.mark.parametrize("L, S", [(4, 9), (6, 6), (1, 7)], ids=["L<S", "square", "L1"])
def test_causal_mask_bottom_right_matches_torch_causal_lower_right(L, S):
    from torch.nn.attention.bias import causal_lower_right

    rng = seeded_rng("cm-lower-right", L, S)
    q, k, v = _rand(rng, (2, 2, L, 8)), _rand(rng, (2, 2, S, 8)), _rand(rng, (2, 2, S, 5))
    with torch.no_grad():
        t_out = F.scaled_dot_product_attention(to_torch(q), to_torch(k), to_torch(v),
                                               attn_mask=causal_lower_right(L, S)).numpy()
    res = attnpy.scaled_dot_product_attention(
        q, k, v, attn_mask=attnpy.causal_mask(L, S, align="bottom_right", dtype=np.float64))
    np.testing.assert_allclose(res.output, t_out, **TOL[np.float64])


@pytest.mark.torch
@pytest.mark.parametrize("shapes", [
    ((2, 0, 4), (2, 5, 4), (2, 5, 3)),
    ((2, 3, 4), (2, 0, 4), (2, 0, 3)),
    ((0, 3, 4), (0, 5, 4), (0, 5, 3)),
    ((2, 3, 4), (2, 5, 4), (2, 5, 0)),
], ids=["L0", "S0", "batch0", "Ev0"])
@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "noweights"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_empty_dimensions(shapes, need_weights, dtype):
    """Zero-size L, S, batch or Ev: the shapes torch gives; S = 0 gives a zero output."""
    rng = seeded_rng("empty", shapes, np.dtype(dtype).name)
    q, k, v = (_rand(rng, s, dtype) for s in shapes)
    res = attnpy.scaled_dot_product_attention(q, k, v, need_weights=need_weights)
    ref_out, ref_w = sdpa_reference(q, k, v)
    t_out = torch_sdpa(q, k, v)
    assert res.output.shape == ref_out.shape == t_out.shape
    np.testing.assert_array_equal(res.output, t_out)
    if need_weights:
        assert res.weights.shape == ref_w.shape
        assert_close(res.weights, ref_w, dtype, "weights vs float64 reference")


@pytest.mark.torch
@pytest.mark.parametrize("scale", [64.0, -64.0], ids=["huge_positive", "huge_negative"])
@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "noweights"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_huge_scores_do_not_overflow(dtype, need_weights, scale):
    """Scores in the thousands (exactly representable: integer q, k, scale 2**6).

    Without subtracting the row maximum exp() overflows (or every term
    underflows to 0) and the result is inf / NaN. Ties are frequent here.
    """
    rng = seeded_rng("huge", np.dtype(dtype).name, scale)
    q = rng.integers(-3, 4, (2, 3, 6, 8)).astype(dtype)
    k = rng.integers(-3, 4, (2, 3, 70, 8)).astype(dtype)
    v = _rand(rng, (2, 3, 70, 5), dtype)
    res = attnpy.scaled_dot_product_attention(q, k, v, scale=scale, need_weights=need_weights)
    ref_out, ref_w = sdpa_reference(q, k, v, scale=scale)
    assert np.isfinite(res.output).all()
    assert_close(res.output, ref_out, dtype, "output vs float64 reference")
    assert_close(res.output, torch_sdpa(q, k, v, scale=scale), dtype, "output vs torch")
    if need_weights:
        assert_close(res.weights, ref_w, dtype, "weights vs float64 reference")


# --------------------------------------------------------------------------
# masks hide a pair whatever its score


# Regression: the tiled kernels gave NaN rows when a masked pair's score was NaN or inf
@pytest.mark.parametrize("kernel", ["reference"] + attnpy.supported_kernels()[1:])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_a_masked_pair_never_counts_whatever_its_score(kernel, dtype, mask_kind):
    """A key the mask hides (bool False, or a float -inf) gets no weight even
    when its score is NaN or inf: a NaN in a masked key's row, or scale=inf
    times a zero dot product. The reference kernel skipped such pairs; the
    tiled kernels added the score to the mask's -inf and got NaN for the
    whole row. Found by tests/test_properties.py."""
    allowed = np.array([[True, False], [True, False], [False, False]])
    mask = allowed if mask_kind == "bool" else np.where(allowed, 0.0, -np.inf).astype(dtype)
    q = np.array([[1.0, 0.0], [0.5, 0.0], [1.0, 1.0]], dtype)
    v = np.array([[1.0, 2.0], [3.0, 4.0]], dtype)
    cases = [  # key 1 (masked everywhere) holds a NaN / an inf score
        (np.array([[1.0, 0.0], [np.nan, 0.0]], dtype), None),
        (np.array([[1.0, 0.0], [np.inf, 0.0]], dtype), None),
        (np.array([[1.0, 0.0], [0.0, 0.0]], dtype), float("inf")),   # inf * 0 = NaN
    ]
    want_w = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    with attnpy.use_kernel(kernel):
        for k, scale in cases:
            for need_weights in (True, False):
                out, w = attnpy.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, scale=scale, need_weights=need_weights)
                if scale is None:
                    np.testing.assert_array_equal(out, want_w @ v)
                    if need_weights:
                        np.testing.assert_array_equal(w, want_w)
                else:   # key 0's score is inf * 1 = inf: rows 0, 1 NaN; row 2 masked
                    assert np.isnan(out[:2]).all()
                    np.testing.assert_array_equal(out[2], 0.0)
            grads = attnpy.scaled_dot_product_attention_backward(
                np.ones((3, 2), dtype), q, k, v, attn_mask=mask, scale=scale)
            if scale is None:
                for g in grads[:3]:
                    assert np.isfinite(g).all()
                np.testing.assert_array_equal(grads.value[1], 0.0)


# --------------------------------------------------------------------------
# Issue 12, item 9: a result's repr names the kernel that computed it (and,
# for the reference kernel, why the planner sent the call there)

@pytest.mark.parametrize("kernel", attnpy.supported_kernels())
def test_a_result_names_the_kernel_that_ran(kernel):
    x = np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32)
    with attnpy.use_kernel(kernel):
        res = attnpy.scaled_dot_product_attention(x, x, x)
        layer = attnpy.MultiheadAttention(8, 2)(x)
    want = "use_ref:selected" if kernel == "reference" else "use_tiled"
    for r in (res, layer):
        assert (r.kernel, r.kernel_reason) == (kernel, want)
        assert f"kernel={kernel!r}" in repr(r)


def test_a_result_says_why_the_reference_ran():
    import pickle
    # q . k overflows float32 (NaN policy rule 6): the whole call is the reference's
    q, k = np.full((1, 4), 1e19, np.float32), np.array([[1e19] * 4, [0] * 4], np.float32)
    res = attnpy.scaled_dot_product_attention(q, k, np.array([[1.0], [2.0]], np.float32))
    assert (res.kernel, res.kernel_reason) == ("reference", "use_ref:qk_overflow")
    assert repr(res).endswith("kernel='reference' (qk_overflow))")
    assert pickle.loads(pickle.dumps(res)).kernel_reason == "use_ref:qk_overflow"
    x = np.ones((1, 3, 8), np.float32)
    traced = attnpy.MultiheadAttention(8, 2)(x, trace=True)
    assert traced.kernel_reason == "use_ref:trace"
    assert attnpy.scaled_dot_product_attention(x[:, :0], x, x).kernel_reason == "empty"
    out, weights = res                              # still unpacks as two
    assert res._replace(weights=None).kernel is None  # a result made by hand: not known

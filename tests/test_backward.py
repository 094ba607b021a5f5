"""The backward pass: against torch.autograd, and against finite differences
(float64, independent of torch), for SDPA and for the whole multi-head layer;
and a small training run that lowers the loss like torch does."""
import json

import numpy as np
import pytest

import attnpy
from optional_torch import torch
import reference as ref
import test_sdpa as parity

TOL = {np.float32: dict(atol=1e-4, rtol=1e-4), np.float64: dict(atol=1e-10, rtol=1e-10)}
ERRORS = {}  # what the closing note quotes: max |attnpy - reference| per check and dtype
ERRORS_JSON = "/tmp/attnpy_backward_errors.json"


def record(what, dtype, actual, desired):
    err = float(np.abs(np.asarray(actual, np.float64) - np.asarray(desired, np.float64)).max(
        initial=0.0))
    key = f"{what}/{np.dtype(dtype).name}"
    ERRORS[key] = max(ERRORS.get(key, 0.0), err)


@pytest.fixture(scope="module", autouse=True)
def write_errors():
    yield
    with open(ERRORS_JSON, "w") as f:
        json.dump(ERRORS, f, indent=1, sort_keys=True)


def torch_leaf(x):
    return torch.from_numpy(np.array(x)).requires_grad_(True)  # a writeable copy for torch


# --------------------------------------------------------------------------
# SDPA against torch.autograd: the forward parity suite's scenarios

CASES = [pytest.param(sc, dt, layout, id=f"{sc.name}-{np.dtype(dt).name}-{layout}")
         for i, sc in enumerate(parity.SCENARIOS)
         for dt in (np.float32, np.float64)
         for layout in ("c", parity.NONC_LAYOUTS[i % 5])
         if not (sc.gqa and len(sc.q) == 2)]  # torch's GQA needs a head axis


@pytest.mark.torch
@pytest.mark.parametrize("sc, dtype, layout", CASES)
def test_sdpa_backward_matches_torch(sc, dtype, layout):
    q, k, v, kw = parity.make_inputs(sc, dtype, layout)
    rng = np.random.default_rng(1)
    out = attnpy.scaled_dot_product_attention(q, k, v, **kw).output
    dout = rng.standard_normal(out.shape).astype(dtype)
    before = parity.snapshot((q, k, v, dout))
    g = attnpy.scaled_dot_product_attention_backward(dout, q, k, v, **kw)
    parity.assert_untouched((q, k, v, dout), before)

    tq, tk, tv = torch_leaf(q), torch_leaf(k), torch_leaf(v)
    mask = kw["attn_mask"]
    t_out = torch.nn.functional.scaled_dot_product_attention(
        tq, tk, tv, attn_mask=None if mask is None else parity.torch_mask(mask),
        is_causal=kw["is_causal"], scale=kw["scale"], enable_gqa=kw["enable_gqa"])
    t_out.backward(torch.from_numpy(dout))
    for name, mine, t in (("query", g.query, tq), ("key", g.key, tk), ("value", g.value, tv)):
        assert mine.shape == t.shape and mine.dtype == dtype, name
        record("sdpa_vs_torch", dtype, mine, t.grad.numpy())
        np.testing.assert_allclose(mine, t.grad.numpy(), **TOL[dtype], err_msg=name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_given_weights_equal_recomputed(dtype):
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((2, 3, 9, 8)).astype(dtype) for _ in range(3))
    mask = rng.random((9, 9)) < 0.7
    res = attnpy.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    dout = rng.standard_normal(res.output.shape).astype(dtype)
    a = attnpy.scaled_dot_product_attention_backward(dout, q, k, v, attn_mask=mask)
    b = attnpy.scaled_dot_product_attention_backward(dout, q, k, v, attn_mask=mask,
                                                     weights=res.weights)
    tol = 1e-5 if dtype == np.float32 else 1e-13
    for x, y in zip(a[:3], b[:3]):
        np.testing.assert_allclose(x, y, atol=tol, rtol=tol)


@pytest.mark.torch
def test_trace_gives_the_softmax_jacobian_applied():
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((2, 5, 4)) for _ in range(3))
    dout = rng.standard_normal((2, 5, 4))
    g = attnpy.scaled_dot_product_attention_backward(dout, q, k, v, is_causal=True, trace=True)
    tq, tk, tv = torch_leaf(q), torch_leaf(k), torch_leaf(v)
    s = tq @ tk.mT / 2.0 + torch.triu(torch.full((5, 5), float("-inf"), dtype=torch.float64), 1)
    s.retain_grad()
    p = torch.softmax(s, -1)
    p.retain_grad()
    (p @ tv).backward(torch.from_numpy(dout))
    np.testing.assert_allclose(g.trace.grad_weights, p.grad.numpy(), atol=1e-13)
    np.testing.assert_allclose(g.trace.grad_scores, s.grad.numpy(), atol=1e-13)


def test_fully_masked_rows_pass_no_gradient():
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal((6, 4)) for _ in range(3))
    mask = np.ones((6, 6), bool)
    mask[2] = False                                   # row 2 sees nothing
    dout = rng.standard_normal((6, 4))
    g = attnpy.scaled_dot_product_attention_backward(dout, q, k, v, attn_mask=mask)
    np.testing.assert_array_equal(g.query[2], 0.0)
    only_row2 = np.zeros_like(dout)
    only_row2[2] = dout[2]
    g2 = attnpy.scaled_dot_product_attention_backward(only_row2, q, k, v, attn_mask=mask)
    for x in g2[:3]:
        np.testing.assert_array_equal(x, 0.0)


def test_backward_errors_name_the_argument():
    q = np.zeros((2, 3, 4))
    with pytest.raises(ValueError, match="grad_output"):
        attnpy.scaled_dot_product_attention_backward(np.zeros((2, 3, 5)), q, q, q)
    with pytest.raises(TypeError, match="grad_output"):
        attnpy.scaled_dot_product_attention_backward(np.zeros((2, 3, 4), np.float32), q, q, q)
    with pytest.raises(ValueError, match="weights"):
        attnpy.scaled_dot_product_attention_backward(np.zeros((2, 3, 4)), q, q, q,
                                                     weights=np.zeros((2, 3, 4)))


# --------------------------------------------------------------------------
# saved statistics: the forward's lse (return_lse=True) and output given to
# the backward, which then does not run the forward again

def logsumexp_reference(logits):
    """log sum_j exp(logits_ij) in float64; -inf for a row with no open key."""
    m = logits.max(axis=-1, initial=-np.inf)
    safe = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(np.exp(logits - safe[..., None]).sum(axis=-1)) + safe


LSE_CASES = [pytest.param(sc, dt, id=f"{sc.name}-{np.dtype(dt).name}")
             for sc in parity.SCENARIOS for dt in (np.float32, np.float64)]


@pytest.mark.parametrize("sc, dtype", LSE_CASES)
def test_lse_is_the_logsumexp_of_the_logits(sc, dtype):
    q, k, v, kw = parity.make_inputs(sc, dtype, "c")
    logits = ref.sdpa_forward(q, k, v, kw["attn_mask"], kw["is_causal"], kw["scale"],
                              kw["enable_gqa"])["logits"]
    want = logsumexp_reference(logits)
    tol = 2e-6 if dtype == np.float32 else 1e-13
    for kernel in attnpy.supported_kernels():
        for need_weights in (False, True):
            with attnpy.use_kernel(kernel):
                r = attnpy.scaled_dot_product_attention(q, k, v, need_weights=need_weights,
                                                        return_lse=True, **kw)
            assert r.lse.shape == r.output.shape[:-1] and r.lse.dtype == dtype
            np.testing.assert_array_equal(np.isneginf(r.lse), np.isneginf(want))
            finite = np.isfinite(want)
            np.testing.assert_allclose(r.lse[finite], want[finite], rtol=tol, atol=tol,
                                       err_msg=f"{kernel}, need_weights={need_weights}")
            if need_weights:   # weights = exp(logits - lse), where a key is open
                w = np.exp(logits - np.where(finite, r.lse, 0.0)[..., None])
                np.testing.assert_allclose(r.weights, np.where(finite[..., None], w, 0.0),
                                           atol=5 * tol)


def test_lse_is_none_unless_asked_and_the_result_still_unpacks():
    x = np.ones((3, 4), np.float32)
    r = attnpy.scaled_dot_product_attention(x, x, x)
    assert r.lse is None
    out, weights = attnpy.scaled_dot_product_attention(x, x, x, return_lse=True)
    assert out.shape == (3, 4) and weights.shape == (3, 3)


# (L, S, E, Ev): no keys (every row -inf), no queries, empty query/key
# features (every logit 0: lse = log S), empty value features
EDGE_SHAPES = [(3, 0, 4, 4), (0, 5, 4, 4), (3, 5, 0, 4), (3, 5, 4, 0)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("L, S, E, Ev", EDGE_SHAPES, ids=["S0", "L0", "E0", "Ev0"])
def test_lse_and_saved_backward_on_empty_axes(L, S, E, Ev, dtype):
    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, L, E)).astype(dtype)
    k = rng.standard_normal((2, S, E)).astype(dtype)
    v = rng.standard_normal((2, S, Ev)).astype(dtype)
    dout = rng.standard_normal((2, L, Ev)).astype(dtype)
    scale = 1 / np.sqrt(max(E, 1))
    logits = np.einsum("hle,hse->hls", q.astype(np.float64), k) * scale
    want_lse = logsumexp_reference(logits)
    want = ref.sdpa_backward_reference(dout, q, k, v, None, False, scale)
    for kernel in attnpy.supported_kernels():
        with attnpy.use_kernel(kernel):
            r = attnpy.scaled_dot_product_attention(q, k, v, need_weights=False,
                                                    return_lse=True, scale=scale)
            assert r.lse.shape == (2, L)
            np.testing.assert_allclose(r.lse, want_lse, rtol=1e-6, err_msg=kernel)
            g = attnpy.scaled_dot_product_attention_backward(
                dout, q, k, v, scale=scale, output=r.output, lse=r.lse)
        for name, mine, w in zip(("query", "key", "value"), g[:3], want):
            assert mine.shape == w.shape, f"{kernel}: {name}"
            np.testing.assert_allclose(mine, w, **TOL[dtype], err_msg=f"{kernel}: {name}")


SAVED_SHAPES = [((2, 3, 150, 40), {}), ((1, 2, 300, 64), dict(is_causal=True)),
                ((3, 130, 24), dict(mask=True)), ((2, 4, 200, 16), dict(window=(40, 0)))]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, opts", SAVED_SHAPES, ids=["plain", "causal", "mask", "window"])
def test_saved_statistics_give_the_recomputed_gradients(shape, opts, dtype):
    """Several tiles of queries and keys, both backward plans (one problem
    per thread or fewer), a mask with rows that see nothing: on every kernel,
    the gradients from the saved lse and output equal the float64
    reference's as closely as the recomputing backward's do."""
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal(shape).astype(dtype) for _ in range(3))
    kw = {}
    if opts.get("mask"):
        mask = rng.random(shape[-2:-1] * 2) < 0.6
        mask[[0, 77]] = False                         # rows with no open key
        kw["attn_mask"] = mask
    kw["is_causal"] = opts.get("is_causal", False)
    if "window" in opts:
        kw.update(window=opts["window"], is_causal=True)
    dout = rng.standard_normal(shape).astype(dtype)
    if "window" in opts:   # the reference knows no window: its mask, from positions
        pos = ref.position_mask(shape[-2], shape[-2], is_causal=True, window=opts["window"])
        want = ref.sdpa_backward_reference(dout, q, k, v, attn_mask=pos)
    else:
        want = ref.sdpa_backward_reference(dout, q, k, v, kw.get("attn_mask"), kw["is_causal"])
    tol = TOL[dtype]
    for kernel in attnpy.supported_kernels():
        with attnpy.use_kernel(kernel):
            r = attnpy.scaled_dot_product_attention(q, k, v, need_weights=False,
                                                    return_lse=True, **kw)
            before = parity.snapshot((q, k, v, dout, r.output, r.lse))
            g = attnpy.scaled_dot_product_attention_backward(dout, q, k, v, output=r.output,
                                                             lse=r.lse, **kw)
            parity.assert_untouched((q, k, v, dout, r.output, r.lse), before)
        for name, mine, w in zip(("query", "key", "value"), g[:3], want):
            record("saved_vs_reference", dtype, mine, w)
            np.testing.assert_allclose(mine, w, **tol, err_msg=f"{kernel}: {name}")


def test_the_tiled_backward_reads_the_saved_statistics():
    """A wrong lse (each row's shifted by log 2: every weight halved) changes
    the tiled kernels' gradients, so they did not recompute; the reference
    kernel recomputes and ignores it."""
    rng = np.random.default_rng(8)
    q, k, v, dout = (rng.standard_normal((2, 2, 140, 32)).astype(np.float32) for _ in range(4))
    r = attnpy.scaled_dot_product_attention(q, k, v, need_weights=False, return_lse=True)
    for kernel in attnpy.supported_kernels():
        with attnpy.use_kernel(kernel):
            good = attnpy.scaled_dot_product_attention_backward(dout, q, k, v)
            bad = attnpy.scaled_dot_product_attention_backward(dout, q, k, v, output=r.output,
                                                               lse=r.lse + np.float32(np.log(2)))
        changed = not np.allclose(good.value, bad.value, atol=1e-3)
        assert changed == (kernel != "reference"), kernel
        if changed:   # dv = P^T dO: exactly halved
            np.testing.assert_allclose(bad.value, good.value / 2, rtol=1e-4, atol=1e-5)


@pytest.mark.torch
@pytest.mark.parametrize("sc, dtype, layout", CASES)
def test_saved_statistics_backward_matches_torch(sc, dtype, layout):
    q, k, v, kw = parity.make_inputs(sc, dtype, layout)
    r = attnpy.scaled_dot_product_attention(q, k, v, need_weights=False, return_lse=True, **kw)
    dout = np.random.default_rng(1).standard_normal(r.output.shape).astype(dtype)
    g = attnpy.scaled_dot_product_attention_backward(dout, q, k, v, output=r.output, lse=r.lse,
                                                     **kw)
    tq, tk, tv = torch_leaf(q), torch_leaf(k), torch_leaf(v)
    mask = kw["attn_mask"]
    torch.nn.functional.scaled_dot_product_attention(
        tq, tk, tv, attn_mask=None if mask is None else parity.torch_mask(mask),
        is_causal=kw["is_causal"], scale=kw["scale"], enable_gqa=kw["enable_gqa"]
    ).backward(torch.from_numpy(dout))
    for name, mine, t in (("query", g.query, tq), ("key", g.key, tk), ("value", g.value, tv)):
        np.testing.assert_allclose(mine, t.grad.numpy(), **TOL[dtype], err_msg=name)


def test_saved_statistics_errors_name_the_argument():
    q = np.zeros((2, 3, 4))
    r = attnpy.scaled_dot_product_attention(q, q, q, return_lse=True)
    bwd = attnpy.scaled_dot_product_attention_backward
    with pytest.raises(ValueError, match="lse is given without output"):
        bwd(q, q, q, q, lse=r.lse)
    with pytest.raises(ValueError, match="output is given without lse"):
        bwd(q, q, q, q, output=r.output)
    with pytest.raises(ValueError, match=r"lse must have shape \(2, 3\).*got \(2, 3, 1\)"):
        bwd(q, q, q, q, output=r.output, lse=r.lse[..., None])
    with pytest.raises(ValueError, match=r"output must have shape \(2, 3, 4\).*got \(2, 3\)"):
        bwd(q, q, q, q, output=r.lse, lse=r.lse)
    with pytest.raises(TypeError, match="lse must have dtype float64 like query; got float32"):
        bwd(q, q, q, q, output=r.output, lse=r.lse.astype(np.float32))
    with pytest.raises(TypeError, match="output must be a NumPy array"):
        bwd(q, q, q, q, output=r.output.tolist(), lse=r.lse)
    # the core's own check of the pair (the boundary: memory safety)
    with pytest.raises(ValueError, match="together"):
        attnpy._core.sdpa_backward(q, q, q, q, scale=0.5, lse=r.lse[..., None])


# --------------------------------------------------------------------------
# finite differences (float64, no torch)

def directional_check(loss, grad, x, rng, eps=1e-6, n=3):
    """<grad, d> against (loss(x + eps d) - loss(x - eps d)) / (2 eps) for random d."""
    worst = 0.0
    for _ in range(n):
        d = rng.standard_normal(x.shape)
        x0 = x.copy()
        x[...] = x0 + eps * d
        up = loss()
        x[...] = x0 - eps * d
        down = loss()
        x[...] = x0
        numeric = (up - down) / (2 * eps)
        analytic = float(np.sum(grad * d))
        err = abs(numeric - analytic) / max(1.0, abs(numeric))
        worst = max(worst, err)
    return worst


@pytest.mark.parametrize("kw", [dict(), dict(is_causal=True), dict(enable_gqa=True),
                                dict(mask="bool"), dict(mask="float")],
                         ids=["plain", "causal", "gqa", "bool_mask", "float_mask"])
def test_sdpa_finite_differences(kw):
    rng = np.random.default_rng(5)
    q = rng.standard_normal((2, 4, 5, 6))
    k = rng.standard_normal((2, 2 if kw.get("enable_gqa") else 4, 7, 6))
    v = rng.standard_normal(k.shape[:-1] + (3,))
    kw = dict(kw)
    m = kw.pop("mask", None)
    if m == "bool":
        kw["attn_mask"] = rng.random((5, 7)) < 0.7
    elif m == "float":
        kw["attn_mask"] = rng.standard_normal((5, 7))
    r = rng.standard_normal((2, 4, 5, 3))

    def loss():
        return float(np.sum(attnpy.scaled_dot_product_attention(q, k, v, **kw).output * r))

    g = attnpy.scaled_dot_product_attention_backward(r, q, k, v, **kw)
    for name, x, gx in (("query", q, g.query), ("key", k, g.key), ("value", v, g.value)):
        err = directional_check(loss, gx, x, rng)
        ERRORS["sdpa_vs_finite_differences/float64"] = max(
            ERRORS.get("sdpa_vs_finite_differences/float64", 0.0), err)
        assert err < 1e-7, (name, err)


# --------------------------------------------------------------------------
# the multi-head layer against torch.autograd

MHA_CONFIGS = [
    dict(),
    dict(bias=False),
    dict(add_bias_kv=True),
    dict(add_zero_attn=True),
    dict(add_bias_kv=True, add_zero_attn=True),
    dict(kdim=5, vdim=7),
]


def torch_module(cfg, batch_first, dtype, seed):
    torch.manual_seed(seed)
    m = torch.nn.MultiheadAttention(12, 3, batch_first=batch_first, **cfg)
    m = m.double() if dtype == np.float64 else m
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.4)
    return m.eval()


@pytest.mark.torch
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("layout", ["batch_first", "seq_first", "unbatched"])
@pytest.mark.parametrize("masks", ["none", "kpm_bool", "attn_float", "both"])
@pytest.mark.parametrize("ci", range(len(MHA_CONFIGS)),
                         ids=["default", "nobias", "biaskv", "zeroattn", "biaskv_zeroattn",
                              "kdim_vdim"])
def test_mha_backward_matches_torch(ci, masks, layout, dtype):
    cfg = MHA_CONFIGS[ci]
    m = torch_module(cfg, layout != "seq_first", dtype, seed=ci)
    layer = attnpy.MultiheadAttention.from_torch(m)
    rng = np.random.default_rng(ci * 10 + len(masks))
    N, L, S = 2, 4, 6
    kdim, vdim = cfg.get("kdim", 12), cfg.get("vdim", 12)

    def shape(n, f):
        return (n, f) if layout == "unbatched" else (N, n, f) if layout == "batch_first" else (n, N, f)
    q = rng.standard_normal(shape(L, 12)).astype(dtype)
    k = rng.standard_normal(shape(S, kdim)).astype(dtype)
    v = rng.standard_normal(shape(S, vdim)).astype(dtype)
    kpm = am = None
    if masks in ("kpm_bool", "both"):
        kpm = rng.random((S,) if layout == "unbatched" else (N, S)) < 0.3
        kpm[..., 0] = False
    if masks in ("attn_float", "both"):
        am = rng.standard_normal((L, S)).astype(dtype)
    res = layer(q, k, v, key_padding_mask=kpm, attn_mask=am, trace=True)
    dout = rng.standard_normal(res.output.shape).astype(dtype)
    grads = layer.backward(res, dout)

    tq, tk, tv = torch_leaf(q), torch_leaf(k), torch_leaf(v)
    t_out, _ = m(tq, tk, tv, key_padding_mask=None if kpm is None else torch.from_numpy(kpm),
                 attn_mask=None if am is None else torch.from_numpy(am))
    t_out.backward(torch.from_numpy(dout))
    pairs = [("query", grads.query, tq.grad), ("key", grads.key, tk.grad),
             ("value", grads.value, tv.grad)]
    pairs += [(name, grads.params[name], p.grad) for name, p in m.named_parameters()]
    assert set(grads.params) == {name for name, _ in m.named_parameters()}
    for name, mine, theirs in pairs:
        theirs = theirs.numpy()
        assert mine.shape == theirs.shape, name
        record("mha_vs_torch", dtype, mine, theirs)
        scale = max(1.0, float(np.abs(theirs).max()))   # normwise, as float32 sums are
        np.testing.assert_allclose(mine, theirs, atol=TOL[dtype]["atol"] * scale,
                                   rtol=TOL[dtype]["rtol"], err_msg=name)


@pytest.mark.parametrize("cfg", [dict(num_kv_heads=2), dict(num_kv_heads=1, add_bias_kv=True),
                                 dict(add_zero_attn=True, kdim=5, vdim=3)],
                         ids=["gqa", "mqa_biaskv", "zeroattn_kdim_vdim"])
def test_mha_finite_differences(cfg):
    """Every parameter and input, float64, central differences; grouped-query
    heads included (torch has no such layer to compare with)."""
    layer = attnpy.MultiheadAttention(8, 4, dtype=np.float64, seed=7, **cfg)
    rng = np.random.default_rng(8)
    for p in layer.parameters():
        p[...] = rng.standard_normal(p.shape) * 0.5
    q = rng.standard_normal((2, 3, 8))
    k = rng.standard_normal((2, 5, cfg.get("kdim", 8)))
    v = rng.standard_normal((2, 5, cfg.get("vdim", 8)))
    kpm = np.zeros((2, 5), bool)
    kpm[1, 3:] = True
    r = rng.standard_normal((2, 3, 8))

    def loss():
        return float(np.sum(layer(q, k, v, key_padding_mask=kpm).output * r))

    grads = layer.backward(layer(q, k, v, key_padding_mask=kpm, trace=True), r)
    worst = 0.0
    for name, x in list(layer.state_dict().items()) + [("query", q), ("key", k), ("value", v)]:
        g = grads.params[name] if name in grads.params else getattr(grads, name)
        worst = max(worst, directional_check(loss, g, x, rng))
    ERRORS["mha_vs_finite_differences/float64"] = max(
        ERRORS.get("mha_vs_finite_differences/float64", 0.0), worst)
    assert worst < 1e-7


def test_mha_dropout_backward_uses_the_forward_mask():
    """In training mode with dropout, the gradient is that of the function the
    forward computed: same seed, same mask (finite differences re-run the
    forward with the seed that produced it)."""
    layer = attnpy.MultiheadAttention(8, 2, dropout=0.3, dtype=np.float64, seed=9).train()
    rng = np.random.default_rng(10)
    x = rng.standard_normal((2, 6, 8))
    r = rng.standard_normal((2, 6, 8))

    def loss():
        layer._rng = np.random.default_rng(123)      # the same dropout seed every time
        return float(np.sum(layer(x).output * r))

    layer._rng = np.random.default_rng(123)
    res = layer(x, trace=True)
    assert res.trace.dropout_mask is not None and not res.trace.dropout_mask.all()
    grads = layer.backward(res, r)
    worst = max(directional_check(loss, grads.params[n], p, rng)
                for n, p in layer.state_dict().items())
    worst = max(worst, directional_check(loss, grads.query + grads.key + grads.value, x, rng))
    assert worst < 1e-7


def test_backward_needs_a_traced_forward():
    layer = attnpy.MultiheadAttention(8, 2)
    x = np.zeros((1, 3, 8), np.float32)
    with pytest.raises(ValueError, match="trace=True"):
        layer.backward(layer(x), np.zeros((1, 3, 8), np.float32))
    other = attnpy.MultiheadAttention(8, 2)
    with pytest.raises(ValueError, match="another layer"):
        other.backward(layer(x, trace=True), np.zeros((1, 3, 8), np.float32))
    with pytest.raises(ValueError, match="grad_output"):
        layer.backward(layer(x, trace=True), np.zeros((1, 3, 7), np.float32))


# Issue 12, item 7: a pickled or deep-copied traced result was refused by its
# own layer's backward ("another layer") and its trace became writeable.
@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_a_copied_traced_result_still_belongs_to_its_layer(how):
    import copy
    import pickle
    rng = np.random.default_rng(5)
    layer = attnpy.MultiheadAttention(8, 2, seed=1)
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    g = rng.standard_normal((2, 3, 8)).astype(np.float32)
    res = layer(x, trace=True)
    copied = pickle.loads(pickle.dumps(res)) if how == "pickle" else copy.deepcopy(res)
    assert not copied.trace.weights.flags.writeable
    assert not copied.trace.q.flags.writeable
    want, got = layer.backward(res, g), layer.backward(copied, g)
    for name in ("query", "key", "value"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
    for name, p in want.params.items():
        np.testing.assert_array_equal(got.params[name], p)
    with pytest.raises(ValueError, match="another layer"):
        attnpy.MultiheadAttention(8, 2, seed=1).backward(copied, g)
    with pytest.raises(ValueError, match="another layer"):   # a copied layer is another
        copy.deepcopy(layer).backward(res, g)


# --------------------------------------------------------------------------
# training

@pytest.mark.slow
@pytest.mark.torch
def test_training_a_layer_lowers_the_loss_like_torch():
    """SGD on a small task: the output at position i must reproduce the input
    at position i - 1 (attend to the previous token, through positional
    features). attnpy's forward and backward against torch's from the same
    initial weights: the same loss curve for the first steps, and a loss that
    falls by more than half."""
    rng = np.random.default_rng(11)
    N, L, E, H = 8, 6, 16, 2
    pos = np.eye(L, E, k=E - L)                           # positions in the last L features
    tokens = rng.standard_normal((N, L, E - L))
    x = np.concatenate([tokens, np.broadcast_to(pos[:, E - L:], (N, L, L))], axis=-1)
    target = np.zeros_like(x)
    target[:, 1:, :E - L] = tokens[:, :-1]
    mask = attnpy.causal_mask(L, dtype=np.float64)

    torch.manual_seed(0)
    m = torch.nn.MultiheadAttention(E, H, batch_first=True).double()
    layer = attnpy.MultiheadAttention.from_torch(m)
    tx, tt, tm = torch.from_numpy(x), torch.from_numpy(target), torch.from_numpy(mask)
    lr = 0.5
    opt = torch.optim.SGD(m.parameters(), lr=lr)
    ours, theirs = [], []
    for step in range(300):
        res = layer(x, attn_mask=mask, trace=True)
        diff = res.output - target
        ours.append(float(np.mean(diff ** 2)))
        grads = layer.backward(res, 2 * diff / diff.size)
        for name, p in layer.state_dict().items():
            p -= lr * grads.params[name]

        opt.zero_grad()
        out, _ = m(tx, tx, tx, attn_mask=tm, need_weights=False)
        loss = torch.mean((out - tt) ** 2)
        theirs.append(float(loss.detach()))
        loss.backward()
        opt.step()
    np.testing.assert_allclose(ours[:50], theirs[:50], rtol=1e-9)
    assert ours[-1] < 0.5 * ours[0], (ours[0], ours[-1])
    ERRORS["training_loss_first_last"] = [ours[0], ours[-1]]


# --------------------------------------------------------------------------
# non-finite values the backward must not read


# Regression: the tiled backward read the inf value rows of masked keys (code review)
def test_fast_backward_ignores_non_finite_values_of_masked_keys():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, 40, 16)) for _ in range(3))
    v[..., 5, :] = np.inf
    mask = np.ones((40, 40), bool)
    mask[:, 5] = False
    dout = rng.standard_normal((1, 2, 40, 16))
    for kernel in attnpy.supported_kernels():
        with attnpy.use_kernel(kernel):
            g = attnpy.scaled_dot_product_attention_backward(dout, q, k, v, attn_mask=mask)
        assert np.isfinite(g.query).all() and np.isfinite(g.key).all(), kernel
        assert np.isfinite(np.delete(g.value, 5, axis=-2)).all(), kernel


@pytest.mark.parametrize("opts", [dict(is_causal=True), dict(window=(7, 0))],
                         ids=["causal", "window"])
def test_non_finite_gradients_of_blocked_pairs_agree_across_kernels(opts):
    """An inf in dout on an early query and in v on a late key, under causal or a
    window: the tiled backward skips the pairs blocked by position (its
    bands), the reference kernel walks every pair. Both must give the same
    gradients, NaN and inf in the same places, over several tiles."""
    rng = np.random.default_rng(3)
    q, k, v, dout = (rng.standard_normal((1, 2, 300, 24)).astype(np.float32) for _ in range(4))
    dout[..., 3, :] = np.inf     # reaches the keys up to 3 (and a window's)
    v[..., 290, :] = -np.inf     # read by the queries from 290 (a window's up to 297)
    with attnpy.use_kernel("reference"):
        want = attnpy.scaled_dot_product_attention_backward(dout, q, k, v, **opts)
    for kernel in attnpy.supported_kernels()[1:]:
        with attnpy.use_kernel(kernel):
            got = attnpy.scaled_dot_product_attention_backward(dout, q, k, v, **opts)
        for name, g, w in zip(("query", "key", "value"), got[:3], want[:3]):
            np.testing.assert_array_equal(np.isnan(g), np.isnan(w), err_msg=f"{kernel} {name}")
            np.testing.assert_array_equal(np.isinf(g), np.isinf(w), err_msg=f"{kernel} {name}")
            ok = np.isfinite(w)
            np.testing.assert_allclose(g[ok], w[ok], rtol=1e-4, atol=1e-5,
                                       err_msg=f"{kernel} {name}")


# Regression: the tiled backward computed inf * 0 = NaN for scale=inf
@pytest.mark.parametrize("kernel", ["reference"] + attnpy.supported_kernels()[1:])
def test_backward_with_an_infinite_scale_agrees_across_kernels(kernel):
    """scale=inf sends a negative score to -inf: the row has no weight and
    passes no gradient (the reference kernel's 0). The tiled backward computed
    dq = scale * (dS k) = inf * 0 = NaN. Found by tests/test_properties.py."""
    q = np.array([[1.0, -1.5, 1.0]], np.float32)
    k = np.array([[1.0, 1.5, -2.0]], np.float32)
    v = np.array([[0.5]], np.float32)
    with attnpy.use_kernel(kernel):
        g = attnpy.scaled_dot_product_attention_backward(
            np.ones((1, 1), np.float32), q, k, v, scale=float("inf"))
    for grad in g[:3]:
        np.testing.assert_array_equal(grad, 0.0)

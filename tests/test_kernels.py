"""Every kernel, at several thread counts, computes the same attention.

There are four kernels (the reference and the tiled kernel built for the
x86-64 baseline, AVX2 and AVX-512), each for float32 and float64; each one
this CPU supports is forced in turn and checked on the whole SDPA parity
matrix (both dtypes, the parity suite's tolerances) and on cases large enough
to span several query and key tiles and to run on several threads.
"""
import numpy as np
import pytest

import attnpy
from attnpy import _core
import test_sdpa as parity
from reference import sdpa_reference

KERNELS = attnpy.supported_kernels()
THREADS = [1, 3]


@pytest.fixture
def kernel_and_threads(request):
    kernel, threads = request.param
    attnpy.set_kernel(kernel)
    attnpy.set_num_threads(threads)
    yield kernel, threads
    attnpy.set_kernel("auto")
    attnpy.set_num_threads(0)


SETTINGS = [pytest.param((k, t), id=f"{k}-{t}threads") for k in KERNELS for t in THREADS]
ALL_CASES = list(parity.CASES)


def test_every_kernel_of_this_machine_exists():
    """x86-64 CI machines have AVX-512: every x86 dispatch path is exercised
    there; an ARM64 run (under qemu) has NEON."""
    import platform
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        assert {"reference", "baseline", "avx2"} <= set(KERNELS) and "neon" not in KERNELS
        if " avx512f " in open("/proc/cpuinfo").read():
            assert "avx512" in KERNELS
    elif machine in ("aarch64", "arm64"):
        assert set(KERNELS) == {"reference", "baseline", "neon"}
        assert attnpy.get_kernel() == "neon"
    else:
        assert "reference" in KERNELS


@pytest.mark.slow
@pytest.mark.torch      # the parity matrix compares with torch too
@pytest.mark.parametrize("kernel_and_threads", SETTINGS, indirect=True)
def test_parity_matrix_under_kernel(kernel_and_threads):
    for case in ALL_CASES:
        parity.test_parity(*case.values)


def big_case(rng, shape_q, shape_k, Ev, mask=None, **kw):
    q = rng.standard_normal(shape_q, dtype=np.float32)
    k = rng.standard_normal(shape_k, dtype=np.float32)
    v = rng.standard_normal(shape_k[:-1] + (Ev,), dtype=np.float32)
    return q, k, v, dict(attn_mask=mask, **kw)


def as_float64(case):
    q, k, v, kw = case
    mask = kw.get("attn_mask")
    if mask is not None and mask.dtype == np.float32:
        kw = dict(kw, attn_mask=mask.astype(np.float64))
    return q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), kw


def big_cases():
    rng = np.random.default_rng(7)
    L, S = 100, 300
    bool_mask = rng.random((2, 1, L, S)) > 0.3
    bool_mask[:, :, 5] = False                       # a fully masked row
    float_mask = rng.standard_normal((L, S)).astype(np.float32)
    float_mask[:, 200:260] = -np.inf                 # a fully masked key block
    k_storage = rng.standard_normal((2, 4, 64, S), dtype=np.float32)
    yield "plain", big_case(rng, (2, 4, L, 64), (2, 4, S, 64), 64)
    yield "causal_L<S", big_case(rng, (2, 4, L, 64), (2, 4, S, 64), 48, is_causal=True)
    yield "causal_L>S", big_case(rng, (1, 2, S, 32), (1, 2, L, 32), 16, is_causal=True)
    yield "bool_mask", big_case(rng, (2, 4, L, 64), (2, 4, S, 64), 64, mask=bool_mask)
    yield "float_mask", big_case(rng, (2, 4, L, 40), (2, 4, S, 40), 24, mask=float_mask)
    yield "gqa", big_case(rng, (2, 8, L, 64), (2, 2, S, 64), 64, enable_gqa=True)
    q, _, v, kw = big_case(rng, (2, 4, L, 64), (2, 4, S, 64), 64)
    yield "transposed_key", (q, k_storage.swapaxes(-1, -2), v, kw)
    yield "odd_sizes", big_case(rng, (3, 33, 7), (3, 129, 7), 5)


BIG = list(big_cases())


@pytest.mark.parametrize("kernel_and_threads", SETTINGS, indirect=True)
@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "noweights"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name, case", BIG, ids=[name for name, _ in BIG])
def test_tiles_and_threads(kernel_and_threads, dtype, need_weights, name, case):
    q, k, v, kw = case if dtype == np.float32 else as_float64(case)
    res = attnpy.scaled_dot_product_attention(q, k, v, need_weights=need_weights, **kw)
    ref_out, ref_w = sdpa_reference(q, k, v, **kw)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == np.float32 else dict(atol=1e-12, rtol=1e-12)
    np.testing.assert_allclose(res.output, ref_out, **tol)
    dead = ref_w.sum(-1) == 0
    assert np.all(res.output[dead] == 0)
    if need_weights:
        np.testing.assert_allclose(res.weights, ref_w, **tol)
        assert np.all(res.weights[ref_w == 0] == 0), "masked keys must get exactly zero"


@pytest.mark.parametrize("kernel", [k for k in KERNELS if k != "reference"])
def test_fast_kernel_against_reference_kernel(kernel):
    """The fast kernels are checked against the readable one, case by case."""
    for name, (q, k, v, kw) in BIG:
        with attnpy.use_kernel("reference"):
            ref = attnpy.scaled_dot_product_attention(q, k, v, **kw)
        with attnpy.use_kernel(kernel):
            fast = attnpy.scaled_dot_product_attention(q, k, v, **kw)
        np.testing.assert_allclose(fast.output, ref.output, atol=2e-6, rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(fast.weights, ref.weights, atol=1e-6, rtol=1e-5, err_msg=name)


def test_results_do_not_depend_on_thread_count():
    """Each work item owns its rows, so threads change nothing, bit for bit."""
    _, (q, k, v, kw) = BIG[1]
    outs = []
    for threads in (1, 2, 3, 5):
        attnpy.set_num_threads(threads)
        outs.append(attnpy.scaled_dot_product_attention(q, k, v, **kw))
    attnpy.set_num_threads(0)
    for r in outs[1:]:
        np.testing.assert_array_equal(r.output, outs[0].output)
        np.testing.assert_array_equal(r.weights, outs[0].weights)


def test_non_finite_values_at_masked_keys_do_not_leak():
    """A NaN in the value row of a masked key has zero weight and is not read,
    in every kernel (the fast ones take a careful path for such blocks)."""
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((1, 2, 40, 16), dtype=np.float32) for _ in range(3))
    v[..., 7, :] = np.nan
    mask = np.ones((40, 40), bool)
    mask[:, 7] = False
    for kernel in KERNELS:
        with attnpy.use_kernel(kernel):
            for nw in (True, False):
                out = attnpy.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                          need_weights=nw).output
                assert np.isfinite(out).all(), kernel


def test_set_kernel_and_threads_errors():
    with pytest.raises(ValueError, match="kernel"):
        attnpy.set_kernel("sse9")
    with pytest.raises(TypeError, match="kernel"):
        attnpy.set_kernel(3)
    with pytest.raises(ValueError):
        attnpy.set_num_threads(-1)
    with pytest.raises(TypeError):
        attnpy.set_num_threads("2")
    attnpy.set_num_threads(2)
    assert attnpy.get_num_threads() == 2
    attnpy.set_num_threads(0)
    with attnpy.use_kernel("reference"):
        assert attnpy.get_kernel() == "reference"
    assert attnpy.get_kernel() == KERNELS[-1]


@pytest.mark.parametrize("kernel_and_threads", SETTINGS, indirect=True)
def test_projections_under_kernel(kernel_and_threads):
    """The multi-head layer's linear layers (x W^T + b) in every kernel:
    several row and column blocks (L = 70 > 32 rows, E = 160 > 128 columns),
    against float64 NumPy on the same float32 numbers."""
    E, H = 160, 5
    mha = attnpy.MultiheadAttention(E, H, kdim=48, vdim=24, seed=3)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 70, E), dtype=np.float32)
    kv_k = rng.standard_normal((2, 50, 48), dtype=np.float32)
    kv_v = rng.standard_normal((2, 50, 24), dtype=np.float32)
    t = mha(x, kv_k, kv_v, trace=True).trace
    sd = {k: v.astype(np.float64) for k, v in mha.state_dict().items()}
    b = sd["in_proj_bias"]
    q = x.astype(np.float64) @ sd["q_proj_weight"].T + b[:E]
    k = kv_k.astype(np.float64) @ sd["k_proj_weight"].T + b[E:2 * E]
    v = kv_v.astype(np.float64) @ sd["v_proj_weight"].T + b[2 * E:]
    out = t.concat.astype(np.float64) @ sd["out_proj.weight"].T + sd["out_proj.bias"]

    def heads(a):
        return a.reshape(a.shape[0], a.shape[1], H, E // H).transpose(0, 2, 1, 3)
    for name, mine, exact in (("q", t.q, heads(q)), ("k", t.k, heads(k)), ("v", t.v, heads(v)),
                              ("output", t.output, out)):
        np.testing.assert_allclose(mine, exact, atol=2e-5, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("kernel_and_threads", SETTINGS, indirect=True)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_self_attention_projections_share_x(kernel_and_threads, dtype):
    """Self-attention (query is key is value) with enough rows computes the q,
    k, v projections in one product with the packed weight; cross-attention
    with equal copies takes the separate path. Same sums in the same order:
    bit-identical."""
    E, H = 96, 4
    mha = attnpy.MultiheadAttention(E, H, dtype=dtype, seed=5)
    rng = np.random.default_rng(12)
    for p in mha.parameters():
        p[...] = rng.standard_normal(p.shape) * 0.3
    x = rng.standard_normal((4, 130, E)).astype(dtype)   # 130 rows: a partial tile of rows
    shared = mha(x, trace=True)
    separate = mha(x, x.copy(), x.copy(), trace=True)
    for name in ("q", "k", "v", "output"):
        np.testing.assert_array_equal(getattr(shared.trace, name), getattr(separate.trace, name),
                                      err_msg=name)
    sd = {k: v.astype(np.float64) for k, v in mha.state_dict().items()}
    qkv = x.astype(np.float64) @ sd["in_proj_weight"].T + sd["in_proj_bias"]
    tol = dict(atol=2e-5, rtol=1e-5) if dtype == np.float32 else dict(atol=1e-12, rtol=1e-12)
    got = np.concatenate([shared.trace.q, shared.trace.k, shared.trace.v], axis=1)
    want = qkv.reshape(4, 130, 3 * H, E // H).transpose(0, 2, 1, 3)
    np.testing.assert_allclose(got, want, **tol)


BACKWARD_CASES = [
    ("plain", dict(), (2, 3, 130, 40), (2, 3, 300, 40), 24),
    ("causal", dict(is_causal=True), (1, 2, 300, 64), (1, 2, 260, 64), 64),
    ("gqa_bool_mask", dict(enable_gqa=True, mask=True), (2, 4, 70, 32), (2, 2, 150, 32), 16),
    ("broadcast_kv", dict(), (3, 2, 129, 16), (1, 2, 129, 16), 16),
]


@pytest.mark.torch
@pytest.mark.parametrize("kernel_and_threads", SETTINGS, indirect=True)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name, kw, qs, ks, Ev", BACKWARD_CASES,
                         ids=[c[0] for c in BACKWARD_CASES])
def test_backward_under_kernel(kernel_and_threads, dtype, name, kw, qs, ks, Ev):
    """The backward pass in every kernel (the fast one: two phases over
    several query and key blocks), against torch.autograd in float64."""
    import torch
    rng = np.random.default_rng(21)
    q = rng.standard_normal(qs).astype(dtype)
    k = rng.standard_normal(ks).astype(dtype)
    v = rng.standard_normal(ks[:-1] + (Ev,)).astype(dtype)
    kw = dict(kw)
    if kw.pop("mask", False):
        kw["attn_mask"] = rng.random((qs[-2], ks[-2])) < 0.7
    out_shape = np.broadcast_shapes(qs[:-3], ks[:-3]) + (qs[-3], qs[-2], Ev)
    dout = rng.standard_normal(out_shape).astype(dtype)
    g = attnpy.scaled_dot_product_attention_backward(dout, q, k, v, **kw)

    tq, tk, tv = (torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (q, k, v))
    mask = kw.get("attn_mask")
    t = torch.nn.functional.scaled_dot_product_attention(
        tq, tk, tv, attn_mask=None if mask is None else torch.from_numpy(mask),
        is_causal=kw.get("is_causal", False), enable_gqa=kw.get("enable_gqa", False))
    t.backward(torch.from_numpy(dout.astype(np.float64)))
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == np.float32 else dict(atol=1e-10, rtol=1e-10)
    for mine, theirs in ((g.query, tq), (g.key, tk), (g.value, tv)):
        assert mine.shape == theirs.shape
        np.testing.assert_allclose(mine, theirs.grad.numpy(), **tol)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_linear_layer_with_no_inputs_gives_its_bias(kernel, dtype):
    """K = 0: y = b exactly, whatever the workspace held before (the fuzzer
    found a kernel that left y as the previous call's leftovers)."""
    rng = np.random.default_rng(7)
    attnpy.set_kernel(kernel)
    try:
        for _ in range(5):
            x = rng.standard_normal((2, 200, 300)).astype(dtype)
            w = rng.standard_normal((65, 300)).astype(dtype)
            _core.linear(x, w, np.zeros(65, dtype))  # leaves its workspace dirty
            b = rng.standard_normal(65).astype(dtype)
            y = _core.linear(np.zeros((4, 1, 0), dtype), np.zeros((65, 0), dtype), b)
            np.testing.assert_array_equal(y, np.broadcast_to(b, (4, 1, 65)))
    finally:
        attnpy.set_kernel("auto")


def _layout(a, how, rng):
    """a (..., r, c) as the kernel may meet it: stored as is, as a transposed
    copy viewed back, or as every other column of a wider buffer."""
    if how == "contiguous":
        return a
    if how == "transposed":
        return np.ascontiguousarray(np.swapaxes(a, -1, -2)).swapaxes(-1, -2)
    wide = rng.standard_normal(a.shape[:-1] + (2 * a.shape[-1],)).astype(a.dtype)
    wide[..., ::2] = a
    return wide[..., ::2]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_linear_layouts_and_tiles(kernel, dtype):
    """_core.linear on every kernel against float64 NumPy: x, W and out each
    contiguous, transposed or strided (x is read in place or copied, W^T is
    packed from rows or from columns, out is stored by vectors or element by
    element); K over several passes (of 384 floats, 192 doubles; 384 is
    exactly one or two) and O over several packed slices of 256 columns,
    with partial tiles of rows and columns; bias and accumulate; 1 and 3
    threads."""
    rng = np.random.default_rng(21)
    attnpy.set_kernel(kernel)
    try:
        for (N, M, K, O) in ((2, 13, 800, 270), (1, 70, 385, 33), (1, 5, 384, 40),
                             (3, 9, 1, 257)):
            for how_x, how_w, how_y in (("contiguous", "contiguous", "contiguous"),
                                        ("transposed", "transposed", "strided"),
                                        ("strided", "contiguous", "transposed"),
                                        ("contiguous", "strided", "contiguous")):
                x64 = rng.standard_normal((N, M, K))
                w64 = rng.standard_normal((O, K))
                b64 = rng.standard_normal(O)
                y0 = rng.standard_normal((N, M, O))
                x = _layout(x64.astype(dtype), how_x, rng)
                w = _layout(w64.astype(dtype), how_w, rng)
                b = b64.astype(dtype)
                for threads in (1, 3):
                    attnpy.set_num_threads(threads)
                    out = _layout(y0.astype(dtype), how_y, rng)
                    _core.linear(x, w, b, out=out, accumulate=True)
                    want = y0.astype(dtype).astype(np.float64) + b64.astype(dtype) + \
                        x.astype(np.float64) @ w.astype(np.float64).T
                    tol = dict(rtol=2e-5, atol=2e-5 * np.sqrt(K)) if dtype == np.float32 else \
                        dict(rtol=1e-12, atol=1e-12 * np.sqrt(K))
                    np.testing.assert_allclose(out, want, **tol, err_msg=f"{how_x} {how_w} {how_y}")
                    y = _core.linear(x, w)
                    np.testing.assert_allclose(y, x.astype(np.float64) @ w.astype(np.float64).T,
                                               **tol, err_msg=f"{how_x} {how_w} no bias")
    finally:
        attnpy.set_kernel("auto")
        attnpy.set_num_threads(0)

"""Large magnitudes: q . k overflowing the element type (NaN policy rule 6).

The rule (attn_core.h, README "Guarantees"): every kernel and both paths
(with and without weights) agree with the float64 reference wherever the
weights and the output are representable in the dtype. Scores may overflow;
their softmax need not. Each test runs on every kernel this CPU has, in
float32 and float64.

Before the fix, the tiled kernels (the default) returned NaN for every one of
these in float32, and the reference kernel returned NaN with weights and the
right answer without (issue 12, items 1 and 2).
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnpy
from reference import sdpa_backward_reference, sdpa_reference

KERNELS = attnpy.supported_kernels()
DTYPES = [np.float32, np.float64]
WIDE = np.finfo(np.longdouble).max > np.finfo(np.float64).max  # x87 / quad long double

sdpa = attnpy.scaled_dot_product_attention


@pytest.fixture(params=KERNELS)
def kernel(request):
    with attnpy.use_kernel(request.param):
        yield request.param


def wide_reference(q, k, v, scale, is_causal=False):
    """out, weights with every step in long double, the scale applied to q
    first: an oracle for float64 inputs whose q . k overflows float64. A row
    with no key left (causal, L > S) gets zero weights, as the rule says."""
    q, k, v = (np.asarray(a, np.longdouble) for a in (q, k, v))
    s = (q * np.longdouble(scale)) @ np.swapaxes(k, -1, -2)
    if is_causal:
        s = s + np.where(np.tril(np.ones(s.shape[-2:], bool)), 0, -np.inf)
    with np.errstate(invalid="ignore"):
        w = np.exp(s - s.max(-1, keepdims=True))
        w = np.nan_to_num(w / w.sum(-1, keepdims=True))
    return (w @ v).astype(np.float64), w.astype(np.float64)


def big(dtype):
    """A magnitude whose square overflows the dtype; its q . k times a small
    scale does not."""
    return 1e19 if dtype == np.float32 else 1e160


# ---------------------------------------------------------------------------
# the issue's examples, on every kernel and both paths

@pytest.mark.parametrize("need_weights", [True, False])
def test_issue_example_one_dominant_key(kernel, need_weights):
    # float32: q . k = 4e38 overflows, scale q . k = 2e38 does not
    q = np.array([[1e19] * 4], np.float32)
    k = np.array([[1e19] * 4, [0] * 4], np.float32)
    v = np.array([[1], [2]], np.float32)
    r = sdpa(q, k, v, need_weights=need_weights)
    np.testing.assert_array_equal(r.output, [[1.0]])
    if need_weights:
        np.testing.assert_array_equal(r.weights, [[1.0, 0.0]])


@pytest.mark.parametrize("need_weights", [True, False])
def test_issue_example_score_overflows(kernel, need_weights):
    # scale q . k = 7e39 overflows float32 itself: the softmax is still [1, 0]
    q = np.array([[1e20, 0]], np.float32)
    k = np.array([[1e20, 0], [0, 0]], np.float32)
    v = np.array([[1], [2]], np.float32)
    r = sdpa(q, k, v, need_weights=need_weights)
    np.testing.assert_array_equal(r.output, [[1.0]])
    if need_weights:
        np.testing.assert_array_equal(r.weights, [[1.0, 0.0]])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("is_causal", [False, True])
def test_large_inputs_tiny_scale(kernel, dtype, need_weights, is_causal):
    # the issue's 140 x 133, E = 16, inputs near 1e20 with scale 1e-38 (float32;
    # float64: near 1e160 with scale 1e-300): every output was NaN
    rng = np.random.default_rng(12)
    m = big(dtype) * 10
    scale = 1e-38 if dtype == np.float32 else 1e-300
    q = (rng.standard_normal((2, 140, 16)) * m).astype(dtype)
    k = (rng.standard_normal((2, 133, 16)) * m).astype(dtype)
    v = rng.standard_normal((2, 133, 8)).astype(dtype)
    r = sdpa(q, k, v, scale=scale, is_causal=is_causal, need_weights=need_weights)
    if dtype == np.float32:
        ref_out, ref_w = sdpa_reference(q, k, v, scale=scale, is_causal=is_causal)
    else:
        if not WIDE:   # MSVC, macOS on ARM: long double is float64, no oracle there
            pytest.skip("needs a long double wider than float64 for the oracle")
        ref_out, ref_w = wide_reference(q, k, v, scale, is_causal)
    tol = 2e-5 if dtype == np.float32 else 1e-12
    assert np.isfinite(r.output).all()
    np.testing.assert_allclose(r.output, ref_out, atol=tol, rtol=0)
    if need_weights:
        np.testing.assert_allclose(r.weights, ref_w, atol=tol, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_values_many_keys(kernel, dtype):
    # the flash kernel's unnormalised sum of v reaches keys x max|v| before
    # it is divided: 300 keys of 1e37 overflowed float32, the output is 1e37
    vmax = 1e37 if dtype == np.float32 else 1e306
    q = np.zeros((3, 4), dtype)
    k = np.zeros((300, 4), dtype)
    v = np.full((300, 2), vmax, dtype)
    for need_weights in (True, False):
        r = sdpa(q, k, v, need_weights=need_weights)
        np.testing.assert_allclose(r.output, vmax, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_beyond_the_dtype(kernel, dtype):
    # a finite scale that float32 cannot hold, on small inputs: the tiles
    # would multiply by (float)1e39 = inf
    q = np.full((2, 4), 1e-21, dtype)
    k = np.full((3, 4), 1e-21, dtype)
    k[1] *= 2
    v = np.arange(6, dtype=dtype).reshape(3, 2)
    scale = 1e39 if dtype == np.float32 else 1e300
    ref_out, ref_w = sdpa_reference(q, k, v, scale=scale)
    r = sdpa(q, k, v, scale=scale)
    np.testing.assert_allclose(r.output, ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(r.weights, ref_w, rtol=1e-5, atol=1e-6)


def test_score_beyond_float64_is_nan_as_torch(kernel):
    # the documented limit: a score beyond 1.8e308 in float64 (here 2e320)
    # makes its row NaN, as float64 NumPy and torch's softmax of +inf do
    q = np.array([[1e160] * 4])
    k = np.array([[1e160] * 4, [0] * 4])
    v = np.array([[1.0], [2.0]])
    ref_out, ref_w = sdpa_reference(q, k, v)
    assert np.isnan(ref_out).all()
    assert np.isnan(sdpa(q, k, v).output).all()


# ---------------------------------------------------------------------------
# the backward pass

@pytest.mark.parametrize("given_weights", [False, True])
def test_backward_large_inputs_tiny_scale(kernel, given_weights):
    rng = np.random.default_rng(5)
    q = (rng.standard_normal((2, 140, 16)) * 1e20).astype(np.float32)
    k = (rng.standard_normal((2, 133, 16)) * 1e20).astype(np.float32)
    v = rng.standard_normal((2, 133, 8)).astype(np.float32)
    dout = rng.standard_normal((2, 140, 8)).astype(np.float32)
    scale = 1e-38
    weights = sdpa(q, k, v, scale=scale).weights if given_weights else None
    g = attnpy.scaled_dot_product_attention_backward(dout, q, k, v, scale=scale, weights=weights)
    ref = sdpa_backward_reference(dout, q, k, v, scale=scale)
    for name, got, want in zip("qkv", (g.query, g.key, g.value), ref):
        assert np.isfinite(got).all(), name
        np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max(), rtol=0,
                                   err_msg=f"grad of {name}")


# ---------------------------------------------------------------------------
# property: large magnitudes up to the dtype's limits, with tiny scales

@st.composite
def large_calls(draw):
    dtype = draw(st.sampled_from(DTYPES))
    top = 38 if dtype == np.float32 else 160   # float64: scale = 10^-(a+b) must exist
    a = draw(st.integers(0, top))
    b = draw(st.integers(0, top))
    L = draw(st.integers(1, 20))
    S = draw(st.integers(1, 20))
    E = draw(st.integers(1, 9))
    seed = draw(st.integers(0, 2**32 - 1))
    # scores of order 1 to 10: representable, and well conditioned in float32
    scale = draw(st.floats(0.1, 3.0)) * 10.0 ** -(a + b) / E
    return dtype, a, b, L, S, E, seed, scale, draw(st.booleans()), draw(st.booleans())


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(large_calls(), st.sampled_from(KERNELS))
def test_property_large_magnitudes(call, kernel):
    dtype, a, b, L, S, E, seed, scale, need_weights, is_causal = call
    if dtype == np.float64 and a + b > 300 and not WIDE:
        return
    rng = np.random.default_rng(seed)
    q = (rng.uniform(-1, 1, (L, E)) * 10.0 ** a).astype(dtype)
    k = (rng.uniform(-1, 1, (S, E)) * 10.0 ** b).astype(dtype)
    v = rng.standard_normal((S, 3)).astype(dtype)
    with attnpy.use_kernel(kernel):
        r = sdpa(q, k, v, scale=scale, is_causal=is_causal, need_weights=need_weights)
    if dtype == np.float64 and a + b > 300:
        ref_out, ref_w = wide_reference(q, k, v, scale, is_causal)
    else:
        ref_out, ref_w = sdpa_reference(q, k, v, scale=scale, is_causal=is_causal)
    tol = 1e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(r.output, ref_out, atol=tol, rtol=0)
    if need_weights:
        np.testing.assert_allclose(r.weights, ref_w, atol=tol, rtol=0)


# ---------------------------------------------------------------------------
# decoding (L <= 4 rows: decode_rows checks rule 6 after the fact)

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L", [1, 3])
def test_decode_rows_non_finite_values_as_the_reference(kernel, dtype, L):
    rng = np.random.default_rng(L)
    S, D = 300, 16
    q = rng.standard_normal((2, L, D)).astype(dtype)
    k = rng.standard_normal((2, S, D)).astype(dtype)
    v = rng.standard_normal((2, S, D)).astype(dtype)
    mask = np.ones((L, S), bool)
    mask[:, 7] = False
    v[0, 7] = np.nan                     # a hidden key's NaN value is never read
    v[1, 200, 3] = np.inf                # an open key's inf value reaches the output
    k[1, 250] *= 1e3                     # the others' weights underflow next to key 250
    out = sdpa(q, k, v, attn_mask=mask, need_weights=False).output
    with attnpy.use_kernel("reference"):
        expected = sdpa(q, k, v, attn_mask=mask, need_weights=False).output
    assert np.isfinite(out[0]).all()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    # q . k overflowing T in one decoding row: the reference's answer
    q2 = q.copy()
    q2[0, 0] = big(dtype)
    out = sdpa(q2, k, v, is_causal=True, query_offset=S - L, need_weights=False).output
    with attnpy.use_kernel("reference"):
        expected = sdpa(q2, k, v, is_causal=True, query_offset=S - L, need_weights=False).output
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)

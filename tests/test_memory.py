"""Memory: zero copies, no leaks, size limits, allocation failures.

- zero copies, measured: inputs of any strides are read in place;
- no leaks: every public function, and its error paths, called thousands of
  times leaves memory and the inputs' reference counts where they were;
- sizes that cannot exist or cannot fit: ValueError or MemoryError before
  any allocation;
- fault injection: an allocation failure anywhere becomes MemoryError, never
  a crash, a leak or a wrong result.

Zero copies: two independent measurements:
- tracemalloc sees every buffer NumPy allocates (a copy made through NumPy,
  such as np.ascontiguousarray, shows up in its peak);
- the peak RSS of a fresh process sees everything, the core's own malloc too.
The inputs are large and non-contiguous (transposed, stepped, broadcast,
Fortran order), so copying any of them would exceed the bounds below.
"""
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import attnpy
from attnpy import _core

MiB = 1 << 20


def strided_inputs(dtype, H=8, L=4, S=1 << 16, E=64, Ev=32):
    """q Fortran-ordered, k a transposed view, v a view with a step of 2.

    key and value are large (S keys), query and the outputs small: one copy
    of key or value would be H*S*E*itemsize bytes (128 MiB in float32).
    """
    rng = np.random.default_rng(0)
    # generated directly in dtype: no temporaries to raise the RSS high-water mark
    q = np.asfortranarray(rng.standard_normal((H, L, E), dtype=dtype))
    k_storage = rng.standard_normal((H, E, S), dtype=dtype)
    k = k_storage.swapaxes(-1, -2)                   # (H, S, E), strides (., itemsize, S*itemsize)
    v_storage = rng.standard_normal((H, S, 2 * Ev), dtype=dtype)
    v = v_storage[..., ::2]                          # (H, S, Ev), a step of 2
    assert not q.flags.c_contiguous and not k.flags.c_contiguous and not v.flags.c_contiguous
    return q, k, v


@pytest.mark.parametrize("need_weights", [True, False])
def test_numpy_allocations_are_only_the_outputs(need_weights):
    q, k, v = strided_inputs(np.float32)
    H, L, S, Ev = q.shape[0], q.shape[1], k.shape[1], v.shape[2]
    itemsize = 4
    expected = H * L * Ev * itemsize + (H * L * S * itemsize if need_weights else 0)
    smallest_copy = min(q.nbytes, k.size * itemsize, v.size * itemsize)

    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        res = attnpy.scaled_dot_product_attention(q, k, v, need_weights=need_weights)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    extra = peak - before
    assert extra >= expected - 4096, "the outputs were not allocated through NumPy?"
    assert extra <= expected + 256 * 1024, (
        f"call allocated {extra} bytes through NumPy; outputs are {expected}")
    assert extra - expected < smallest_copy
    assert (res.weights is not None) == need_weights


RSS_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import numpy as np
    import attnpy
    sys.path.insert(0, {tests!r})
    from test_memory import strided_inputs
    need_weights = {need_weights!r}
    q, k, v = strided_inputs(np.float32)
    # a broadcast view too: the same query for 4 batch entries, stride 0
    q = np.broadcast_to(q, (4,) + q.shape)
    def maxrss():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    attnpy.scaled_dot_product_attention(q[:, :, :1], k[:, :8], v[:, :8])   # warm up
    before = maxrss()
    res = attnpy.scaled_dot_product_attention(q, k, v, need_weights=need_weights)
    after = maxrss()
    out_bytes = res.output.nbytes + (res.weights.nbytes if res.weights is not None else 0)
    print(json.dumps(dict(before=before, after=after, outputs=out_bytes,
                          k_bytes=k.size * 4, v_bytes=v.size * 4)))
""")


@pytest.mark.parametrize("need_weights", [True, False])
def test_peak_rss_is_inputs_plus_outputs(need_weights):
    script = RSS_SCRIPT.format(tests=str(__import__("pathlib").Path(__file__).parent),
                               need_weights=need_weights)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    extra = m["after"] - m["before"]
    # outputs plus a small bounded workspace (page-granular RSS, allocator slack)
    bound = m["outputs"] + 8 * MiB
    assert extra <= bound, f"peak RSS grew by {extra / MiB:.1f} MiB; bound {bound / MiB:.1f} MiB ({m})"
    assert bound < min(m["k_bytes"], m["v_bytes"]), "inputs too small to show a copy"


def test_streaming_never_allocates_an_L_by_S_buffer():
    """need_weights=False at L = S = 4096, 8 heads: an L x S float32 map per
    head would be 64 MiB each; the measured growth stays far below one."""
    script = textwrap.dedent("""
        import json, resource
        import numpy as np
        import attnpy
        H, L, E = 8, 4096, 16
        q = np.ones((H, L, E), np.float32); k = np.ones((H, L, E), np.float32)
        v = np.ones((H, L, E), np.float32)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        res = attnpy.scaled_dot_product_attention(q, k, v, need_weights=False, is_causal=True)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps(dict(extra=after - before, out=res.output.nbytes, ok=bool(np.allclose(res.output, 1)))))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    assert m["ok"]
    one_map = 4096 * 4096 * 4
    assert m["extra"] <= m["out"] + 8 * MiB < one_map, m


# --------------------------------------------------------------------------
# leaks: every public function, and its error paths, called thousands of
# times leaves memory (NumPy's and Python's allocations, and the process's RSS)
# and the inputs' reference counts where they were.


REPS = 2000


def calls():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 3, 5, 4)) for _ in range(3))
    dout = rng.standard_normal((2, 3, 5, 4))
    mask = rng.random((5, 5)) < 0.7
    mha = attnpy.MultiheadAttention(8, 2, add_bias_kv=True, dtype=np.float64, seed=0)
    x = rng.standard_normal((2, 5, 8))
    res = mha(x, trace=True)
    w = rng.standard_normal((8, 4))
    good = {
        "sdpa": lambda: attnpy.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        "sdpa_streaming": lambda: attnpy.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                      need_weights=False),
        "sdpa_backward": lambda: attnpy.scaled_dot_product_attention_backward(dout, q, k, v,
                                                                              trace=True),
        "mha": lambda: mha(x, trace=True),
        "mha_backward": lambda: mha.backward(res, x),
        "self_attention": lambda: attnpy.self_attention(x, w, w, w, trace=True),
        "causal_mask": lambda: attnpy.causal_mask(5, 7, align="bottom_right"),
    }
    bad = {
        "sdpa_dtype": lambda: attnpy.scaled_dot_product_attention(q, k.astype(np.float32), v),
        "sdpa_shape": lambda: attnpy.scaled_dot_product_attention(q, k[..., :3], v),
        "sdpa_mask": lambda: attnpy.scaled_dot_product_attention(q, k, v, attn_mask=mask[:3]),
        "sdpa_out": lambda: attnpy.scaled_dot_product_attention(q, k, v, out=q),
        "backward_grad": lambda: attnpy.scaled_dot_product_attention_backward(dout[..., :3], q,
                                                                              k, v),
        "mha_mask": lambda: mha(x, key_padding_mask=np.zeros((2, 4), bool)),
        "mha_backward_shape": lambda: mha.backward(res, x[:, :3]),
    }
    return (q, k, v, dout, mask, x), good, bad


def run(fn, expect_error):
    if not expect_error:
        fn()
        return
    try:
        fn()
    except (TypeError, ValueError):
        return
    raise AssertionError("no error")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["good", "bad"])
def test_repeated_calls_do_not_leak(kind):
    inputs, good, bad = calls()
    table = good if kind == "good" else bad
    for name, fn in table.items():
        for _ in range(50):                        # warm up caches and the thread pool
            run(fn, kind == "bad")
        gc.collect()
        refs = [sys.getrefcount(a) for a in inputs]
        tracemalloc.start()
        base, _ = tracemalloc.get_traced_memory()
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for _ in range(REPS):
            run(fn, kind == "bad")
        gc.collect()
        grown, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert [sys.getrefcount(a) for a in inputs] == refs, f"{name}: reference counts moved"
        # a leak of even one small array per call would be > 100 KiB after 2000 calls
        assert grown - base < 64 * 1024, f"{name}: {grown - base} bytes still held"
        assert rss1 - rss0 < 8 * 1024, f"{name}: peak RSS grew {rss1 - rss0} KiB"


# --------------------------------------------------------------------------
# size limits: sizes that cannot exist or cannot fit: ValueError or
# MemoryError before any allocation.
#
# Broadcast views (stride 0) make huge shapes cheap: a (2**40, 1, 1, E) query
# against a (1, 2**40, 1, E) key asks for an output of 2**80 rows. Each input
# fits NumPy's 64-bit sizes; the output cannot. That used to surface as
# NumPy's "array is too big; `arr.size * arr.dtype.itemsize` is larger than
# the maximum possible size", which names no argument. Shapes that are
# possible but larger than memory give MemoryError (NumPy's, with the size).
#
# The MemoryError cases run in a subprocess: under AddressSanitizer (the test
# command's second pass) a malloc of petabytes aborts the process unless
# ASAN_OPTIONS has allocator_may_return_null=1, which the subprocess sets; in
# a normal build the option means nothing.


sdpa, sdpa_bwd = attnpy.scaled_dot_product_attention, attnpy.scaled_dot_product_attention_backward


def huge(shape, tail=(1, 4)):
    """A read-only view of zeros of shape + tail holding one element (all strides 0)."""
    shape = tuple(shape) + tuple(tail)
    return np.broadcast_to(np.zeros((1,) * len(shape)), shape)


@pytest.mark.parametrize("need_weights", [True, False])
def test_output_whose_size_overflows_64_bits_is_a_named_value_error(need_weights):
    for n in (2**40, 2**31):   # 2**80 rows; 2**62 rows x 4 x 8 bytes overflows too
        q, k = huge((n, 1)), huge((1, n))
        named = (r"(output .* of query, key and value|weights .* of query and key .*) would "
                 rf"have shape \({n}, {n}, 1, [14]\): more bytes than any memory holds")
        with pytest.raises(ValueError, match=named):
            sdpa(q, k, k, need_weights=need_weights)


def test_weights_whose_size_overflows_are_named_and_avoidable():
    # output (2**20, 2**20, 1, 1) fits 64 bits (8 TiB); weights (2**20, 2**20, 1, 2**31-1)
    # do not: checked before anything is allocated (without weights: a MemoryError, below)
    q = huge((2**20, 1), (1, 1))
    k = v = huge((1, 2**20), (2**31 - 1, 1))
    with pytest.raises(ValueError, match=r"weights .* of query and key .*need_weights=False"):
        sdpa(q, k, v)


def test_dimension_caps():
    with pytest.raises(ValueError, match=r"L \(query rows\) is 2147483648"):
        sdpa(huge((), (2**31, 3)), np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"S \(key rows\) is 2147483648"):
        sdpa(np.zeros((2, 3)), huge((), (2**31, 3)), huge((), (2**31, 3)))
    x = huge((2**31 - 1,), (2**20, 8))
    with pytest.raises(ValueError, match=r"weights \(N, num_heads, L, S\) of query and key"):
        attnpy.self_attention(x, np.zeros((8, 2)), np.zeros((8, 2)), np.zeros((8, 2)))
    with pytest.raises(ValueError, match="query, key and value dimensions must be at most"):
        attnpy.MultiheadAttention(8, 2, dtype=np.float64)(huge((1,), (2**31, 8)))


def test_multihead_weights_whose_size_overflows_are_named():
    # N * H * L * S' overflows while every input fits
    layer = attnpy.MultiheadAttention(2, 2, dtype=np.float64)
    x = huge((2**20,), (2**31 - 1, 2))
    with pytest.raises(ValueError, match=r"attention weights \(N, num_heads, L, S\) of query and key"):
        layer(x)


def test_possible_but_too_large_is_a_memory_error():
    script = textwrap.dedent(f"""
        import numpy as np, attnpy
        assert attnpy._core.__file__ == {attnpy._core.__file__!r}, attnpy._core.__file__
        sdpa = attnpy.scaled_dot_product_attention
        def huge(shape):
            return np.broadcast_to(np.zeros((1,) * len(shape)), shape)
        cases = [
            # no weights: 8 TiB of output
            lambda: sdpa(huge((2**20, 1, 1, 1)), huge((1, 2**20, 2**31 - 1, 1)),
                         huge((1, 2**20, 2**31 - 1, 1)), need_weights=False),
            # the weights, 8 PiB
            lambda: sdpa(np.zeros((2**20, 3)), huge((2**30, 3)), huge((2**30, 3))),
            lambda: attnpy.MultiheadAttention(8, 2, dtype=np.float64)(
                huge((2**31 - 1, 2**20, 8)), need_weights=False),
            lambda: attnpy.causal_mask(2**30),          # 4 EiB of float32
        ]
        for i, case in enumerate(cases):
            try:
                case()
            except MemoryError:
                print(i, "MemoryError")
            else:
                print(i, "no error")
    """)
    env = dict(os.environ)
    env["ASAN_OPTIONS"] = ":".join(filter(None, [env.get("ASAN_OPTIONS"),
                                                 "allocator_may_return_null=1"]))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines() == [f"{i} MemoryError" for i in range(4)], done.stdout


# --------------------------------------------------------------------------
# fault injection: an allocation failure anywhere becomes MemoryError: never
# a crash, a leak or a wrong result.
#
# The checks are in fault_injection_cases.py. They need the debug hook
# ``_core._fail_alloc``, which only a build with ATTNPY_FAULT_INJECTION=1 (or
# ATTNPY_SANITIZE=1) has:
#
# - in the sanitizer pass of the test command the extension under test is
#   build/asan, which has it: the checks run here, under ASan+UBSan;
# - in the normal pass the extension has no hook (a release build must not):
#   the test builds one with the hook into a temporary folder (about 10 s)
#   and runs the checks in a subprocess against it.
#
# Either way the checks run; the test never skips.


ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent


def _print_report(report, where):
    print(f"\nallocation failures injected ({where}):")
    for name, c in report.items():
        print(f"  {name:42s} {c['failure_points']:3d} failure points: "
              f"{c['memory_errors']:3d} MemoryError, {c['recovered']:3d} recovered by a fallback")
    print(f"  total {sum(c['failure_points'] for c in report.values())} failure points")


def _check(report):
    import fault_injection_cases as cases
    expected = [name for name, _, _ in cases._cases()]
    assert list(report) == expected
    for name, c in report.items():
        assert c["memory_errors"] >= 1 and \
            c["failure_points"] == c["memory_errors"] + c["recovered"], name


@pytest.fixture(scope="module")
def fault_build(tmp_path_factory):
    """attnpy with a fault-injection _core, built into a temporary folder."""
    if hasattr(_core, "_fail_alloc"):
        return None
    tmp = tmp_path_factory.mktemp("fault_build")
    env = dict(os.environ, ATTNPY_FAULT_INJECTION="1", ATTNPY_STRICT="1")
    env.pop("ATTNPY_SANITIZE", None)
    done = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp / "lib"),
         "--build-temp", str(tmp / "obj")],
        cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    for py in (ROOT / "attnpy").glob("*.py"):
        shutil.copy(py, tmp / "lib" / "attnpy")
    return tmp / "lib"


@pytest.mark.slow      # builds the extension once more, with the hook
def test_every_allocation_failure_is_a_memory_error(fault_build):
    sys.path.insert(0, str(HERE))
    try:
        if fault_build is None:  # this build has the hook (the sanitizer pass)
            import fault_injection_cases as cases
            report = cases.run_all()
            where = f"in process, {Path(_core.__file__).parent}"
        else:
            code = ("import sys, json; sys.path[:0] = [%r, %r]; import attnpy; "
                    "assert attnpy.__file__.startswith(%r), attnpy.__file__; "
                    "import fault_injection_cases as c; print(json.dumps(c.run_all()))"
                    % (str(fault_build), str(HERE), str(fault_build)))
            done = subprocess.run([sys.executable, "-c", code], cwd=fault_build,
                                  capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, done.stdout + done.stderr
            report = json.loads(done.stdout.strip().splitlines()[-1])
            where = f"subprocess, {fault_build}"
        _check(report)
    finally:
        sys.path.remove(str(HERE))
    _print_report(report, where)


def test_release_build_has_no_hook():
    """The hook only exists where it was asked for: never in the normal build."""
    in_debug_build = os.environ.get("ATTNPY_SANITIZE") == "1" or "build/asan" in _core.__file__
    assert hasattr(_core, "_fail_alloc") == in_debug_build


# --------------------------------------------------------------------------
# size limits: regressions


def run_isolated(code):
    """Run code in a fresh interpreter: a crash must show as a failed test,
    not take the test run down."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120)


# Regression: huge broadcast dims overflowed the workspace sizes instead of raising (code review)
def test_huge_broadcast_dims_raise_instead_of_overflowing_workspaces():
    proc = run_isolated("""
        import numpy as np, attnpy
        E = 2**55
        q = np.broadcast_to(np.ones((1, 1)), (2, E))
        for nw in (True, False):
            try:
                attnpy.scaled_dot_product_attention(q, q, np.ones((2, 4)), need_weights=nw)
            except ValueError as e:
                assert "2**31" in str(e), e
            else:
                raise SystemExit("no error")
        mha = attnpy.MultiheadAttention(8, 2)
        x = np.broadcast_to(np.ones((1, 1, 1), np.float32), (1, 2**33, 8))   # L = 2**33
        try:
            mha(x)
        except ValueError as e:
            assert "2**31" in str(e), e
        else:
            raise SystemExit("no error from the layer")
        print("ok")
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "ok"


# Regression: causal_mask(2**63, 0) returned a (0, 0) mask (fuzzer)
@pytest.mark.parametrize("L, S, name", [(2**63, 0, "L"), (2**63 + 5, 0, "L"), (3, 2**64, "S"),
                                        (2**31, 1, "L"), (0, 2**31, "S")])
def test_causal_mask_too_large_raises_naming_the_size(L, S, name):
    with pytest.raises(ValueError, match=rf"^{name} "):
        attnpy.causal_mask(L, S)


# Regression: causal_mask of L x S beyond 63 bits: NumPy's message named neither size (fuzzer)
def test_causal_mask_beyond_64_bits_names_both_sizes():
    # within the dimension limit, but L x S x 4 bytes does not fit in 63 bits:
    # NumPy's own message ("array is too big") would name neither
    with pytest.raises(ValueError, match=r"^L x S = 2147483647 x 2147483647 is too large"):
        attnpy.causal_mask(2**31 - 1)


# Regression: an empty causal_mask at the largest size needed a row index as long as L (fuzzer)
def test_causal_mask_empty_at_the_largest_size():
    import tracemalloc
    tracemalloc.start()
    try:
        m = attnpy.causal_mask(2**31 - 1, 0, align="bottom_right")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert m.shape == (2**31 - 1, 0) and m.dtype == np.float32
    assert peak < 1 << 20, peak


def _wide(rows, cols, dtype=np.float32):
    return np.lib.stride_tricks.as_strided(np.zeros(1, dtype), (rows, cols), (0, 0))


# Regression: self_attention accepted a w_v of width 2**31 and allocated 8 GiB (fuzzer)
def test_self_attention_value_width_beyond_limit_raises():
    x = np.ones((1, 2), np.float32)
    w = np.ones((2, 3), np.float32)
    for wq, wk, wv in ((w, w, _wide(2, 2**31)), (_wide(2, 2**31), _wide(2, 2**31), w)):
        with pytest.raises(ValueError, match=r"2\*\*31"):
            attnpy.self_attention(x, wq, wk, wv)

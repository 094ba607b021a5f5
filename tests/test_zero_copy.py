"""Zero copies, measured: inputs of any strides are read in place.

Two independent measurements:
- tracemalloc sees every buffer NumPy allocates (a copy made through NumPy,
  such as np.ascontiguousarray, shows up in its peak);
- the peak RSS of a fresh process sees everything, the core's own malloc too.
The inputs are large and non-contiguous (transposed, stepped, broadcast,
Fortran order), so copying any of them would exceed the bounds below.
"""
import json
import subprocess
import sys
import textwrap
import tracemalloc

import numpy as np
import pytest

import attnpy

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
    from test_zero_copy import strided_inputs
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

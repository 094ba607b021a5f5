"""A long attnpy call, to be interrupted (tests/test_interrupt.py).

    python interrupt_child.py CASE

prints "ready", runs CASE's long call (several seconds uninterrupted), then
"interrupted <s>" or "finished <s>" (seconds since the call started), then
"idle_cpu <s>" (the process's CPU time over the next 0.5 s: 0 when no thread
kept computing), then "next_ok <bool>" (a small call right after matches the
float64 reference), then "threads <n>" (Python threads alive).
"""
import sys
import threading
import time

import numpy as np

import attnpy
from reference import sdpa_reference

rng = np.random.default_rng(0)


def randn(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def case_sdpa_flash():          # the tiled kernel, no weights: about 6 s on 2 cores
    q, k, v = randn(1, 16, 16384, 64), randn(1, 16, 16384, 64), randn(1, 16, 16384, 64)
    return lambda: attnpy.scaled_dot_product_attention(q, k, v, need_weights=False)


def case_sdpa_reference_weights():   # the reference kernel, with weights: about 4 s
    q, k, v = randn(4, 4096, 64), randn(4, 4096, 64), randn(4, 4096, 64)

    def run():
        with attnpy.use_kernel("reference"):
            attnpy.scaled_dot_product_attention(q, k, v)
    return run


def case_backward_tiled():      # the tiled backward: about 7 s
    q, k, v, g = (randn(1, 16, 8192, 64) for _ in range(4))
    return lambda: attnpy.scaled_dot_product_attention_backward(g, q, k, v)


def case_backward_reference():  # one problem, one work item: the per-row check
    q, k, v, g = (randn(1, 1, 6144, 64) for _ in range(4))
    return lambda: attnpy.scaled_dot_product_attention_backward(g, q, k, v, trace=True)


def case_mha_trace():           # MultiheadAttention with its full trace
    mha = attnpy.MultiheadAttention(256, 4, batch_first=True)
    x = randn(1, 4096, 256)

    def run():
        res = mha(x, trace=True)
        mha.backward(res, np.ones_like(res.output))
    return run


def main():
    run = globals()["case_" + sys.argv[1]]()
    print("ready", flush=True)
    t0 = time.monotonic()
    try:
        run()
        print("finished", time.monotonic() - t0, flush=True)
    except KeyboardInterrupt:
        print("interrupted", time.monotonic() - t0, flush=True)
    c0 = time.process_time()
    time.sleep(0.5)
    print("idle_cpu", time.process_time() - c0, flush=True)
    q, k, v = randn(2, 5, 3), randn(2, 7, 3), randn(2, 7, 4)
    out, weights = attnpy.scaled_dot_product_attention(q, k, v)
    ref_out, ref_w = sdpa_reference(q, k, v)
    ok = np.allclose(out, ref_out, atol=1e-5) and np.allclose(weights, ref_w, atol=1e-6)
    print("next_ok", ok, flush=True)
    print("threads", threading.active_count(), flush=True)


if __name__ == "__main__":
    main()

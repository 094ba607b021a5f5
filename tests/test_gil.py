"""The GIL is released while the core computes."""
import threading
import time

import numpy as np

import attnpy


def test_other_python_threads_run_during_a_long_call():
    rng = np.random.default_rng(0)
    # large enough to take a while even on the fast kernels (about 17 GFLOP)
    q, k, v = (rng.standard_normal((16, 2048, 64), dtype=np.float32) for _ in range(3))
    window = {}

    def worker():
        window["start"] = time.perf_counter()
        attnpy.scaled_dot_product_attention(q, k, v)
        window["end"] = time.perf_counter()

    ticks = []
    t = threading.Thread(target=worker)
    t.start()
    while t.is_alive():
        ticks.append(time.perf_counter())
    t.join()
    duration = window["end"] - window["start"]
    during = [x for x in ticks if window["start"] < x < window["end"]]
    # With the GIL held for the whole call, the main thread would be frozen
    # from the call's start to its end: at most a switch interval (5 ms) of
    # ticks. Here it must have kept ticking for most of the call.
    assert duration > 0.05, f"call too short ({duration:.3f} s) to tell"
    assert len(during) > 1000, f"main thread ticked {len(during)} times in {duration:.3f} s"
    covered = (during[-1] - during[0]) / duration
    assert covered > 0.8, f"main thread ran during only {covered:.0%} of the call"

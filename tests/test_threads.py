"""The thread pool: the thread count follows OMP_NUM_THREADS and
set_num_threads, threaded calls are safe after fork(), and concurrent Python
threads get the same results as serial calls; and the GIL is released while
the core computes."""
import os
import subprocess
import sys
import threading
import time

import numpy as np

import attnpy


def inputs(seed=0, shape=(2, 4, 300, 64)):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal(shape, dtype=np.float32) for _ in range(3))


def test_omp_num_threads_sets_the_default():
    code = "import attnpy; print(attnpy.get_num_threads())"
    for n in ("1", "3"):
        env = dict(os.environ, OMP_NUM_THREADS=n)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True).stdout
        assert out.strip() == n


def test_threaded_call_after_fork():
    """The parent's pool has running workers; the child has none and must
    start its own rather than wait for threads that do not exist there."""
    attnpy.set_num_threads(2)
    q, k, v = inputs()
    expected = attnpy.scaled_dot_product_attention(q, k, v, is_causal=True).output
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a threaded call, then report
        try:
            os.close(r)
            out = attnpy.scaled_dot_product_attention(q, k, v, is_causal=True).output
            os.write(w, b"same" if np.array_equal(out, expected) else b"diff")
        finally:
            os._exit(0)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    answer = os.read(r, 16)
    os.close(r)
    attnpy.set_num_threads(0)
    assert os.WEXITSTATUS(status) == 0
    assert answer == b"same"


def test_concurrent_python_threads_match_serial_calls():
    """Several Python threads call at once (the GIL is released); one of them
    gets the pool, the others run alone; every result is bit-identical to
    the serial one."""
    cases = [inputs(seed) for seed in range(4)]
    serial = [attnpy.scaled_dot_product_attention(*c, is_causal=bool(i % 2)).output
              for i, c in enumerate(cases)]
    results = [[None] * 5 for _ in cases]

    def work(i):
        for rep in range(5):
            results[i][rep] = attnpy.scaled_dot_product_attention(
                *cases[i], is_causal=bool(i % 2)).output

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(len(cases)):
        for rep in range(5):
            np.testing.assert_array_equal(results[i][rep], serial[i])


# --------------------------------------------------------------------------
# the GIL is released while the core computes


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

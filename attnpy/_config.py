"""Threads and kernels of the C core."""
import numbers
from contextlib import contextmanager

from . import _core

__all__ = ["set_num_threads", "get_num_threads", "set_kernel", "get_kernel",
           "supported_kernels", "use_kernel"]

_choice = "auto"  # what set_kernel was last given (get_kernel says what it resolved to)


def set_num_threads(n):
    """Use ``n`` threads in the core (``0``: back to the default, which is
    ``OMP_NUM_THREADS`` when set, else the CPUs online)."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"n must be an int; got {type(n).__name__}")
    if not 0 <= n <= _core.MAX_THREADS:
        raise ValueError(f"n must be between 1 and {_core.MAX_THREADS} (0: the default); "
                         f"got {n}")
    _core.set_num_threads(int(n))


def get_num_threads():
    """The number of threads the core uses."""
    return _core.get_num_threads()


def set_kernel(name):
    """Choose the kernel: ``"auto"`` (the fastest this CPU runs),
    ``"reference"`` (the readable one students read), or a tiled kernel
    (float32 and float64) for one instruction set: ``"baseline"`` (16-byte
    vectors: SSE2 on x86-64, NEON on ARM64), ``"avx2"`` and ``"avx512"`` on
    x86-64, ``"neon"`` on ARM64 (two NEON registers per vector).
    :func:`supported_kernels` lists what this CPU and build run. The trace
    and dropout always use the reference."""
    global _choice
    _core.set_kernel(name)
    _choice = name


def get_kernel():
    """The kernel in use (what ``"auto"`` chose)."""
    return _core.get_kernel()


def supported_kernels():
    """The kernels this CPU can run."""
    return _core.supported_kernels()


@contextmanager
def use_kernel(name):
    """``with attnpy.use_kernel("reference"): ...`` -- a kernel for a block."""
    before = _choice
    set_kernel(name)
    try:
        yield
    finally:
        set_kernel(before)

"""Threads, kernels and the tuner of the C core."""
import numbers
import os
from contextlib import contextmanager

from . import _core

__all__ = ["set_num_threads", "get_num_threads", "set_kernel", "get_kernel",
           "supported_kernels", "use_kernel", "set_tuning", "tuning", "tuning_spec"]

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
    """Choose the kernel: ``"auto"`` (per call, the one the tuner measured
    fastest for it: :func:`set_tuning`),
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
    """The kernel selected, or under ``"auto"`` the widest this CPU runs.

    Under ``"auto"`` each call runs the kernel the tuner chose for its cell
    (:func:`tuning`), the widest unless another measured faster; a result's
    ``kernel`` says which one ran."""
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


# ---------------------------------------------------------------- the tuner

_MODES = ("measure", "off")


def _check_kernel(name, what, tiled=True):
    """name, if it is a (tiled) kernel this CPU runs; else ValueError naming `what`."""
    allowed = [k for k in supported_kernels() if not tiled or k != "reference"]
    if not isinstance(name, str) or name not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(map(repr, allowed))} "
                         f"(the tiled kernels this CPU runs); got {name!r}")
    return name


def set_tuning(mode="measure", *, cap="auto", pin=None):
    """Configure the tuner, which chooses a tiled kernel per cell by measuring.

    With ``set_kernel("auto")``, the core runs, for each *cell* -- an
    operation (``sdpa``, ``backward``, ``linear``), an element type and, for
    attention, a class of head dimension E (``e32``: E <= 32, ``e64``: E <=
    64, ``e128``: wider) -- the kernel the tuner chose. At the first call it
    times the two widest tiled kernels this CPU runs (no wider than
    ``cap``) on one problem per cell, on one thread, taking turns, best of
    three rounds (six when the narrower leads after three), within 0.1 s in
    all; the widest stands unless the other is at least 5% faster.
    The same settings are read from the environment variable
    ``ATTNPY_TUNE`` at import (see :func:`tuning_spec`).

    Parameters
    ----------
    mode : {"measure", "off"}
        ``"measure"``: time the candidates at the next call (measurements
        made before are forgotten). ``"off"``: every cell runs the widest
        candidate, nothing is timed.
    cap : str
        The widest kernel the tuner may choose, ``"auto"`` for no cap: with
        ``cap="avx2"`` on an AVX-512 CPU it chooses between ``"avx2"`` and
        ``"baseline"``, as it would on an AVX2-only CPU.
    pin : dict of str to str, optional
        Cells (names as in :func:`tuning`) fixed to a kernel, not timed:
        for reproducible runs, or another machine's choices.
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be 'measure' or 'off'; got {mode!r}")
    if cap != "auto":
        _check_kernel(cap, "cap")
    pin = {} if pin is None else pin
    if not isinstance(pin, dict):
        raise TypeError(f"pin must be a dict of cell names to kernels; got {type(pin).__name__}")
    for cell, kernel in pin.items():
        if cell not in _core.TUNE_CELLS:
            raise ValueError(f"pin's cells must be among {', '.join(_core.TUNE_CELLS)}; "
                             f"got {cell!r}")
        _check_kernel(kernel, f"pin[{cell!r}]")
    _core.tune_configure(mode == "measure", cap)
    for cell, kernel in pin.items():
        _core.tune_pin(cell, kernel)


def tuning():
    """What the tuner chose for each cell (measuring first, if due).

    Returns
    -------
    dict of str to dict
        For each cell name (``"sdpa_f32_e64"``, ``"backward_f64_e128"``,
        ``"linear_f32"``, ...): ``"kernel"``, the kernel its calls run;
        ``"source"``, ``"measured"``, ``"pinned"`` or ``"default"`` (the
        widest candidate: tuning off, a single candidate, or the time budget
        spent); ``"seconds"``, each candidate's best time on the cell's
        problem (0.0 when not timed), widest first.
    """
    return {cell: {"kernel": kernel, "source": source, "seconds": dict(times)}
            for cell, kernel, source, times in _core.tuning()}


def tuning_spec():
    """The tuner's choices as an ``ATTNPY_TUNE`` value that pins them all.

    ``ATTNPY_TUNE`` is a comma-separated list of ``measure`` or ``off``,
    ``cap=<kernel>`` and ``<cell>=<kernel>`` (a pin), for example
    ``"cap=avx2"`` or ``"sdpa_f32_e64=avx2,linear_f32=avx512"``. Setting
    the value this returns on another run (or machine) runs the same
    kernels there without timing anything.
    """
    return ",".join(f"{cell}={row['kernel']}" for cell, row in tuning().items())


def _tuning_from_env(value):
    """Apply an ATTNPY_TUNE value (see tuning_spec); ValueError naming it."""
    mode, cap, pin = "measure", "auto", {}
    for word in filter(None, (w.strip() for w in value.split(","))):
        key, eq, kernel = word.partition("=")
        try:
            if not eq and word in _MODES:
                mode = word
            elif eq and key == "cap":
                cap = _check_kernel(kernel, "cap")
            elif eq and key in _core.TUNE_CELLS:
                pin[key] = _check_kernel(kernel, key)
            else:
                raise ValueError(f"each item must be 'measure', 'off', 'cap=<kernel>' or "
                                 f"'<cell>=<kernel>' with a cell among "
                                 f"{', '.join(_core.TUNE_CELLS)}; got {word!r}")
        except ValueError as e:
            raise ValueError(f"ATTNPY_TUNE={value!r}: {e}") from None
    set_tuning(mode, cap=cap, pin=pin)


if os.environ.get("ATTNPY_TUNE"):
    _tuning_from_env(os.environ["ATTNPY_TUNE"])

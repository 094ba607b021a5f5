"""Arguments on the Python side of the boundary (csrc/README.md).

Python owns meanings and messages: array-likes are converted here (ndarrays
never are), defaults are resolved (the scale), mask polarities are named,
and a wrong call is explained in the caller's words. The binding then checks
only memory safety (dtypes, shapes, alignment, writeability, overlap, sizes)
and the core trusts what it is given.
"""
import math

import numpy as np

from . import _core

MAX_EXTENT = _core.MAX_EXTENT     # every dimension the core takes
MAX_THREADS = _core.MAX_THREADS


def _asarray(x, name, dtype=None):
    """np.asarray(x[, dtype]); a torch tensor that requires grad is refused
    with what to do (torch's own RuntimeError named neither)."""
    try:
        return np.asarray(x) if dtype is None else np.asarray(x, dtype=dtype)
    except RuntimeError as e:
        if "requires grad" in str(e):
            raise TypeError(f"{name} is a tensor that requires grad; attnpy computes on "
                            f"NumPy buffers: pass {name}.detach()") from None
        raise


def convert(x, name, dtype):
    """An array-like that is not an ndarray, as an array of dtype (or an error naming it)."""
    try:
        return _asarray(x, name, dtype)
    except OverflowError:
        raise ValueError(f"{name} holds a value out of the {np.dtype(dtype)} range") from None
    except (TypeError, ValueError) as e:
        if "requires grad" in str(e):
            raise
        raise TypeError(f"{name} must be an array of {np.dtype(dtype)}; could not convert "
                        f"{type(x).__name__}: {e}") from None


def float_dtype(a):
    """The dtype that array-likes given beside the ndarray a are converted to."""
    return a.dtype if a.dtype in (np.float32, np.float64) else np.dtype(np.float64)


def _array_like(x, name, what):
    """np.asarray(x), whatever dtype it gives; a failure is a TypeError naming x."""
    try:
        return _asarray(x, name)
    except (TypeError, ValueError) as e:
        if "requires grad" in str(e):
            raise
        raise TypeError(f"{name} must be an array of {what}; could not convert "
                        f"{type(x).__name__}") from None


def float_inputs(arrays, names):
    """query/key/value-like arguments as ndarrays. ndarrays are taken as they
    are (never copied, never cast); array-likes (lists, scalars) are
    converted, to the dtype of the first float ndarray given, else float64,
    so that attention on [[1, 0], [0, 1]] works as a student expects."""
    dtype = next((a.dtype for a in arrays if isinstance(a, np.ndarray)
                  and a.dtype in (np.float32, np.float64)), np.dtype(np.float64))
    out = []
    for a, name in zip(arrays, names):
        if not isinstance(a, np.ndarray):
            a = _array_like(a, name, "float32 or float64")
            if a.dtype.kind in "biuf" and a.dtype != dtype:
                a = a.astype(dtype)
        out.append(a)
    return out


def mask(m, name, dtype, true_means):
    """A mask argument as (array, kind, name) for the core, or None.

    bool arrays mean ``true_means`` where True ("attend": SDPA's polarity,
    "ignore": MultiheadAttention's); float arrays of the inputs' dtype are
    added to the scores ("add"). A list of floats is converted to dtype; a
    list of ints is refused as ambiguous.
    """
    if m is None:
        return None
    words = "attend" if true_means == "attend" else "masked out"
    if not isinstance(m, np.ndarray):
        m = _array_like(m, name, f"bool or {np.dtype(dtype)}")
        if m.dtype.kind in "iucO":
            raise TypeError(f"{name} given as a list of {_dtype_name(m.dtype)} is ambiguous: "
                            f"give bools (True = {words}) or floats (added to the scores)")
        if m.dtype != np.bool_:
            m = convert(m, name, dtype)
    # an ndarray of another dtype goes as it is: the binding names it, after
    # query, key and value, as every other dtype error
    return (m, true_means if m.dtype == np.bool_ else "add", name)


def _dtype_name(dt):
    return dt.name if dt.kind != "O" else "object"


def real(x, name, expect):
    """A float argument: a float, an int, or anything with __float__."""
    if isinstance(x, (str, bytes, bytearray)):
        raise TypeError(f"{name} must be {expect}; got {type(x).__name__}")
    try:
        return float(x)
    except OverflowError:
        raise ValueError(f"{name} is out of the float range (a {type(x).__name__} too large "
                         f"for a float)") from None
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be {expect}; got {type(x).__name__}") from None


def dtype_arg(dtype):
    """A dtype= argument: float32 or float64, as a np.dtype."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be float32 or float64; got {dtype!r}") from None
    if dt not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64; got {dt}")
    return dt


def position(n, name):
    """An int in [0, 2**31): a position, an offset or a window side."""
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"{name} must be an int; got {type(n).__name__}")
    if not 0 <= n <= MAX_EXTENT:
        raise ValueError(f"{name} must be in [0, 2**31); got {n}")
    return int(n)


def default_scale(E):
    """1/sqrt(E): inf for E = 0, where the core scores 0 whatever the scale."""
    return 1.0 / math.sqrt(E) if E > 0 else math.inf


def scale_of(scale, query):
    """The scale: given, or default_scale(query.shape[-1])."""
    if scale is None:
        return default_scale(query.shape[-1] if query.ndim else 0)
    if type(scale) is float:
        return scale
    return real(scale, "scale", "a float or None")


def check_aligned(a, name):
    """The core reads arrays in place: each element must sit on its dtype's alignment."""
    if not a.flags.aligned:
        raise ValueError(f"{name} is not aligned for {a.dtype} (its buffer or strides are not "
                         f"a multiple of {a.dtype.itemsize} bytes); attnpy reads arrays in "
                         f"place and does not copy them")

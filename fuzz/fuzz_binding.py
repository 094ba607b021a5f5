"""Coverage-guided fuzzer (atheris / libFuzzer) over attnpy's binding.

Every input chooses one entry point -- a public function or one of the
private ``attnpy._core`` functions the public ones call -- and builds its
arguments from the fuzz bytes: arrays of every dtype (float, int, bool,
complex, float16, object, byte-swapped, structured fields, strings, ...),
ndims and shapes (0-length dims, huge dims made with zero strides), layouts
(C, Fortran, transposed, negative and zero strides, stepped, unaligned
buffers, read-only), masks of every dtype and shape, and scalars (scale,
dropout, flags, head counts, seeds) that are ordinary, extreme or of the
wrong type. The kernel and the thread count are chosen per input too.

What counts as a finding (the harness raises, libFuzzer saves the input):
  * any exception other than TypeError, ValueError, MemoryError, or one of
    those with an empty message;
  * a crash (segfault, abort, UBSan trap, ASan report) -- libFuzzer sees it;
  * any change to the bytes of an input (every array's whole buffer is
    snapshotted before the call and compared after it, error paths included);
  * a result of the wrong shape or dtype, or, for finite float inputs of a
    moderate size, values that differ from the float64 NumPy reference the
    tests use too (tests/reference.py) beyond a tolerance derived from the
    dtype's epsilon.

Run:  bash fuzz/run.sh [libFuzzer flags]   (see fuzz/README.md)
Replay one input:  python fuzz/fuzz_binding.py path/to/crash-file
"""
import math
import os
import re
import sys
import warnings

import numpy as np

# The instrumented build (fuzz/build.sh) comes first on the path when
# ATTNPY_FUZZ_BUILD names it; otherwise the installed attnpy is fuzzed.
_BUILD = os.environ.get("ATTNPY_FUZZ_BUILD")
if _BUILD:
    sys.path.insert(0, os.path.abspath(_BUILD))

import atheris  # noqa: E402

# The float64 reference is the tests' one (tests/reference.py): one copy, so a
# finding is never a bug of a second copy. It does not import attnpy.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests"))
from reference import (additive_mask, mha_from_batch_first, mha_reference,  # noqa: E402
                       mha_to_batch_first, position_mask, sdpa_backward_reference, sdpa_forward,
                       self_attention_reference)

if os.environ.get("ATTNPY_FUZZ_GLOBAL_LIBFUZZER") == "1":
    # No preloaded libFuzzer (no ASan): load atheris's own libFuzzer with
    # RTLD_GLOBAL before the instrumented extension, whose coverage hooks
    # (__sanitizer_cov_*) it resolves at import time.
    _flags = sys.getdlopenflags()
    sys.setdlopenflags(os.RTLD_NOW | os.RTLD_GLOBAL)
    import atheris.core_with_libfuzzer  # noqa: E402,F401
    sys.setdlopenflags(_flags)

# Python-level coverage of attnpy's own modules too (the argument handling of
# MultiheadAttention, self_attention, causal_mask lives there)
with atheris.instrument_imports(include=["attnpy"]):
    import attnpy  # noqa: E402
    from attnpy import _core  # noqa: E402

if _BUILD and os.path.abspath(_BUILD) not in os.path.abspath(_core.__file__):
    raise SystemExit(f"fuzzing {_core.__file__}, not the build in {_BUILD}")

warnings.simplefilter("ignore")
ACCEPTED = (TypeError, ValueError, MemoryError)
# the kernels this CPU runs, and "auto"
KERNELS = ["auto"] + list(attnpy.supported_kernels())
MAX_WORK = 1 << 16  # elements of any L x S or L x E the reference recomputes
MAX_EXTENT = 2**31 - 1  # the largest dimension attnpy accepts
# A call with accepted sizes whose outputs would hold more than OUT_LIMIT
# elements (or cost more than WORK_LIMIT multiply-adds) is not made: it is a
# legitimate request for gigabytes, not a bug. Beyond 2**40 bytes an
# allocation fails (MemoryError), so such calls are made again.
OUT_LIMIT, WORK_LIMIT, ALLOC_FAILS = 1 << 25, 1 << 31, 1 << 40


class Finding(AssertionError):
    """What the harness raises for libFuzzer to report."""


# ---------------------------------------------------------------------------
# building arguments from the bytes


class Inputs:
    """Every buffer handed to the call, with a snapshot of its bytes."""

    def __init__(self):
        self.roots = []  # (name, ndarray root, bytes) or (name, list, repr)

    def track(self, name, root):
        if isinstance(root, np.ndarray):
            if root.dtype == object:
                self.roots.append((name, root, [repr(x) for x in root.ravel()]))
            else:
                self.roots.append((name, root, root.tobytes()))
        elif isinstance(root, bytearray):
            self.roots.append((name, root, bytes(root)))
        elif isinstance(root, list):
            self.roots.append((name, root, repr(root)))

    def check_unchanged(self, what):
        for name, root, snap in self.roots:
            if isinstance(root, np.ndarray):
                now = [repr(x) for x in root.ravel()] if root.dtype == object else root.tobytes()
            elif isinstance(root, bytearray):
                now = bytes(root)
            else:
                now = repr(root)
            if now != snap:
                raise Finding(f"{what}: input {name} was written")


FLOAT_DTYPES = [np.dtype(np.float32), np.dtype(np.float64)]
OTHER_DTYPES = [np.dtype(t) for t in (
    np.float16, np.longdouble, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint64,
    np.bool_, np.complex64, np.complex128, ">f4", ">f8", "<f2", "M8[ns]", "m8[s]", "U3", "S4",
    "V8")]


def pick_dtype(fdp, base):
    """Mostly the scenario's dtype; sometimes the other float, sometimes anything."""
    r = fdp.ConsumeIntInRange(0, 15)
    if r < 11:
        return base
    if r < 12:
        return FLOAT_DTYPES[1] if base == FLOAT_DTYPES[0] else FLOAT_DTYPES[0]
    if r < 13:
        return np.dtype(object)
    if r < 14:
        return "struct"
    return OTHER_DTYPES[fdp.ConsumeIntInRange(0, len(OTHER_DTYPES) - 1)]


def fill_values(fdp, n, dtype):
    """n values of dtype: small exact numbers mostly, raw bytes or specials sometimes."""
    mode = fdp.ConsumeIntInRange(0, 7)
    if dtype == object:
        pool = [0.5, 1, -2.0, None, "x", 1 + 2j, float("nan"), [1.0], True]
        picks = fdp.ConsumeBytes(n)
        out = np.empty(n, dtype=object)
        for i in range(n):
            out[i] = pool[picks[i] % len(pool)] if i < len(picks) and mode else 0.25 * (i % 5)
        return out
    if mode <= 4 and dtype.kind in "fciub":
        raw = np.frombuffer(fdp.ConsumeBytes(n).ljust(n, b"\0"), dtype=np.uint8)
        vals = (raw.astype(np.int64) % 9 - 4) / 4.0
        if dtype.kind == "b":
            return (raw % 2).astype(dtype)
        if dtype.kind in "iu":
            return (raw % 5).astype(dtype)
        return vals.astype(dtype)
    if mode == 5 and dtype.kind in "fc":
        specials = np.array([np.nan, np.inf, -np.inf, 1e300, -1e-300, 3e38, 0.0, -0.0, 1.0])
        raw = np.frombuffer(fdp.ConsumeBytes(n).ljust(n, b"\0"), dtype=np.uint8)
        with np.errstate(all="ignore"):
            return specials[raw % len(specials)].astype(dtype)
    nbytes = n * dtype.itemsize
    raw = fdp.ConsumeBytes(nbytes).ljust(nbytes, b"\0")
    return np.frombuffer(raw, dtype=dtype).copy() if n else np.empty(0, dtype)


def build_array(fdp, name, shape, base_dtype, inputs, allow_weird=True):
    """An argument of (about) this shape: an ndarray of some dtype and layout,
    or sometimes a list, a scalar, None or another object."""
    try:
        return _build_array(fdp, name, shape, base_dtype, inputs, allow_weird)
    except (ValueError, MemoryError):
        # a shape NumPy itself cannot describe (an empty array with dims whose
        # product overflows): the argument is an empty array instead
        return np.empty(0, dtype=base_dtype)


def _build_array(fdp, name, shape, base_dtype, inputs, allow_weird):
    shape = tuple(int(s) for s in shape)
    kind = fdp.ConsumeIntInRange(0, 31) if allow_weird else 0
    if kind == 31:
        return [None, 1.5, "query", b"\x00", object(), 3, (1, 2), np.float64(2.0)][
            fdp.ConsumeIntInRange(0, 7)]
    if kind == 30:  # shape mutated: a dim changed, dropped or added
        shape = mutate_shape(fdp, shape)
    dtype = pick_dtype(fdp, base_dtype) if allow_weird else base_dtype
    n = math.prod(shape)
    if n > (1 << 18):  # not something to allocate: a huge zero-stride view instead
        return huge_view(fdp, name, shape, base_dtype if dtype == "struct" else dtype, inputs)
    if dtype == "struct":
        return struct_field(fdp, name, shape, base_dtype, inputs)
    layout = fdp.ConsumeIntInRange(0, 13) if allow_weird else 0
    vals = fill_values(fdp, n, dtype)
    if layout == 0 or layout > 10:
        a = vals.reshape(shape)
        inputs.track(name, a)
        return a
    if layout == 1:  # Fortran order
        a = np.asfortranarray(vals.reshape(shape))
        inputs.track(name, a)
        return a
    if layout == 2:  # negative strides on some axes
        root = vals.reshape(shape)
        inputs.track(name, root)
        idx = tuple(slice(None, None, -1) if fdp.ConsumeBool() else slice(None) for _ in shape)
        return root[idx]
    if layout == 3:  # stepped: every other element of a bigger buffer
        if not shape:
            return vals.reshape(shape)
        ax = fdp.ConsumeIntInRange(0, len(shape) - 1)
        big = list(shape)
        big[ax] *= 2
        root = np.zeros(big, dtype=dtype) if dtype != object else np.full(big, 0.0, dtype=object)
        sl = [slice(None)] * len(shape)
        sl[ax] = slice(None, None, 2)
        root[tuple(sl)] = vals.reshape(shape)
        inputs.track(name, root)
        return root[tuple(sl)]
    if layout == 4:  # a transposed view of another layout
        perm = list(range(len(shape)))
        for i in range(len(perm) - 1, 0, -1):
            j = fdp.ConsumeIntInRange(0, i)
            perm[i], perm[j] = perm[j], perm[i]
        inv = np.argsort(perm)
        root = vals.reshape([shape[p] for p in perm]) if shape else vals.reshape(shape)
        inputs.track(name, root)
        return root.transpose(inv) if shape else root
    if layout == 5:  # zero strides: a broadcast view (read-only) of size-1 dims
        small = tuple(1 if fdp.ConsumeBool() else s for s in shape)
        if math.prod(small) > (1 << 18):  # a 0 replaced, a huge dim kept
            small = (1,) * len(shape)
        root = fill_values(fdp, math.prod(small), dtype).reshape(small)
        inputs.track(name, root)
        if fdp.ConsumeBool():
            return np.broadcast_to(root, shape)
        # writeable zero-stride view: nothing may write it either
        strides = tuple(0 if a == 1 else st for a, st in zip(small, root.strides))
        return np.lib.stride_tricks.as_strided(root, shape, strides, writeable=True)
    if layout == 6:  # unaligned: a buffer at a byte offset
        off = fdp.ConsumeIntInRange(0, 7)
        if dtype == object:
            return vals.reshape(shape)
        buf = bytearray(off + vals.nbytes)
        buf[off:] = vals.tobytes()
        inputs.track(name, buf)
        return np.frombuffer(buf, dtype=dtype, offset=off, count=n).reshape(shape)
    if layout == 7:  # read-only
        a = vals.reshape(shape)
        a.flags.writeable = False
        inputs.track(name, a)
        return a
    if layout == 8:  # a nested list (not of 2**31 empty lists)
        if (dtype == object or dtype.kind in "fiub") and math.prod(
                max(d, 1) for d in shape) <= 4096:
            lst = vals.reshape(shape).tolist()
            inputs.track(name, lst)
            return lst
        return vals.reshape(shape)
    if layout == 9:  # the wrong byte order, same values
        a = vals.reshape(shape)
        if dtype != object and dtype.itemsize > 1 and dtype.kind in "fiuc":
            a = a.astype(dtype.newbyteorder())
        inputs.track(name, a)
        return a
    # layout 10: odd strides from a bytes object (immutable buffer)
    if dtype == object:
        return vals.reshape(shape)
    a = np.frombuffer(vals.tobytes(), dtype=dtype).reshape(shape)
    inputs.track(name, a)
    return a


def struct_field(fdp, name, shape, base_dtype, inputs):
    """A float field of a structured array: packed (unaligned strides) or aligned."""
    aligned = fdp.ConsumeBool()
    sdt = np.dtype([("a", "i1"), ("f", base_dtype), ("b", "i2")], align=aligned)
    n = math.prod(shape)
    root = np.zeros(n, dtype=sdt)
    root["f"] = fill_values(fdp, n, base_dtype)
    root = root.reshape(shape)
    inputs.track(name, root)
    return root if fdp.ConsumeBool() else root["f"]


def huge_view(fdp, name, shape, dtype, inputs):
    """A huge shape over one element, with zero strides."""
    if dtype == object:
        dtype = np.dtype(np.float64)
    root = fill_values(fdp, 1, dtype)
    inputs.track(name, root)
    try:
        return np.lib.stride_tricks.as_strided(root, shape, (0,) * len(shape), writeable=False)
    except ValueError:  # beyond what NumPy can describe
        return root.reshape(())


def mutate_shape(fdp, shape):
    shape = list(shape)
    op = fdp.ConsumeIntInRange(0, 3)
    if op == 0 and shape:
        shape[fdp.ConsumeIntInRange(0, len(shape) - 1)] = pick_dim(fdp)
    elif op == 1 and shape:
        del shape[fdp.ConsumeIntInRange(0, len(shape) - 1)]
    elif op == 2 and len(shape) < 8:
        shape.insert(fdp.ConsumeIntInRange(0, len(shape)), pick_dim(fdp))
    else:
        shape = [pick_dim(fdp) for _ in range(fdp.ConsumeIntInRange(0, 5))]
    return tuple(shape)


HUGE = [2**31 - 1, 2**31, 2**32 + 1, 2**40, 2**47, 2**62 // 8]


def pick_dim(fdp, small=6):
    """A dimension: mostly 0..small, sometimes a size that tests the limits."""
    r = fdp.ConsumeIntInRange(0, 63)
    if r < 60:
        return r % (small + 1)
    if r < 62:
        return fdp.ConsumeIntInRange(0, 200)
    return HUGE[fdp.ConsumeIntInRange(0, len(HUGE) - 1)]


def pick_scalar(fdp, name):
    """scale, dropout and friends: ordinary, extreme, or of the wrong type."""
    r = fdp.ConsumeIntInRange(0, 20)
    table = [None, 0.0, -1.0, 0.125, 1.0, 2.5, math.inf, -math.inf, math.nan, 1e308, 5e-324,
             10**400, -3, 7, True, "0.5", np.float32(0.5), np.float64(-2.0),
             np.array([0.5, 1.0]), complex(1, 1)]
    if r < len(table):
        return table[r]
    return fdp.ConsumeFloat()


def pick_flag(fdp):
    r = fdp.ConsumeIntInRange(0, 15)
    if r < 12:
        return bool(r % 2)
    return [None, 2, np.array([1, 0]), "yes"][r - 12]


def pick_int(fdp, lo, hi):
    """An int parameter (heads, dims): mostly in [lo, hi], sometimes not an int."""
    r = fdp.ConsumeIntInRange(0, 31)
    if r < 27:
        return fdp.ConsumeIntInRange(lo, hi)
    return [0, -1, 2**63, 2.0, None][r - 27]


# ---------------------------------------------------------------------------
# the float64 reference


def shape_of(a):
    """The shape of an argument, list or array (() if it has none)."""
    try:
        return np.shape(a)
    except ValueError:   # a ragged list
        return ()


def dims_of(*args):
    return [d for a in args if isinstance(a, np.ndarray) for d in a.shape]


# The reference kernel runs some 10x slower than the tiles, and far slower
# again in the instrumented build, whose coverage hooks sit on its every
# compare (139M multiply-adds took 29 s; 20M at E = 1, 8 s). It runs when
# chosen, and in place of the chosen kernel when an input is inf or NaN, or
# so large that float arithmetic could overflow (NaN policy rule 6). Such
# calls get a budget REF_COST times smaller.
REF_COST = 256
KERNEL = ["auto"]  # this input's kernel (TestOneInput sets it)


def real_values(a):
    """a's values without its broadcast (zero-stride) axes: what memory holds."""
    # slice(0, 1), not 0: the result stays an array (0 on every axis would
    # give a scalar, for an object array any Python object); a 0-d array is
    # its own values (indexed by (), an object one gave a Python float)
    if a.ndim == 0:
        return a
    return a[tuple(slice(0, 1) if st == 0 else slice(None) for st in a.strides)]


def nonzero(x):
    """x a number other than 0 (a dropout_p that sends the call to the reference)."""
    try:
        return float(x) != 0.0
    except (TypeError, ValueError, OverflowError):
        return False


def reference_may_run(args, scale, reference):
    """Could the reference kernel run this call? reference: the scenario says
    it does (dropout, a trace, given weights)."""
    if reference or KERNEL[0] == "reference":
        return True
    if scale is not None:
        try:
            if not abs(float(scale)) <= 1e4:     # np.float32 and friends too
                return True
        except (TypeError, ValueError, OverflowError):
            pass                                 # refused before any work

    for a in args:
        if isinstance(a, np.ndarray) and a.dtype.kind in "fc" and a.size:
            with np.errstate(all="ignore"):
                if not np.max(np.abs(real_values(a))) <= 1e4:  # NaN too
                    return True
    return False


def legit_but_huge(args, out_elems=0, work=0, checked=None, scale=None, attention=True,
                   reference=False):
    """Accepted sizes, but gigabytes of output or minutes of work: skip.
    checked: the dims attnpy limits to 2**31 - 1 (default: every dim).
    attention: a call the reference kernel may take over (see REF_COST);
    reference: one it surely runs on. Outputs beyond memory (an estimate
    above ALLOC_FAILS bytes) are called, to fail at once, unless the work is
    too long too (not every output of the estimate is allocated first)."""
    if any(d > MAX_EXTENT for d in (dims_of(*args) if checked is None else checked)):
        return False  # must be refused before any allocation
    arrays = [a for a in args if isinstance(a, np.ndarray)]
    # memory: inputs by what they hold (a huge zero-stride view holds one
    # element; counted by its shape it passed for a request beyond memory,
    # and a self_attention made and wrote 16 GiB of weights: 30 s); time:
    # every element of every input is read at least once (a projection of
    # a (1, 1, 2**31 - 1) view to one column: 2**31 multiply-adds on the
    # reference, its 1 TiB workspace refused: minutes)
    total = out_elems + sum(real_values(a).size for a in arrays)
    reads = sum(math.prod(a.shape) for a in arrays)
    limit = WORK_LIMIT
    if attention and reference_may_run(args, scale, reference):
        limit //= REF_COST
    return (OUT_LIMIT < total and total * 8 <= ALLOC_FAILS) or work + reads > limit


def sdpa_sizes(q, k, v, gqa):
    """(output elements incl. weights and gradients, multiply-adds) or None."""
    def shape(a):  # an ndarray's, or a small list's
        if isinstance(a, np.ndarray):
            return a.shape
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return np.shape(a) if isinstance(a, list) else None
        except ValueError:  # ragged
            return None
    qs, ks, vs = shape(q), shape(k), shape(v)
    if not all(sh is not None and len(sh) >= 2 for sh in (qs, ks, vs)):
        return None
    try:
        lead = np.broadcast_shapes(qs[:-2], ks[:-2] if not gqa else qs[:-2],
                                   vs[:-2] if not gqa else qs[:-2])
    except ValueError:
        return None
    P, (L, E), S, Ev = math.prod(lead), qs[-2:], ks[-2], vs[-1]
    # the leading (batch, head) dims are not limited, only these
    checked = list(qs[-2:]) + list(ks[-2:]) + list(vs[-2:])
    return (P * (2 * L * E + 2 * L * Ev + 3 * L * S + 2 * S * E + 2 * S * Ev),
            P * max(L, 1) * max(S, 1) * (E + Ev + 1), checked)


def finite_moderate(*arrays):
    """Small float/bool ndarrays with finite values of moderate size: what the
    reference is computed for. Sizes first: a huge zero-stride view would cost
    the reference (not attnpy) gigabytes; so would billions of empty matrices."""
    for a in arrays:
        if a is None:
            continue
        if not isinstance(a, np.ndarray) or a.dtype.kind not in "fb":
            return False
        if math.prod(max(d, 1) for d in a.shape) > MAX_WORK:
            return False
    for a in arrays:
        if a is None:
            continue
        if a.dtype.kind == "f" and (not np.all(np.isfinite(a)) or np.max(np.abs(a), initial=0) > 64):
            return False
    return True


def close(name, got, want, dtype, scale_of, what):
    """|got - want| within an epsilon-derived bound (scale_of: the size of what
    was summed to make each entry)."""
    got = np.asarray(got, dtype=np.float64)
    if got.shape != want.shape:
        raise Finding(f"{what}: {name} has shape {got.shape}, reference {want.shape}")
    if got.size == 0:
        return
    eps = np.finfo(dtype).eps
    tol = 256 * eps * (1.0 + scale_of)
    with np.errstate(all="ignore"):
        # an entry is never closer than its own rounding: |want| counts too
        bad = ~(np.abs(got - want) <= tol + 256 * eps * np.abs(want))
    bad &= ~(np.isnan(got) & np.isnan(want))
    if np.any(bad):
        i = np.argwhere(bad)[0]
        raise Finding(f"{what}: {name} differs from the float64 reference at {tuple(i)}: "
                      f"{got[tuple(i)]!r} vs {want[tuple(i)]!r} (tolerance {tol:.3g})")


def check_sdpa_result(res, q, k, v, mask, is_causal, scale, gqa, need_weights, what,
                      positions=None):
    out, w = res
    dt = np.asarray(q).dtype if isinstance(q, np.ndarray) else np.dtype(np.float64)
    if not isinstance(out, np.ndarray) or out.dtype not in FLOAT_DTYPES:
        raise Finding(f"{what}: output is {type(out).__name__} {getattr(out, 'dtype', '')}")
    if need_weights != (w is not None):
        raise Finding(f"{what}: need_weights={need_weights} but weights is {type(w).__name__}")
    if not all(isinstance(a, np.ndarray) for a in (q, k, v)):
        return
    if not finite_moderate(q, k, v, mask) or not (scale is None or isinstance(scale, (int, float))):
        return
    if scale is not None and not (abs(scale) <= 64):
        return
    if max(q.shape[-2] * k.shape[-2], q.shape[-2] * q.shape[-1]) > MAX_WORK:
        return
    if positions:
        if not finite_moderate(positions.get("attn_bias")):
            return
        slopes = positions.get("alibi_slopes")
        if slopes is not None and q.ndim < 3:
            positions = dict(positions, alibi_slopes=np.asarray(slopes).reshape(()))
        if is_causal:
            positions = dict(positions, is_causal=True)
        mask, is_causal = position_reference_mask(mask, positions, q.shape[-2], k.shape[-2]), False
    ref = sdpa_forward(q, k, v, mask, is_causal, scale, gqa)
    want_out, want_w, logits = ref["out"], ref["weights"], ref["logits"]
    if want_out.shape != out.shape:
        raise Finding(f"{what}: output shape {out.shape}, reference {want_out.shape}")
    if np.any(np.isnan(want_out)) or np.any(np.isposinf(logits)):
        return
    E = q.shape[-1]
    sc = (1.0 / math.sqrt(max(E, 1))) if scale is None else abs(float(scale))
    # each logit sums E products of |q||k| <= 64*64: its rounding error, times
    # the softmax's sensitivity (1), bounds the weights' error
    logit_size = sc * 64 * 64 * max(E, 1) + 64
    vmax = float(np.max(np.abs(v), initial=0))
    close("weights", w, want_w, out.dtype, logit_size, what) if w is not None else None
    close("output", out, want_out, out.dtype, logit_size * (1 + vmax) * max(k.shape[-2], 1), what)


# ---------------------------------------------------------------------------
# scenarios


def sdpa_shapes(fdp):
    """Consistent query/key/value/mask shapes, with broadcasting and GQA."""
    nb = fdp.ConsumeIntInRange(0, 3)  # leading dims besides (L, E)
    L, S, E, Ev = (pick_dim(fdp) for _ in range(4))
    lead = [pick_dim(fdp, 3) for _ in range(nb)]
    gqa = fdp.ConsumeIntInRange(0, 3) == 0
    def lead_for():
        return [1 if fdp.ConsumeIntInRange(0, 3) == 0 else d for d in lead]
    ql, kl = lead_for(), lead_for()
    if gqa and nb >= 1:
        g = fdp.ConsumeIntInRange(1, 3)
        kl[-1] = max(ql[-1], 1)
        ql[-1] = kl[-1] * g
    vl = list(kl)
    # sometimes drop leading dims of key/value (matmul-style broadcasting)
    cut_k = fdp.ConsumeIntInRange(0, len(kl)) if fdp.ConsumeIntInRange(0, 3) == 0 else 0
    kl, vl = kl[cut_k:], vl[cut_k:]
    qs, ks, vs = tuple(ql) + (L, E), tuple(kl) + (S, E), tuple(vl) + (S, Ev)
    # a mask shape broadcastable to (..., Hq, L, S) (or not, sometimes)
    mlead = [1 if fdp.ConsumeBool() else d for d in ql]
    ms = tuple(mlead[fdp.ConsumeIntInRange(0, len(mlead)):]) + (
        1 if fdp.ConsumeIntInRange(0, 5) == 0 else L, 1 if fdp.ConsumeIntInRange(0, 5) == 0 else S)
    return qs, ks, vs, ms, gqa


def build_mask(fdp, shape, dtype, inputs, name="attn_mask"):
    r = fdp.ConsumeIntInRange(0, 7)
    if r == 0:
        return None
    if r <= 3:  # bool
        return build_array(fdp, name, shape, np.dtype(np.bool_), inputs)
    if r <= 5:  # float, with -inf sometimes
        m = build_array(fdp, name, shape, dtype, inputs)
        return m
    if r == 6 and len(shape) >= 2 and shape[-2] * shape[-1] <= 1 << 20:  # from the library
        try:
            return attnpy.causal_mask(shape[-2], shape[-1], dtype=dtype)
        except ACCEPTED:
            return None
    return build_array(fdp, name, shape, np.dtype(np.bool_), inputs)


def scenario_sdpa(fdp, private):
    dtype = FLOAT_DTYPES[fdp.ConsumeIntInRange(0, 1)]
    inputs = Inputs()
    qs, ks, vs, ms, gqa = sdpa_shapes(fdp)
    q = build_array(fdp, "query", qs, dtype, inputs)
    k = build_array(fdp, "key", ks, dtype, inputs)
    v = build_array(fdp, "value", vs, dtype, inputs)
    if fdp.ConsumeIntInRange(0, 15) == 0:  # the same array three times
        k = v = q
    mask = build_mask(fdp, ms, dtype, inputs)
    is_causal = pick_flag(fdp) if fdp.ConsumeIntInRange(0, 3) == 0 else False
    scale = pick_scalar(fdp, "scale") if fdp.ConsumeBool() else None
    dropout = 0.0 if fdp.ConsumeIntInRange(0, 7) else pick_scalar(fdp, "dropout_p")
    need_weights = pick_flag(fdp) if fdp.ConsumeIntInRange(0, 7) == 0 else fdp.ConsumeBool()
    enable_gqa = gqa if fdp.ConsumeIntInRange(0, 7) else pick_flag(fdp)
    out = None
    if fdp.ConsumeIntInRange(0, 5) == 0:
        oshape = mutate_shape(fdp, qs[:-1] + (vs[-1],)) if fdp.ConsumeIntInRange(0, 3) == 0 \
            else None
        r = fdp.ConsumeIntInRange(0, 4)
        if r == 0 and isinstance(q, np.ndarray):
            out = q  # aliasing an input: must be refused
        elif r == 1:
            out = [0.0]
        else:
            try:
                shape = oshape or np.broadcast_shapes(qs[:-2], ks[:-2] if not gqa else qs[:-2],
                                                      vs[:-2] if not gqa else qs[:-2]) + \
                    (qs[-2], vs[-1])
            except ValueError:
                shape = qs[:-1] + (vs[-1],)
            if math.prod(max(d, 1) for d in shape) <= (1 << 16):
                odt = dtype if r < 4 else OTHER_DTYPES[fdp.ConsumeIntInRange(0, 6)]
                out = np.zeros(shape, odt)
                if fdp.ConsumeIntInRange(0, 3) == 0:
                    out = out.T if out.ndim > 1 else out[::-1]
    what = "_core.sdpa" if private else "scaled_dot_product_attention"
    positions = {} if private or fdp.ConsumeIntInRange(0, 3) else \
        pick_positions(fdp, qs, ks, ms, dtype, inputs)
    sizes = sdpa_sizes(q, k, v, gqa)
    if sizes and legit_but_huge((q, k, v, mask), *sizes, scale=scale,
                                reference=nonzero(dropout)):
        return
    if private:
        kind = private_mask_kind(fdp, mask)
        opts = private_options(fdp, q, mask, kind, is_causal, scale, enable_gqa, dropout)
        res = call(inputs, what, _core.sdpa, q, k, v, need_weights=need_weights, out=out, **opts)
        if res is None or not same_meaning(opts, mask, kind) or dropout != 0.0:
            return  # another meaning than the public function's: no reference here
        res = tuple(res[:2])
    else:
        res = call(inputs, what, attnpy.scaled_dot_product_attention, q, k, v, mask, dropout,
                   is_causal, scale, enable_gqa, need_weights=need_weights, out=out,
                   **positions)
        if res is None or nonzero(dropout):
            return  # dropout: the reference knows no dropped keys (checked in the tests)
    if out is not None and res[0] is not out:
        raise Finding(f"{what}: out= given but the output is another array")
    check_sdpa_result(res, q, k, v, mask, bool(is_causal), scale, bool(enable_gqa),
                      bool(need_weights), what, positions)


def pick_positions(fdp, qs, ks, ms, dtype, inputs):
    """query_offset, window, alibi_slopes, attn_bias (issue 15): mostly valid,
    sometimes negative, huge, of the wrong type or shape."""
    S = ks[-2] if len(ks) >= 2 else 1
    opts = {}
    if fdp.ConsumeBool():
        r = fdp.ConsumeIntInRange(0, 15)
        opts["query_offset"] = fdp.ConsumeIntInRange(0, S + 4) if r < 11 else \
            [-1, 2**31, 2**70, 1.5, True][r - 11]
    if fdp.ConsumeBool():
        r = fdp.ConsumeIntInRange(0, 15)
        opts["window"] = (pick_int(fdp, 0, 6), pick_int(fdp, 0, 6)) if r < 11 else \
            [(-1, 0), (0,), 3, ("a", 0), (2**31, 0)][r - 11]
    if fdp.ConsumeBool():
        heads = qs[-3:-2] if len(qs) >= 3 else ()
        r = fdp.ConsumeIntInRange(0, 15)
        if r < 11:   # one slope per query head (a sane count), or one for all
            n = heads[0] if heads and r % 2 and heads[0] <= 64 else 0
            opts["alibi_slopes"] = 0.5 / np.arange(1, n + 1) if n else np.array(0.5)
        else:
            opts["alibi_slopes"] = [np.full((7,), 0.5), np.array([np.nan]), "x",
                                    np.array(["a"]), [0.25]][r - 11]
    if fdp.ConsumeBool():
        opts["attn_bias"] = build_array(fdp, "attn_bias", ms, dtype, inputs)
    return opts


def position_reference_mask(mask, positions, L, S):
    """The one additive float64 mask the reference sees: attn_mask, the
    positions and the bias; a key hidden by its position is out (-inf)
    whatever the mask or bias holds there."""
    pos = {n: positions[n] for n in ("is_causal", "query_offset", "window", "alibi_slopes")
           if n in positions}
    m = position_mask(L, S, **pos)
    given = additive_mask(mask, False, L, S)
    bias = positions.get("attn_bias")
    with np.errstate(invalid="ignore"):
        total = m + (0.0 if given is None else given) + \
            (0.0 if bias is None else bias.astype(np.float64))
        return np.where(np.isneginf(m), -np.inf, total)


def scenario_sdpa_backward(fdp, private):
    dtype = FLOAT_DTYPES[fdp.ConsumeIntInRange(0, 1)]
    inputs = Inputs()
    qs, ks, vs, ms, gqa = sdpa_shapes(fdp)
    q = build_array(fdp, "query", qs, dtype, inputs)
    k = build_array(fdp, "key", ks, dtype, inputs)
    v = build_array(fdp, "value", vs, dtype, inputs)
    mask = build_mask(fdp, ms, dtype, inputs)
    is_causal = pick_flag(fdp) if fdp.ConsumeIntInRange(0, 3) == 0 else False
    scale = pick_scalar(fdp, "scale") if fdp.ConsumeBool() else None
    enable_gqa = gqa if fdp.ConsumeIntInRange(0, 7) else pick_flag(fdp)
    try:
        lead = np.broadcast_shapes(qs[:-2], ks[:-2], vs[:-2]) if not gqa else qs[:-2]
    except ValueError:
        lead = qs[:-2]
    do = build_array(fdp, "grad_output", tuple(lead) + (qs[-2], vs[-1]), dtype, inputs)
    weights = None
    if fdp.ConsumeIntInRange(0, 2) == 0:
        weights = build_array(fdp, "weights", tuple(lead) + (qs[-2], ks[-2]), dtype, inputs)
    trace = pick_flag(fdp) if fdp.ConsumeIntInRange(0, 7) == 0 else fdp.ConsumeBool()
    what = "_core.sdpa_backward" if private else "scaled_dot_product_attention_backward"
    sizes = sdpa_sizes(q, k, v, gqa)
    if sizes and weights is not None:
        # given weights: the reference kernel, some 10x slower than the tiles, and
        # far slower again in this instrumented build (125 problems of 125^3 took 70 s)
        sizes = (sizes[0], sizes[1] * 16, sizes[2])
    if sizes and legit_but_huge((q, k, v, mask, do, weights), *sizes, scale=scale,
                                reference=bool(trace is True) or weights is not None):
        return
    if private:
        kind = private_mask_kind(fdp, mask)
        grads = private_grads(fdp, (q, k, v), (q, k, v, do, mask, weights))
        opts = private_options(fdp, q, mask, kind, is_causal, scale, enable_gqa, 0.0)
        res = call(inputs, what, _core.sdpa_backward, do, q, k, v, weights=weights, trace=trace,
                   grads=grads, **opts)
        if res is None or not same_meaning(opts, mask, kind):
            return
    else:
        res = call(inputs, what, attnpy.scaled_dot_product_attention_backward, do, q, k, v,
                   mask, is_causal, scale, enable_gqa, weights=weights, trace=trace)
        if res is None:
            return
    gq, gk, gv = res[0], res[1], res[2]
    for nm, g, x in (("query", gq, q), ("key", gk, k), ("value", gv, v)):
        if isinstance(x, np.ndarray) and g.shape != x.shape:
            raise Finding(f"{what}: gradient of {nm} has shape {g.shape}, input {x.shape}")
    if weights is not None or not all(isinstance(a, np.ndarray) for a in (q, k, v, do)):
        return  # given weights may be anything: gradients follow them, no reference
    if not finite_moderate(q, k, v, mask, do) or not (scale is None or isinstance(scale, float)):
        return
    if scale is not None and not abs(scale) <= 64:
        return
    if max(q.shape[-2] * k.shape[-2], q.shape[-2] * q.shape[-1]) > MAX_WORK:
        return
    want = sdpa_backward_reference(do, q, k, v, mask, bool(is_causal), scale, bool(enable_gqa),
                                   with_intermediates=True)
    if any(w is not None and np.any(~np.isfinite(w)) for w in want):
        return
    E = q.shape[-1]
    sc = (1.0 / math.sqrt(max(E, 1))) if scale is None else abs(float(scale))
    big = (sc * 64 * 64 * max(E, 1) + 64) * 64 * 64 * max(k.shape[-2], 1) * max(
        q.shape[-2], 1) * max(E, v.shape[-1], 1) * (1 + sc)
    # count of problems summed into one gradient entry
    reps = max(1, math.prod(do.shape[:-2]))
    for nm, g, wv in zip(("grad query", "grad key", "grad value"), (gq, gk, gv), want[:3]):
        close(nm, g, wv, g.dtype, big * reps, what)


def scenario_mha(fdp):
    dtype = FLOAT_DTYPES[fdp.ConsumeIntInRange(0, 1)]
    inputs = Inputs()
    H = pick_int(fdp, 1, 4)
    Hkv = None if fdp.ConsumeBool() else pick_int(fdp, 1, 4)
    D = fdp.ConsumeIntInRange(1, 4)
    E = H * D if isinstance(H, int) and H > 0 else pick_int(fdp, 1, 8)
    if fdp.ConsumeIntInRange(0, 7) == 0:
        E = pick_int(fdp, 0, 9)
    kdim = None if fdp.ConsumeIntInRange(0, 2) else pick_int(fdp, 1, 6)
    vdim = None if fdp.ConsumeIntInRange(0, 2) else pick_int(fdp, 1, 6)
    dropout = 0.0 if fdp.ConsumeIntInRange(0, 3) else pick_scalar(fdp, "dropout")
    kwargs = dict(dropout=dropout, bias=fdp.ConsumeBool(), add_bias_kv=fdp.ConsumeBool(),
                  add_zero_attn=fdp.ConsumeBool(), kdim=kdim, vdim=vdim,
                  batch_first=fdp.ConsumeBool(), num_kv_heads=Hkv,
                  dtype=dtype if fdp.ConsumeIntInRange(0, 15) else
                  [np.float16, "float64", int, object][fdp.ConsumeIntInRange(0, 3)],
                  seed=fdp.ConsumeIntInRange(0, 3))
    try:
        layer = attnpy.MultiheadAttention(E, H, **kwargs)
    except ACCEPTED as e:
        check_message("MultiheadAttention()", e)
        return
    except OverflowError as e:
        raise Finding(f"MultiheadAttention({E}, {H}, {kwargs}) raised OverflowError: {e}")
    if fdp.ConsumeBool():
        layer.train()
    if fdp.ConsumeIntInRange(0, 7) == 0:  # load a state_dict of fuzzed arrays
        sd = {name: build_array(fdp, name, p.shape, dtype, inputs)
              for name, p in layer.state_dict().items()}
        if fdp.ConsumeIntInRange(0, 3) == 0 and sd:
            sd.pop(next(iter(sd)))
        try:
            layer.load_state_dict(sd)
        except (KeyError,) + ACCEPTED as e:
            check_message("load_state_dict", e)
            return
        inputs.check_unchanged("load_state_dict")
    N, L, S = pick_dim(fdp, 3), pick_dim(fdp, 5), pick_dim(fdp, 5)
    unbatched = fdp.ConsumeIntInRange(0, 3) == 0
    dt = layer.dtype
    def shp(n, length, width):
        if unbatched:
            return (length, width)
        return (n, length, width) if layer.batch_first else (length, n, width)
    query = build_array(fdp, "query", shp(N, L, layer.embed_dim), dt, inputs)
    selfattn = fdp.ConsumeIntInRange(0, 2) == 0
    key = None if selfattn else build_array(fdp, "key", shp(N, S, layer.kdim), dt, inputs)
    value = None if selfattn else build_array(fdp, "value", shp(N, S, layer.vdim), dt, inputs)
    if selfattn:
        S = L
    kpm = None
    if fdp.ConsumeIntInRange(0, 3) == 0:
        kpm = build_mask(fdp, (S,) if unbatched else (N, S), dt, inputs, "key_padding_mask")
    am = None
    if fdp.ConsumeIntInRange(0, 2) == 0:
        shapes = [(L, S), (N * layer.num_heads, L, S), (N, layer.num_heads, L, S), (1, L, S)]
        am = build_mask(fdp, shapes[fdp.ConsumeIntInRange(0, 3)], dt, inputs)
    is_causal = fdp.ConsumeIntInRange(0, 7) == 0
    need_weights = fdp.ConsumeBool()
    trace = fdp.ConsumeBool()
    heads = layer.num_heads * (1 if unbatched else N) * L * (S + 2)
    # the projected keys and values (with bias_k / the zero key appended) exist
    # even when there is no query: (N, S + 2, E) each
    kv = 2 * (1 if unbatched else N) * (S + 2) * layer.embed_dim
    params = tuple(layer.state_dict().values())  # their size decides rule 6 too
    if legit_but_huge((query, key, value, am, kpm) + params, 8 * heads + kv,
                      heads * layer.head_dim * 2 + 8 * dims_product(query) * layer.embed_dim,
                      reference=bool(trace) or (layer.training and layer.dropout != 0)):
        return
    average = fdp.ConsumeBool()
    res = call(inputs, "MultiheadAttention.__call__", layer, query, key, value,
               key_padding_mask=kpm, need_weights=need_weights, attn_mask=am,
               average_attn_weights=average, is_causal=is_causal, trace=trace)
    if res is None:
        return
    if isinstance(query, np.ndarray) and res.output.shape != query.shape[:-1] + (layer.embed_dim,):
        raise Finding(f"MultiheadAttention: output shape {res.output.shape} for query "
                      f"{query.shape}")
    check_mha_result(layer, res, query, key, value, kpm, am, need_weights, average)
    if trace and fdp.ConsumeBool():
        gshape = res.output.shape
        if fdp.ConsumeIntInRange(0, 3) == 0:
            gshape = mutate_shape(fdp, gshape)
        go = build_array(fdp, "grad_output", gshape, dt, inputs)
        other = fdp.ConsumeIntInRange(0, 7) == 0
        target = attnpy.MultiheadAttention(E, H, **kwargs) if other else layer
        call(inputs, "MultiheadAttention.backward", target.backward,
             res if fdp.ConsumeIntInRange(0, 7) else res.output, go)


def ref_mha(layer, query, key, value, kpm, am):
    """float64 forward of the layer in eval mode: (output, per-head weights,
    logits, the size of what each output entry sums), in the caller's layout."""
    unb = np.ndim(query) == 2
    ref = mha_reference(layer, *(mha_to_batch_first(layer, x) for x in (query, key, value)),
                        kpm, am)
    D = layer.embed_dim // layer.num_heads
    S2 = ref["weights"].shape[-1]
    # the largest finite entries: a non-finite value row of zero weight is not
    # read (and one that is read makes the output non-finite: not compared)
    peak = lambda a: 1 + np.max(np.abs(a[np.isfinite(a)]), initial=0)  # noqa: E731
    size = peak(ref["q"]) * peak(ref["k_expanded"]) * D
    size *= peak(ref["v_expanded"]) * (S2 + 1) * (layer.embed_dim + 1) * peak(
        ref["params"]["out_proj.weight"])
    w = ref["weights"][0] if unb else ref["weights"]
    return mha_from_batch_first(layer, ref["output"], unb), w, ref["logits"], size


def check_mha_result(layer, res, query, key, value, kpm, am, need_weights, average):
    """The layer's output (and weights) against the float64 reference, eval mode."""
    if layer.training and layer.dropout > 0:
        return
    key = query if key is None else key
    value = key if value is None else value
    for m in (kpm, am):
        if m is not None and not isinstance(m, np.ndarray):
            return
    if not finite_moderate(query, key, value, kpm, am):
        return
    if any(x.size > MAX_WORK for x in (query, key, value)):
        return
    with np.errstate(all="ignore"):
        want_out, want_w, logits, size = ref_mha(layer, query, key, value, kpm, am)
    if np.any(np.isposinf(logits)) or not np.all(np.isfinite(want_out)) or size > 1e12:
        return
    close("output", res.output, want_out, layer.dtype, size, "MultiheadAttention")
    if need_weights:
        want = want_w.mean(axis=-3) if average else want_w
        close("weights", res.weights, want, layer.dtype, size, "MultiheadAttention")


def dims_product(x):
    return math.prod(x.shape) if isinstance(x, np.ndarray) else 0


def scenario_self_attention(fdp):
    dtype = FLOAT_DTYPES[fdp.ConsumeIntInRange(0, 1)]
    inputs = Inputs()
    N, L, dm, dk, dv = (pick_dim(fdp, 4) for _ in range(5))
    unb = fdp.ConsumeBool()
    x = build_array(fdp, "x", (L, dm) if unb else (N, L, dm), dtype, inputs)
    wq = build_array(fdp, "w_q", (dm, dk), dtype, inputs)
    wk = build_array(fdp, "w_k", (dm, dk), dtype, inputs)
    wv = build_array(fdp, "w_v", (dm, dv), dtype, inputs)
    ms = [(L, L), (N, L, L), (1, L), (L,), (N, 1, L, L)][fdp.ConsumeIntInRange(0, 4)]
    mask = build_mask(fdp, ms, dtype, inputs)
    is_causal = pick_flag(fdp) if fdp.ConsumeIntInRange(0, 3) == 0 else False
    scale = pick_scalar(fdp, "scale") if fdp.ConsumeBool() else None
    trace = fdp.ConsumeBool()
    Nn = 1 if unb else N
    # the sizes the arguments have, not the ones drawn: a shape may have been
    # mutated, or x be a list ([[]]: L = 1 where L = 0 was drawn)
    xs, qs, vs = shape_of(x), shape_of(wq), shape_of(wv)
    Nn, L = max(Nn, math.prod(xs[:-2])), max(L, xs[-2] if len(xs) >= 2 else 0)
    dk, dv = max(dk, qs[-1] if qs else 0), max(dv, vs[-1] if vs else 0)
    if legit_but_huge((x, wq, wk, wv, mask), 8 * Nn * L * L + 4 * Nn * L * (dk + dv),
                      Nn * L * L * (dk + dv) + Nn * L * dm * (2 * dk + dv), scale=scale,
                      reference=bool(trace)):
        return
    res = call(inputs, "self_attention", attnpy.self_attention, x, wq, wk, wv, attn_mask=mask,
               is_causal=is_causal, scale=scale, trace=trace)
    if res is None or not all(isinstance(a, np.ndarray) for a in (x, wq, wk, wv)):
        return
    if not finite_moderate(x, wq, wk, wv, mask) or x.dtype not in FLOAT_DTYPES:
        return
    if scale is not None and not (isinstance(scale, float) and abs(scale) <= 64):
        return
    if x.shape[-2] ** 2 > MAX_WORK or x.size > MAX_WORK:
        return
    unb = x.ndim == 2  # what attnpy goes by (the shape may have been mutated)
    x64 = x.astype(np.float64)
    with np.errstate(all="ignore"):
        if any(np.max(np.abs(x64 @ w.astype(np.float64)), initial=0) > 64 for w in (wq, wk, wv)):
            return
        want_out, want_w = self_attention_reference(x64, wq, wk, wv, mask, bool(is_causal),
                                                    scale)
    if want_out.shape != res.output.shape:
        if unb and want_out.ndim == 3:
            return  # an (N, L, L) mask on unbatched x: shapes differ legitimately
        raise Finding(f"self_attention: output shape {res.output.shape}, reference "
                      f"{want_out.shape}")
    if np.any(~np.isfinite(want_out)):
        return
    big = (1 + (1 / math.sqrt(max(dk, 1)) if scale is None else abs(scale))) * 64 * 64 * (
        dk + 1) * 64 * (dm + 1)
    close("weights", res.weights, want_w, x.dtype, big, "self_attention")
    close("output", res.output, want_out, x.dtype, big * (L + 1) * 64, "self_attention")


def natural_mask_kind(mask):
    """The kind the public SDPA gives a mask: bool means attend, float is added."""
    return "attend" if getattr(mask, "dtype", None) == np.bool_ else "add"


def same_meaning(opts, mask, kind):
    """Do the private options mean what the public call with these arguments
    means? (extra_keys leaves the last keys unmasked, and the core applies a
    mask and the causal one together, which the public function refuses:
    other problems, which the reference does not compute.)"""
    both = mask is not None and opts.get("is_causal") is True
    return kind == natural_mask_kind(mask) and not opts.get("extra_keys") and not both


def private_mask_kind(fdp, mask):
    r = fdp.ConsumeIntInRange(0, 15)
    return natural_mask_kind(mask) if r > 2 else ["ignore", "add", "Attend"][r]


def private_options(fdp, q, mask, kind, is_causal, scale, enable_gqa, dropout):
    """The private entry points' options, by name, as Python would pass them, and now
    and then as nobody should (junk in a field, a misspelt name: TypeError)."""
    E = q.shape[-1] if isinstance(q, np.ndarray) and q.ndim else 1
    opts = dict(scale=(1.0 / math.sqrt(E) if E else math.inf) if scale is None else scale,
                masks=[] if mask is None else [(mask, kind, "attn_mask")],
                is_causal=is_causal, enable_gqa=enable_gqa, dropout_p=dropout,
                seed=fdp.ConsumeIntInRange(0, 2**64 - 1))
    r = fdp.ConsumeIntInRange(0, 31)
    if r == 0:
        opts["extra_keys"] = pick_int(fdp, 0, 8)
    elif r == 1:
        opts["is_casual"] = True
    elif r == 2:
        opts["masks"] = [mask] if mask is not None else [(None, "add", "m")]
    elif r == 3:
        del opts["scale"]
    elif r == 4:
        opts["seed"] = [-1, 2**70, "seed"][fdp.ConsumeIntInRange(0, 2)]
    return opts


def private_grads(fdp, inputs_qkv, readable):
    """grads=: None, or arrays shaped like query, key, value (some aliasing what the
    backward reads, which must be refused; some read-only or strided)."""
    if fdp.ConsumeIntInRange(0, 2):
        return None
    grads = []
    for x in inputs_qkv:
        r = fdp.ConsumeIntInRange(0, 7)
        shape = x.shape if isinstance(x, np.ndarray) else (1,)
        dt = x.dtype if isinstance(x, np.ndarray) and x.dtype.kind == "f" else np.float64
        if r == 0:
            grads.append(None)
        elif r == 1:
            alias = [a for a in readable if isinstance(a, np.ndarray)]
            grads.append(alias[fdp.ConsumeIntInRange(0, len(alias) - 1)] if alias else None)
        else:
            g = np.full(shape, 7.0, dt) if math.prod(shape) <= (1 << 16) else None
            if g is not None and r == 2:
                g.flags.writeable = False
            if g is not None and r == 3 and g.ndim > 1:
                g = g.T
            grads.append(g)
    return tuple(grads)


def scenario_core_linear(fdp, accumulate):
    """_core.linear(x, weight, bias, out=, accumulate=) against x @ weight.T + bias."""
    dtype = FLOAT_DTYPES[fdp.ConsumeIntInRange(0, 1)]
    inputs = Inputs()
    N, M, K, O = pick_dim(fdp, 3), pick_dim(fdp, 5), pick_dim(fdp, 5), pick_dim(fdp, 5)
    x = build_array(fdp, "x", (N, M, K), dtype, inputs)
    w = build_array(fdp, "weight", (O, K), dtype, inputs)
    b = None if fdp.ConsumeBool() else build_array(fdp, "bias", (O,), dtype, inputs)
    out = None
    if accumulate or fdp.ConsumeIntInRange(0, 3) == 0:
        r = fdp.ConsumeIntInRange(0, 5)
        if r == 0 and isinstance(x, np.ndarray):
            out = x  # aliasing an input: must be refused
        elif math.prod((N, M, O)) <= (1 << 16) and max(N, M, O) <= (1 << 16):
            out = np.full((N, M, O), 0.5 * r, dtype)
            if r == 2:
                out = out.transpose(0, 2, 1).copy().transpose(0, 2, 1)  # strided
            elif r == 3:
                out.flags.writeable = False
    if legit_but_huge((x, w, b), math.prod((N, M, O)), math.prod((N, M, O, K)),
                      attention=False):
        return
    # out may alias x, of any dtype and size (then the call must refuse it)
    before = out.astype(np.float64) if isinstance(out, np.ndarray) and out is not x else None
    res = call(inputs, "_core.linear", _core.linear, x, w, b, out=out, accumulate=accumulate)
    if res is None or not all(isinstance(a, np.ndarray) for a in (x, w)):
        return
    if not finite_moderate(x, w, b) or (accumulate and (before is None or
                                                        not np.isfinite(before).all())):
        return
    want = x.astype(np.float64) @ w.astype(np.float64).T
    if b is not None:
        want = want + b.astype(np.float64)
    if accumulate:
        want = want + before
    close("linear", res, want, res.dtype, 64 * 64 * (K + 1) + 64, "_core.linear")


def scenario_causal_mask(fdp):
    L = pick_int(fdp, 0, 8) if fdp.ConsumeIntInRange(0, 7) else pick_scalar(fdp, "L")
    S = None if fdp.ConsumeBool() else pick_int(fdp, 0, 8)
    align = ["top_left", "bottom_right", "middle", None][fdp.ConsumeIntInRange(0, 3)]
    dt = [np.float32, np.float64, np.float16, int, "f8", object][fdp.ConsumeIntInRange(0, 5)]
    res = call(Inputs(), "causal_mask", attnpy.causal_mask, L, S, align=align, dtype=dt)
    if res is None:
        return
    SS = L if S is None else S
    if res.shape != (L, SS):
        raise Finding(f"causal_mask: shape {res.shape} for L={L}, S={S}")
    off = 0 if align == "top_left" else SS - L
    want = np.where(np.arange(SS)[None] <= np.arange(L)[:, None] + off, 0.0, -np.inf)
    if not np.array_equal(res, want):
        raise Finding(f"causal_mask({L}, {S}, {align}) is wrong")


def scenario_config(fdp):
    """set_num_threads / set_kernel with odd values, then a call to check."""
    r = fdp.ConsumeIntInRange(0, 3)
    if r == 0:
        n = [0, 1, 2, 3, -1, 257, 2**40, 2**70, 1.5, "2", None, True][
            fdp.ConsumeIntInRange(0, 11)]
        call(Inputs(), "set_num_threads", attnpy.set_num_threads, n)
    elif r == 1:
        name = ["auto", "reference", "baseline", "avx2", "avx512", "AVX2", "", None, 3,
                "reference\0x"][fdp.ConsumeIntInRange(0, 9)]
        call(Inputs(), "set_kernel", attnpy.set_kernel, name)
    else:
        call(Inputs(), "use_kernel", lambda: attnpy.use_kernel(
            ["reference", "bogus", "auto"][fdp.ConsumeIntInRange(0, 2)]).__enter__())
    scenario_sdpa(fdp, False)


SCENARIOS = [
    lambda f: scenario_sdpa(f, False),
    lambda f: scenario_sdpa(f, False),
    lambda f: scenario_sdpa(f, True),
    lambda f: scenario_sdpa_backward(f, False),
    lambda f: scenario_sdpa_backward(f, True),
    scenario_mha,
    scenario_mha,
    scenario_self_attention,
    lambda f: scenario_core_linear(f, False),
    lambda f: scenario_core_linear(f, True),
    scenario_causal_mask,
    scenario_config,
]


# ---------------------------------------------------------------------------


# "x must be a float; got int" contradicts itself (ints are floats to every
# entry point): what a huge int gave before the range became a ValueError
CONTRADICTION = re.compile(r"must be an? (int|float)\b[^;]*; got (int|float)$")


def check_message(what, e):
    msg = str(e)
    if not msg.strip():
        raise Finding(f"{what} raised {type(e).__name__} with an empty message") from e
    m = CONTRADICTION.search(msg) if isinstance(e, TypeError) else None
    if m and (m[1] == m[2] or m.groups() == ("float", "int")):
        raise Finding(f"{what} raised a self-contradicting TypeError: {msg}") from e


VERBOSE = os.environ.get("ATTNPY_FUZZ_VERBOSE") == "1"


def describe(x):
    if isinstance(x, np.ndarray):
        values = ""
        if x.dtype.kind == "f" and x.size:
            with np.errstate(all="ignore"):
                real = real_values(x)  # a huge broadcast view: its few real values
                values = (f", max|x|={float(np.max(np.abs(real))):.3g}, "
                          f"finite={bool(np.all(np.isfinite(real)))}")
        return (f"ndarray(shape={x.shape}, dtype={x.dtype}, strides={x.strides}, "
                f"writeable={x.flags.writeable}, aligned={x.flags.aligned}{values})")
    r = repr(x)
    return r if len(r) < 80 else r[:77] + "..."


# CPython's own conversion of an out-of-range Python int for a C integer or
# double parameter ("n", "d" in PyArg_ParseTuple) of the private _core entry
# points raises OverflowError before attnpy sees the argument. Accepted there
# only: every public function checks its ints first.
PARSE_OVERFLOW = ("too large to convert to C", "int too large to convert to float")


def call(inputs, what, fn, *args, overflow_ok=False, **kwargs):
    """Call fn; None when it raised an accepted error. Anything else is a finding."""
    if VERBOSE:  # replaying one input: say what is called with what
        print(f"{what}(", file=sys.stderr)
        for a in args:
            print(f"    {describe(a)},", file=sys.stderr)
        for kw, a in kwargs.items():
            print(f"    {kw}={describe(a)},", file=sys.stderr)
        print(")", file=sys.stderr)
    try:
        res = fn(*args, **kwargs)
    except ACCEPTED as e:
        check_message(what, e)
        inputs.check_unchanged(what + " (error path)")
        return None
    except Finding:
        raise
    except OverflowError as e:
        if not (overflow_ok and any(m in str(e) for m in PARSE_OVERFLOW)):
            raise Finding(f"{what} raised OverflowError: {e}") from e
        inputs.check_unchanged(what + " (error path)")
        return None
    except Exception as e:
        raise Finding(f"{what} raised {type(e).__name__}: {e}") from e
    inputs.check_unchanged(what)
    return res


def TestOneInput(data):
    fdp = atheris.FuzzedDataProvider(data)
    # the kernel and thread count for this input (cheap to set when unchanged)
    kernel, threads = KERNELS[fdp.ConsumeIntInRange(0, len(KERNELS) - 1)], \
        fdp.ConsumeIntInRange(1, 3)
    KERNEL[0] = kernel
    attnpy.set_kernel(kernel)
    attnpy.set_num_threads(threads)
    if VERBOSE:
        print(f"kernel={kernel} threads={threads}", file=sys.stderr)
    SCENARIOS[fdp.ConsumeIntInRange(0, len(SCENARIOS) - 1)](fdp)


def main():
    extra = {}
    if os.environ.get("ATTNPY_FUZZ_GLOBAL_LIBFUZZER") == "1":
        extra["internal_libfuzzer"] = True  # the one loaded above
    # libFuzzer starts argv[0] again for -merge=1 and -fork=N: a script that
    # runs this file with the same python (fuzz/self.sh)
    argv = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "self.sh")] + sys.argv[1:]
    atheris.Setup(argv, TestOneInput, **extra)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

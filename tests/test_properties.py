"""Property-based tests (hypothesis) over every public function.

Each test draws a call -- shapes (0-length batch, heads, L, S, E, Ev
included), dtypes (every kind NumPy has: ints, bool, float16, longdouble,
complex, object, str, bytes, datetime, timedelta, structured, byte-swapped
float32/64), memory layouts (C, Fortran, negative strides, zero strides,
strided slices, buffers at an odd byte offset, read-only arrays, lists),
masks of every dtype and shape, scales (0, negative, +-inf, NaN, 1e-30,
1e30, ints, strings) and values with NaN and +-inf -- and predicts from the
documented rules alone whether the call is valid:

- valid: the result must match the float64 NumPy reference (reference.py)
  with the rules attnpy promises for non-finite values;
- invalid: the call must raise TypeError or ValueError whose message names an
  argument that is wrong (one of the wrong ones, when several are).

Either way no input may change (the bytes of every buffer are compared).

Reproducible and bounded: derandomize=True and no example database, so CI
runs the same examples every time (about 7 s here). Each test prints how many
examples ran and how they ended (run with -s to see it). For a longer local
hunt: ATTNPY_HYPOTHESIS_SCALE=20 multiplies the number of examples (2.5 min),
ATTNPY_HYPOTHESIS_RANDOM=1 draws new ones each run.
"""
import os
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

import attnpy
from reference import (additive_mask, position_mask, mha_backward_reference, mha_from_batch_first,
                       mha_reference, mha_to_batch_first, sdpa_backward_reference,
                       sdpa_reference, self_attention_reference)

SCALE = float(os.environ.get("ATTNPY_HYPOTHESIS_SCALE", "1"))
FIXED = os.environ.get("ATTNPY_HYPOTHESIS_RANDOM") != "1"
COUNTS = {}


def examples(n):
    return settings(max_examples=max(1, int(n * SCALE)), deadline=None, derandomize=FIXED,
                    database=None, suppress_health_check=list(HealthCheck))


def run(prop, name, min_ok, min_errors):
    """Run one property; report and check how its examples ended."""
    COUNTS[name] = Counter()
    prop()
    c = COUNTS[name]
    print(f"\nhypothesis {name}: {sum(c.values())} examples: {c['ok']} matched the reference, "
          f"{c['TypeError']} TypeError, {c['ValueError']} ValueError")
    # the generators must keep producing both kinds of call
    assert c["ok"] >= min_ok * min(SCALE, 1) and \
        c["TypeError"] + c["ValueError"] >= min_errors * min(SCALE, 1), c


# ---------------------------------------------------------------------------
# inputs: values, dtypes, layouts

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)
BAD_DTYPES = [np.dtype(d) for d in (
    "int8", "int64", "uint8", "bool", "float16", "longdouble", "complex64", "complex128",
    "object", "U3", "S3", "M8[s]", "m8[s]", [("a", "<f4"), ("b", "<f4")], ">f4", ">f8")]
LAYOUTS = ["C", "F", "reversed", "strided", "broadcast", "unaligned", "readonly", "list"]


def values(rng, shape, special):
    """Halves in [-2, 2]: exact in float32, so dot products are exact too.
    special: a few NaN / +inf / -inf at random places."""
    x = np.asarray(rng.integers(-4, 5, size=shape) / 2.0)
    if special and x.size:
        for _ in range(rng.integers(1, 3)):
            x.flat[rng.integers(x.size)] = rng.choice([np.nan, np.inf, -np.inf])
    return x


def cast(x, dt):
    if dt.kind in "fc":
        return x.astype(dt)
    if dt.kind == "V":
        return np.zeros(x.shape, dt)
    finite = np.nan_to_num(x, nan=0.0, posinf=2.0, neginf=-2.0)
    if dt.kind in "iub":
        return finite.astype(dt)
    if dt.kind in "Mm":
        return finite.astype(np.int64).astype(dt)
    return x.astype(dt)   # object, str, bytes


def make(x, dt, layout, rng):
    """x (float64 content) as an object of dtype dt laid out as asked."""
    if layout == "list" and dt in (F32, F64) and x.ndim:
        return x.tolist()
    a = np.asarray(cast(x, dt))
    nd = a.ndim
    if layout == "F":
        return np.asfortranarray(a)
    if layout == "readonly":
        a = a.copy()
        a.flags.writeable = False
        return a
    if layout == "reversed" and nd:
        ax = int(rng.integers(nd))
        return np.flip(np.flip(a, ax).copy(), ax)       # negative stride on ax
    if layout == "strided" and nd:
        big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), dt)
        big[..., ::2] = a
        return big[..., ::2]
    if layout == "broadcast" and nd and a.shape[0]:
        ax = int(rng.integers(nd))
        if a.shape[ax]:
            return np.broadcast_to(a.take([0], axis=ax), a.shape)   # stride 0 on ax
    if layout == "unaligned" and dt.kind != "O":
        raw = bytearray(a.nbytes + 1)
        u = np.frombuffer(raw, dtype=dt, count=a.size, offset=1).reshape(a.shape)
        u[...] = a
        return u
    return np.ascontiguousarray(a)


@st.composite
def array_kinds(draw, rng, base=None, good=0.9):
    """(dtype, layout) of one array argument: mostly the call's float dtype
    `base`, laid out any way (an odd byte offset less often: it is refused)."""
    if rng.random() < good:
        dt = base if base is not None else draw(st.sampled_from([F32, F64]))
    else:
        dt = draw(st.sampled_from(BAD_DTYPES + [F32, F64]))
    layout = draw(st.sampled_from(LAYOUTS[:5] + LAYOUTS[6:]) if rng.random() < 0.93
                  else st.just("unaligned"))
    return dt, layout


def problem(obj, name):
    """What the binding says about an array argument: None (accepted) or
    (exception, name). Lists of floats are converted; ndarrays never."""
    if isinstance(obj, list):
        return None
    dt = obj.dtype
    if dt.kind != "f" or dt.itemsize not in (4, 8) or not dt.isnative:
        return (TypeError, name)
    if not obj.flags.aligned:
        return (ValueError, name)
    return None


def buffers(*objs):
    """The memory behind each array argument (the array owning it), to compare
    before and after the call."""
    out = []
    for o in objs:
        if isinstance(o, np.ndarray) and o.dtype.kind != "O":
            while isinstance(o.base, np.ndarray):
                o = o.base
            out.append(o)
    return out


def snapshot(bufs):
    return [np.asarray(b).tobytes() for b in bufs]


def outcome(name, call, expected_errors, inputs):
    """Call; an error must be one of expected_errors (exception, names...)."""
    bufs = buffers(*inputs)
    before = snapshot(bufs)
    try:
        result = call()
    except (TypeError, ValueError) as e:
        note(f"raised {type(e).__name__}: {e}")
        assert expected_errors, f"valid call raised {type(e).__name__}: {e}"
        assert any(isinstance(e, exc) and any(n in str(e) for n in names)
                   for exc, *names in expected_errors), \
            f"{type(e).__name__}: {e!s} -- expected one of {expected_errors}"
        COUNTS[name][type(e).__name__] += 1
        result = None
    assert snapshot(bufs) == before, "an input was written"
    if result is not None:
        assert not expected_errors, f"expected one of {expected_errors}, got a result"
        COUNTS[name]["ok"] += 1
    return result


def close(got, want, dtype, what):
    rtol, atol = (1e-9, 1e-12) if dtype == F64 else (2e-5, 2e-5)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, equal_nan=True, err_msg=what)


def ambiguous_rows(weights, v):
    """Output rows where a key with a vanishing weight (below 1e-30: it may
    round to 0 in the input precision, then its value row is not read) has a
    non-finite value row: those rows are not compared."""
    tiny = (weights > 0) & (weights < 1e-30)
    bad = ~np.isfinite(v).all(axis=-1)                     # (..., S)
    return (tiny & bad[..., None, :]).any(axis=-1)          # (..., L)


# ---------------------------------------------------------------------------
# scaled_dot_product_attention

SCALES = [None, None, None, 0.0, -1.0, 0.5, 3, 2.0, np.float32(0.25), float("inf"),
          float("-inf"), float("nan"), 1e-30, 1e30, True, "0.5", 1j]


@st.composite
def sdpa_calls(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    dims = st.integers(0, 5)
    batch = tuple(draw(st.lists(st.integers(0, 3), max_size=2)))
    Hk = draw(st.integers(0, 3))
    gqa = draw(st.booleans())
    Hq = Hk * draw(st.integers(1, 3)) if gqa else Hk
    L, S, E, Ev = draw(dims), draw(dims), draw(dims), draw(dims)
    heads_axis = draw(st.booleans()) or bool(batch)
    lead_q = batch + ((Hq,) if heads_axis else ())
    lead_kv = batch + ((Hk,) if heads_axis else ())
    # key/value may drop or shrink leading dims to broadcast
    if draw(st.booleans()) and lead_kv:
        lead_kv = tuple(1 if draw(st.booleans()) else d for d in lead_kv)
        lead_kv = lead_kv[draw(st.integers(0, len(lead_kv))):]
    shapes = {"query": lead_q + (L, E), "key": lead_kv + (S, E), "value": lead_kv + (S, Ev)}
    # sometimes a shape is wrong
    wrong = draw(st.sampled_from(["E", "S", "ndim", "lead"])) if rng.random() < 0.12 else None
    if wrong == "E":
        shapes["key"] = shapes["key"][:-1] + (E + 1,)
    elif wrong == "S":
        shapes["value"] = shapes["value"][:-2] + (S + 1, Ev)
    elif wrong == "ndim":
        shapes[draw(st.sampled_from(list(shapes)))] = (draw(dims),)[: draw(st.integers(0, 1))]
    elif wrong == "lead" and batch:
        shapes["key"] = (batch[0] + 1,) + shapes["key"][1:]
    special = rng.random() < 0.25
    base = draw(st.sampled_from([F32, F64]))
    args = {}
    for name, shape in shapes.items():
        dt, layout = draw(array_kinds(rng, base, good=0.95))
        args[name] = make(values(rng, shape, special and draw(st.booleans())), dt, layout, rng)

    # the mask: none, or bool / float / another dtype, broadcastable or not
    w_shape = None
    mask = None
    mask_kind = draw(st.sampled_from(["none", "none", "bool", "float", "other", "list"]))
    if mask_kind != "none":
        full = lead_q + (L, S) if wrong is None else (L, S)
        keep = draw(st.integers(0, len(full)))
        shape = tuple(1 if rng.random() < 0.3 else d for d in full[len(full) - keep:])
        if rng.random() < 0.1:
            shape = shape[:-1] + (S + 2,)
        if mask_kind == "bool":
            m = rng.random(shape) < 0.7
            mask = make(m, np.dtype(bool), draw(st.sampled_from(LAYOUTS[:-1])), rng)
        elif mask_kind == "float":
            m = np.where(rng.random(shape) < 0.7, values(rng, shape, draw(st.booleans())), -np.inf)
            dt, layout = draw(array_kinds(rng, base))
            mask = make(m, dt, layout, rng)
        elif mask_kind == "other":
            mask = make(values(rng, shape, False), draw(st.sampled_from(BAD_DTYPES)), "C", rng)
        else:
            m = np.asarray(rng.random(shape) < 0.7)
            mask = draw(st.sampled_from([m, np.where(m, 0.0, -np.inf), m.astype(int)]))
            mask = mask.tolist() if mask.ndim else mask
        w_shape = shape
    scale = draw(st.sampled_from(SCALES[:-2] if rng.random() < 0.95 else SCALES[-2:]))
    kwargs = dict(attn_mask=mask, is_causal=rng.random() < (0.25 if mask is None else 0.03),
                  scale=scale, enable_gqa=gqa, need_weights=draw(st.booleans()))
    if rng.random() < 0.03:
        kwargs["dropout_p"] = draw(st.sampled_from([1.5, "x"]))   # 0 < p <= 1 is valid
    if rng.random() < 0.35:
        kwargs.update(draw(position_options(rng, np.shape(args["query"]), lead_q, L, S, wrong,
                                            base)))
    r = rng.random()
    out_kind = "none" if r < 0.7 else "good" if r < 0.85 else draw(
        st.sampled_from(["dtype", "shape", "F", "readonly", "alias", "list"]))
    kernel = draw(st.sampled_from(["auto", "reference"]))
    return args, kwargs, out_kind, kernel, w_shape


@st.composite
def position_options(draw, rng, q_shape, lead_q, L, S, wrong, base):
    """query_offset, window, alibi_slopes, attn_bias (issue 15): valid values,
    and now and then an attn_bias of another dtype or shape."""
    opts = {}
    if draw(st.booleans()):
        opts["query_offset"] = draw(st.integers(0, S + 3))
    if draw(st.booleans()):
        opts["window"] = (draw(st.integers(0, 4)), draw(st.integers(0, 4)))
    if draw(st.booleans()):
        heads = q_shape[-3:-2] if len(q_shape) >= 3 else ()
        opts["alibi_slopes"] = rng.uniform(0, 1, heads if draw(st.booleans()) else ())
    if draw(st.booleans()):
        full = lead_q + (L, S) if wrong is None else (L, S)
        keep = draw(st.integers(0, len(full)))
        shape = tuple(1 if rng.random() < 0.3 else d for d in full[len(full) - keep:])
        if rng.random() < 0.05:
            shape = shape[:-1] + (S + 2,)
        dt = base if rng.random() < 0.95 else draw(st.sampled_from([F32, F64, np.dtype(bool)]))
        opts["attn_bias"] = rng.standard_normal(shape).astype(dt)
    return opts


def float_type(obj):
    return obj.dtype if isinstance(obj, np.ndarray) else None


def sdpa_expectations(args, kwargs):
    """(errors, dtype, out_shape, w_shape): the errors a call must raise one of
    (empty when it is valid) and, for a valid one, the output's shape."""
    q, k, v = args["query"], args["key"], args["value"]
    errors = []
    dp = kwargs.get("dropout_p", 0.0)
    if isinstance(dp, str):
        errors.append((TypeError, "dropout_p"))
    elif not 0 <= dp <= 1:
        errors.append((ValueError, "dropout_p"))
    scale = kwargs["scale"]
    if isinstance(scale, (str, complex)):
        errors.append((TypeError, "scale"))
    errors += [p for p in (problem(a, n) for n, a in args.items()) if p]
    # the dtype lists are converted to: the first float ndarray's
    cast_to = F64
    for a in (v, k, q):
        if isinstance(a, np.ndarray) and a.dtype in (F32, F64):   # native order, as _args
            cast_to = np.dtype(a.dtype.type)
    dts = {np.dtype(a.dtype.type) if isinstance(a, np.ndarray) else cast_to for a in (q, k, v)}
    if len(dts) > 1:
        errors.append((TypeError, "query, key and value"))
    dtype = cast_to if len(dts) > 1 else dts.pop()
    mask = kwargs["attn_mask"]
    # what a mask means is checked whatever the shapes (attnpy/_args.py)
    if mask is not None and kwargs["is_causal"]:
        errors.append((ValueError, "attn_mask"))
    if isinstance(mask, list) and np.asarray(mask).dtype.kind in "iu":
        errors.append((TypeError, "attn_mask"))
    bias = kwargs.get("attn_bias")
    if bias is not None and bias.dtype != np.bool_ and bias.dtype != dtype:
        errors.append((TypeError, "attn_bias"))
    if bias is not None and bias.dtype == np.bool_:
        errors.append((TypeError, "attn_bias"))
    shapes = {n: np.shape(a) for n, a in args.items()}
    if any(len(s) < 2 for s in shapes.values()):
        errors += [(ValueError, n) for n, s in shapes.items() if len(s) < 2]
        return errors, dtype, None, None
    (L, E), (S, E2), (S2, Ev) = shapes["query"][-2:], shapes["key"][-2:], shapes["value"][-2:]
    if E2 != E:
        errors.append((ValueError, "key"))
    if S2 != S:
        errors.append((ValueError, "value"))
    nd = max(len(s) for s in shapes.values())
    pad = [(1,) * (nd - len(s)) + s for s in shapes.values()]
    lead = []
    for d in range(nd - 2):
        sizes = [p[d] for p in pad]
        if kwargs["enable_gqa"] and d == nd - 3:
            Hq, Hk, Hv = sizes
            if Hk != Hv or (Hq % Hk if Hk else Hq):
                errors.append((ValueError, "enable_gqa", "key"))
            lead.append(Hq)
            continue
        big = {s for s in sizes if s != 1}
        if len(big) > 1:
            errors.append((ValueError, "query"))
        lead.append(big.pop() if len(big) == 1 else 1)
    out_shape = tuple(lead) + (L, Ev)
    w_shape = tuple(lead) + (L, S)
    if mask is not None:
        if isinstance(mask, list):
            m = np.asarray(mask)
        else:
            m = mask
            if m.dtype != np.bool_:
                if m.dtype.kind != "f" or np.dtype(m.dtype.type) != dtype:
                    errors.append((TypeError, "attn_mask"))
                elif not m.dtype.isnative:
                    errors.append((TypeError, "attn_mask"))
                elif not m.flags.aligned:
                    errors.append((ValueError, "attn_mask"))
        ms = m.shape
        if len(ms) > len(w_shape) or any(a != 1 and a != b for a, b in
                                         zip(ms[::-1], w_shape[::-1])):
            errors.append((ValueError, "attn_mask"))
    if bias is not None:
        bs = bias.shape
        if len(bs) > len(w_shape) or any(a != 1 and a != b for a, b in
                                         zip(bs[::-1], w_shape[::-1])):
            errors.append((ValueError, "attn_bias"))
    return errors, dtype, out_shape, w_shape


def reference_mask(args, kwargs):
    """(attn_mask, is_causal) for the reference: as given, or with positions
    or attn_bias one additive float64 mask (attn_mask + the positions, causal
    among them, + the bias)."""
    mask, is_causal = kwargs["attn_mask"], kwargs["is_causal"]
    positions = {n: kwargs[n] for n in ("query_offset", "window", "alibi_slopes") if n in kwargs}
    if not positions and "attn_bias" not in kwargs:
        return mask, is_causal
    L, S = np.shape(args["query"])[-2], np.shape(args["key"])[-2]
    if len(np.shape(args["query"])) < 3 and "alibi_slopes" in positions:
        positions["alibi_slopes"] = positions["alibi_slopes"].reshape(())   # no head axis
    m = position_mask(L, S, is_causal=is_causal, **positions)
    given = additive_mask(mask, False, L, S)
    total = m + (0.0 if given is None else given) + np.asarray(kwargs.get("attn_bias", 0.0),
                                                               np.float64)
    # a key hidden by its position is out, whatever a float mask or the bias
    # holds there (+inf and NaN too): the kernels never read it
    with np.errstate(invalid="ignore"):
        return np.where(np.isneginf(m), -np.inf, total), False


def make_out(kind, args, dtype, out_shape):
    """The out= argument and the errors it brings."""
    if kind == "none" or out_shape is None:
        return None, []
    if kind == "list":
        return np.zeros(out_shape).tolist(), [(TypeError, "out")]
    if kind == "dtype":
        other = F32 if dtype == F64 else F64
        return np.zeros(out_shape, other), [(TypeError, "out")]
    if kind == "shape":
        return np.zeros(out_shape[:-1] + (out_shape[-1] + 1,), dtype), [(ValueError, "out")]
    out = np.zeros(out_shape, dtype)
    if kind == "F":
        out = np.asfortranarray(out)
        return out, [] if out.flags.c_contiguous else [(ValueError, "out")]
    if kind == "readonly":
        out.flags.writeable = False
        return out, [(ValueError, "out")]
    if kind == "alias":
        q = args["query"]
        if isinstance(q, np.ndarray) and q.shape == out_shape and q.dtype == dtype and \
                q.flags.c_contiguous and q.flags.writeable and q.flags.aligned and q.size:
            return q, [(ValueError, "out")]
    return out, []


@examples(1500)
@given(sdpa_calls())
def _prop_sdpa(call):
    args, kwargs, out_kind, kernel, _ = call
    errors, dtype, out_shape, w_shape = sdpa_expectations(args, kwargs)
    out, out_errors = make_out(out_kind, args, dtype, out_shape)
    errors += out_errors
    note(f"errors expected: {errors}; kernel {kernel}")
    inputs = list(args.values()) + [kwargs["attn_mask"], kwargs.get("attn_bias")]

    def call_():
        with attnpy.use_kernel(kernel):
            return attnpy.scaled_dot_product_attention(**args, **kwargs, out=out)

    res = outcome("scaled_dot_product_attention", call_, errors, inputs)
    if res is None:
        return
    scale = kwargs["scale"]
    scale = None if scale is None else float(scale)
    mask, is_causal = reference_mask(args, kwargs)
    want_out, want_w, v = sdpa_reference(args["query"], args["key"], args["value"],
                                         mask, is_causal, scale,
                                         kwargs["enable_gqa"], with_values=True)
    assert res.output.dtype == dtype
    if out is not None:
        assert res.output is out
    if kwargs["need_weights"]:
        close(res.weights, want_w, dtype, "weights")
    else:
        assert res.weights is None
    skip = ambiguous_rows(want_w, v)
    got = np.where(skip[..., None], 0.0, res.output)
    close(got, np.where(skip[..., None], 0.0, want_out), dtype, "output")


@pytest.mark.slow
def test_sdpa_properties():
    run(_prop_sdpa, "scaled_dot_product_attention", min_ok=60, min_errors=60)


# ---------------------------------------------------------------------------
# scaled_dot_product_attention_backward


@st.composite
def backward_calls(draw):
    args, kwargs, _, kernel, _ = draw(sdpa_calls())
    kwargs.pop("need_weights")
    kwargs.pop("dropout_p", None)
    if isinstance(kwargs["scale"], float) and abs(kwargs["scale"]) == 1e30:
        kwargs["scale"] = 2.0   # the gradients of 1e30 * scores overflow float32
    errors, dtype, out_shape, w_shape = sdpa_expectations(args, kwargs)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    gshape = out_shape if out_shape is not None else (2, 2)
    if rng.random() < 0.1:
        gshape = gshape[:-1] + (gshape[-1] + 1,)
    dt, layout = draw(array_kinds(rng, good=0.9))
    dt = dtype if dt in (F32, F64) and rng.random() < 0.9 else dt
    dout = make(values(rng, gshape, False), dt, layout, rng)
    weights = None
    if draw(st.booleans()) and w_shape is not None and not errors:
        with attnpy.use_kernel("reference"):
            weights = attnpy.scaled_dot_product_attention(**args, **kwargs).weights
        if rng.random() < 0.15:
            weights = weights[..., :-1] if weights.shape[-1] else weights.astype(
                F32 if dtype == F64 else F64)
    return args, kwargs, dout, weights, draw(st.booleans()), kernel


@examples(800)
@given(backward_calls())
def _prop_sdpa_backward(call):
    args, kwargs, dout, weights, trace, kernel = call
    errors, dtype, out_shape, w_shape = sdpa_expectations(args, kwargs)
    if out_shape is not None and not errors:
        p = problem(dout, "grad_output")
        if p:
            errors.append(p)
        if np.shape(dout) != out_shape:
            errors.append((ValueError, "grad_output"))
        if isinstance(dout, np.ndarray) and dout.dtype != dtype:
            errors.append((TypeError, "grad_output"))
        if weights is not None and (weights.shape != w_shape or weights.dtype != dtype):
            errors.append((ValueError if weights.dtype == dtype else TypeError, "weights"))
    inputs = list(args.values()) + [kwargs["attn_mask"], kwargs.get("attn_bias"), dout, weights]

    def call_():
        with attnpy.use_kernel(kernel):
            return attnpy.scaled_dot_product_attention_backward(
                dout, **args, **kwargs, weights=weights, trace=trace)

    res = outcome("scaled_dot_product_attention_backward", call_, errors, inputs)
    if res is None:
        return
    scale = kwargs["scale"]
    scale = None if scale is None else float(scale)
    mask, is_causal = reference_mask(args, kwargs)
    want = sdpa_backward_reference(dout, args["query"], args["key"], args["value"],
                                   mask, is_causal, scale, kwargs["enable_gqa"])
    _, P, v = sdpa_reference(args["query"], args["key"], args["value"], mask,
                             is_causal, scale, kwargs["enable_gqa"], with_values=True)
    if np.isnan(P).any() or (~np.isfinite(v)).any() or (P[(P > 0) & (P < 1e-30)]).size:
        # non-finite forward values: the gradients are NaN/inf in places that
        # depend on summation order; check only that the finite ones agree
        for got, w in zip(res[:3], want):
            assert got.shape == w.shape and got.dtype == dtype
            both = np.isfinite(got) & np.isfinite(w)
            close(got[both], w[both], dtype, "gradient (finite part)")
        return
    for got, w, name in zip(res[:3], want, ("query", "key", "value")):
        assert got.dtype == dtype
        close(got, w, dtype, f"gradient of {name}")
    assert (res.trace is not None) == trace


def test_sdpa_backward_properties():
    run(_prop_sdpa_backward, "scaled_dot_product_attention_backward", min_ok=40, min_errors=40)


# ---------------------------------------------------------------------------
# MultiheadAttention: forward, trace, backward


@st.composite
def mha_calls(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    Hkv = draw(st.integers(1, 2))
    H = Hkv * draw(st.integers(1, 2))
    D = draw(st.integers(1, 3))
    E = H * D
    kdim, vdim = draw(st.sampled_from([None, 2, 5])), draw(st.sampled_from([None, 3]))
    dtype = draw(st.sampled_from([F32, F64]))
    layer = attnpy.MultiheadAttention(
        E, H, bias=draw(st.booleans()), add_bias_kv=draw(st.booleans()),
        add_zero_attn=draw(st.booleans()), kdim=kdim, vdim=vdim,
        batch_first=draw(st.booleans()), num_kv_heads=Hkv, dtype=dtype,
        seed=draw(st.integers(0, 100)))
    # parameters with exact halves too
    layer.load_state_dict({n: values(rng, a.shape, False) / 2
                           for n, a in layer.state_dict().items()})
    N, L, S = draw(st.integers(0, 3)), draw(st.integers(0, 4)), draw(st.integers(0, 4))
    unbatched = rng.random() < 0.2
    self_attn = rng.random() < 0.3 and kdim is None and vdim is None

    def shape(n, t, f):
        if unbatched:
            return (t, f)
        return (n, t, f) if layer.batch_first else (t, n, f)

    shapes = {"query": shape(N, L, E), "key": shape(N, S, layer.kdim),
              "value": shape(N, S, layer.vdim)}
    wrong = draw(st.sampled_from(["width", "S", "ndim", "N"])) if rng.random() < 0.12 else None
    victim = draw(st.sampled_from(["query", "key", "value"]))
    if wrong == "width":
        shapes[victim] = shapes[victim][:-1] + (shapes[victim][-1] + 1,)
    elif wrong == "S" and victim != "query":
        s = list(shapes[victim])
        s[-2 if unbatched or layer.batch_first else 0] += 1
        shapes[victim] = tuple(s)
    elif wrong == "ndim":
        shapes[victim] = shapes[victim][1:]
    elif wrong == "N" and not unbatched and victim != "query":
        s = list(shapes[victim])
        s[0 if layer.batch_first else 1] += 1
        shapes[victim] = tuple(s)
    special = rng.random() < 0.2
    args = {}
    for name, s in shapes.items():
        dt, layout = draw(array_kinds(rng, dtype, good=0.95))
        args[name] = make(values(rng, s, special and draw(st.booleans())), dt, layout, rng)
    if self_attn and not wrong:
        args["key"] = args["value"] = None
    masks = {}
    for name, choices in (("attn_mask", [(L, S), (N * H, L, S), (N, H, L, S)]),
                          ("key_padding_mask", [(S,) if unbatched else (N, S)])):
        kind = draw(st.sampled_from(["none", "bool", "float"])) if rng.random() < 0.95 \
            else "other"
        if kind == "none":
            masks[name] = None
            continue
        s = draw(st.sampled_from(choices))
        if rng.random() < 0.08:
            s = draw(st.sampled_from([(L, S + 1), (S + 1,), (N, 1, L, S), (H, L, S)]))
        if kind == "bool":
            masks[name] = make(rng.random(s) < 0.3, np.dtype(bool),
                               draw(st.sampled_from(LAYOUTS)), rng)
        elif kind == "float":
            m = np.where(rng.random(s) < 0.7, values(rng, s, False), -np.inf)
            mdt = dtype if rng.random() < 0.9 else draw(st.sampled_from([F32, F64]))
            masks[name] = make(m, mdt, draw(st.sampled_from(LAYOUTS)), rng)
        else:
            masks[name] = make(values(rng, s, False), draw(st.sampled_from(BAD_DTYPES)), "C", rng)
    kwargs = dict(masks, need_weights=draw(st.booleans()),
                  average_attn_weights=draw(st.booleans()), trace=draw(st.booleans()))
    return layer, args, kwargs, unbatched, draw(st.sampled_from(["auto", "reference"]))


def mha_expectations(layer, args, kwargs, unbatched):
    errors = []
    dt = layer.dtype
    q = args["query"]
    k = q if args["key"] is None else args["key"]
    v = k if args["value"] is None else args["value"]
    objs = {"query": q, "key": k, "value": v}
    for n, a in objs.items():
        if isinstance(a, np.ndarray):
            if a.dtype != dt:
                errors.append((TypeError, n))
            elif not a.flags.aligned:
                errors.append((ValueError, n))
    shapes = {n: np.shape(a) for n, a in objs.items()}
    want_nd = len(shapes["query"])
    bad_nd = [n for n, s in shapes.items() if len(s) != (2 if want_nd == 2 else 3)]
    errors += [(ValueError, n) for n in bad_nd]
    if bad_nd:
        return errors, None
    for n, width in (("query", layer.embed_dim), ("key", layer.kdim), ("value", layer.vdim)):
        if shapes[n][-1] != width:
            errors.append((ValueError, n))
    bf = lambda s: s if want_nd == 2 else (s if layer.batch_first else (s[1], s[0], s[2]))
    qs, ks, vs = (bf(s) for s in shapes.values())
    N, L = (1, qs[0]) if want_nd == 2 else qs[:2]
    S = ks[-2]
    if want_nd == 3 and (ks[0] != N or vs[0] != N) or vs[-2] != S:
        errors.append((ValueError, "key", "value"))
    for name, m in (("attn_mask", kwargs["attn_mask"]),
                    ("key_padding_mask", kwargs["key_padding_mask"])):
        if m is None:
            continue
        m = np.asarray(m)   # what the layer does with a list
        ok_shapes = ({(L, S), (N * layer.num_heads, L, S), (N, layer.num_heads, L, S)}
                     if name == "attn_mask" else {(S,) if want_nd == 2 else (N, S)})
        if m.shape not in ok_shapes:
            errors.append((ValueError, name))
        if m.dtype != np.bool_:
            if m.dtype != dt:
                errors.append((TypeError, name))
            elif not m.flags.aligned:
                errors.append((ValueError, name))
    return errors, (N, L, S)


@examples(500)
@given(mha_calls(), st.integers(0, 2**32 - 1))
def _prop_mha(call, seed):
    layer, args, kwargs, unbatched, kernel = call
    errors, _ = mha_expectations(layer, args, kwargs, unbatched)
    note(f"{layer!r}; errors expected: {errors}")
    inputs = [a for a in args.values() if a is not None] + \
        [kwargs["attn_mask"], kwargs["key_padding_mask"]]

    def call_():
        with attnpy.use_kernel(kernel):
            return layer(**args, **kwargs)

    res = outcome("MultiheadAttention", call_, errors, inputs)
    if res is None:
        return
    q = args["query"]
    k = q if args["key"] is None else args["key"]
    v = k if args["value"] is None else args["value"]
    x, y, z = (mha_to_batch_first(layer, a) for a in (q, k, v))
    ref = mha_reference(layer, x, y, z, kwargs["key_padding_mask"], kwargs["attn_mask"])
    dt = layer.dtype
    unfold = lambda a: mha_from_batch_first(layer, a, unbatched)  # noqa: E731
    finite = all(np.isfinite(np.asarray(a, dtype=np.float64)).all() for a in (x, y, z))
    if not finite:
        # NaN/inf inputs: projections mix them into whole rows; the output
        # must be non-finite exactly where the reference's is
        got = np.asarray(res.output)
        want = unfold(ref["output"])
        assert got.shape == want.shape
        assert (np.isfinite(got) == np.isfinite(want)).all()
        return
    close(res.output, unfold(ref["output"]), dt, "output")
    if kwargs["need_weights"]:
        w = ref["weights"][0] if unbatched else ref["weights"]
        if kwargs["average_attn_weights"]:
            w = w.mean(axis=-3)
        close(res.weights, w, dt, "weights")
    else:
        assert res.weights is None
    if kwargs["trace"]:
        t = res.trace
        pick = (lambda a: a[0]) if unbatched else (lambda a: a)
        for stage in ("q", "k", "v", "scores", "logits", "weights", "head_outputs", "concat"):
            close(getattr(t, stage), pick(ref[stage]), dt, f"trace {stage}")
            assert not getattr(t, stage).flags.writeable
        # and the backward pass from it
        rng = np.random.default_rng(seed)
        dout = values(rng, res.output.shape, False).astype(dt)
        before = snapshot(buffers(*inputs, dout))
        with attnpy.use_kernel(kernel):
            grads = layer.backward(res, dout)
        assert snapshot(buffers(*inputs, dout)) == before
        COUNTS["MultiheadAttention.backward"]["ok"] += 1
        gq, gk, gv, gp = mha_backward_reference(layer, ref, mha_to_batch_first(layer, dout))
        for got, want, name in ((grads.query, gq, "query"), (grads.key, gk, "key"),
                                (grads.value, gv, "value")):
            close(got, unfold(want), dt, f"gradient of {name}")
        for name, want in gp.items():
            close(grads.params[name], want, dt, f"gradient of {name}")


def test_multihead_attention_properties():
    COUNTS["MultiheadAttention.backward"] = Counter()
    run(_prop_mha, "MultiheadAttention", min_ok=30, min_errors=30)
    n = COUNTS["MultiheadAttention.backward"]["ok"]
    print(f"hypothesis MultiheadAttention.backward: {n} examples matched the reference")
    assert n >= 10 * min(SCALE, 1)


# ---------------------------------------------------------------------------
# self_attention and causal_mask


@st.composite
def self_attention_calls(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    batched = draw(st.booleans())
    N, L, d, dk, dv = (draw(st.integers(0, 4)) for _ in range(5))
    xs = ((N,) if batched else ()) + (L, d)
    dt, layout = draw(array_kinds(rng, good=0.85))
    x = make(values(rng, xs, rng.random() < 0.2), dt, layout, rng)
    xdt = np.dtype(x.dtype.type) if isinstance(x, np.ndarray) else F64
    ws = {}
    for name, width in (("w_q", dk), ("w_k", dk), ("w_v", dv)):
        wshape = (d, width)
        if rng.random() < 0.08:
            wshape = (d + 1, width)
        wdt, wl = draw(array_kinds(rng, good=0.95))
        wdt = xdt if wdt in (F32, F64) and xdt in (F32, F64) and \
            rng.random() < 0.9 else wdt
        ws[name] = make(values(rng, wshape, False) / 2, wdt, wl, rng)
    mask = None
    kind = draw(st.sampled_from(["none", "none", "bool", "float", "bad"]))
    if kind != "none":
        ms = draw(st.sampled_from([(L, L), (N, L, L) if batched else (L, L), (1, L), (L, L + 1)]))
        m = rng.random(ms) < 0.7
        mask = m if kind == "bool" else (np.where(m, 0.0, -np.inf).astype(xdt if xdt in (
            F32, F64) else F64) if kind == "float" else m.astype(np.int32))
    return x, ws, mask, rng.random() < 0.2, draw(st.sampled_from(SCALES[:12])), \
        draw(st.booleans())


@examples(500)
@given(self_attention_calls())
def _prop_self_attention(call):
    x, ws, mask, is_causal, scale, trace = call
    errors = []
    p = problem(x, "x") if isinstance(x, np.ndarray) else None
    xdt = np.dtype(x.dtype.type) if isinstance(x, np.ndarray) else F64
    if p:
        errors.append(p)
    if not isinstance(x, np.ndarray) or x.dtype in (F32, F64):
        for name, w in ws.items():
            if isinstance(w, np.ndarray) and w.dtype != xdt:
                errors.append((TypeError, name))
            elif isinstance(w, np.ndarray) and not w.flags.aligned:
                errors.append((ValueError, name))
            if np.ndim(w) != 2 or np.ndim(x) and np.shape(w)[0] != np.shape(x)[-1]:
                errors.append((ValueError, name))
        if np.ndim(ws["w_k"]) == np.ndim(ws["w_q"]) == 2 and \
                np.shape(ws["w_k"])[1] != np.shape(ws["w_q"])[1]:
            errors.append((ValueError, "w_q"))
    if np.ndim(x) not in (2, 3):
        errors.append((ValueError, "x"))
    if is_causal and mask is not None:
        errors.append((ValueError, "attn_mask"))
    if isinstance(scale, (str, complex)):
        errors.append((TypeError, "scale"))
    xs = np.shape(x)
    N, L = (xs[0], xs[1]) if len(xs) == 3 else (1, xs[0])
    if mask is not None:
        if mask.dtype.kind in "iu" or (mask.dtype != np.bool_ and mask.dtype != xdt):
            errors.append((TypeError, "attn_mask"))
        ms = mask.shape if mask.ndim < 3 else (mask.shape[0], 1) + mask.shape[1:]
        if len(ms) > 4 or any(a != 1 and a != b for a, b in zip(ms[::-1], (N, 1, L, L)[::-1])):
            errors.append((ValueError, "attn_mask"))
    inputs = [x, mask] + list(ws.values())
    res = outcome("self_attention", lambda: attnpy.self_attention(
        x, ws["w_q"], ws["w_k"], ws["w_v"], attn_mask=mask, is_causal=is_causal, scale=scale,
        trace=trace), errors, inputs)
    if res is None:
        return
    X = np.array(x, dtype=np.float64)
    sc = None if scale is None else float(scale)
    out, w = self_attention_reference(X, ws["w_q"], ws["w_k"], ws["w_v"], mask, is_causal, sc)
    if not np.isfinite(X).all():
        assert res.output.shape == out.shape
        assert (np.isfinite(res.output) == np.isfinite(out)).all()
        return
    close(res.output, out, xdt, "output")
    close(res.weights, w, xdt, "weights")
    assert (res.trace is not None) == trace


def test_self_attention_properties():
    run(_prop_self_attention, "self_attention", min_ok=30, min_errors=30)


@st.composite
def causal_mask_calls(draw):
    """Mostly valid arguments; each is a wrong one now and then."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    bad = lambda: rng.random() < 0.12
    L = draw(st.sampled_from([-1, 2.0, "4", None, True]) if bad() else
             st.one_of(st.integers(0, 40), st.sampled_from([np.int64(5), np.uint8(3)])))
    S = draw(st.sampled_from([-3, 1.5, "2", False]) if bad() else
             st.one_of(st.none(), st.integers(0, 40), st.just(np.uint8(3))))
    align = draw(st.sampled_from(["middle", None, 0]) if bad() else
                 st.sampled_from(["top_left", "bottom_right"]))
    dtype = draw(st.sampled_from([np.float16, int, "bool", "nonsense", None]) if bad() else
                 st.sampled_from([np.float32, np.float64, "float32", "f8", np.dtype("<f4")]))
    return L, S, align, dtype


@examples(400)
@given(causal_mask_calls())
def _prop_causal_mask(call):
    L, S, align, dtype = call
    errors = []
    for name, n in (("L", L), ("S", S)):
        if name == "S" and n is None:
            continue
        if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
            errors.append((TypeError, name))
        elif n < 0:
            errors.append((ValueError, name))
    if align not in ("top_left", "bottom_right"):
        errors.append((ValueError, "align"))
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or dt not in (F32, F64):
        errors.append((TypeError, "dtype"))
    res = outcome("causal_mask", lambda: attnpy.causal_mask(L, S, align=align, dtype=dtype),
                  errors, [])
    if res is None:
        return
    L, Sv = int(L), int(L if S is None else S)
    off = 0 if align == "top_left" else Sv - L
    want = np.array([[0.0 if j <= i + off else -np.inf for j in range(Sv)] for i in range(L)])
    assert res.dtype == dt and res.shape == (L, Sv)
    np.testing.assert_array_equal(res, want.reshape(L, Sv))


def test_causal_mask_properties():
    run(_prop_causal_mask, "causal_mask", min_ok=20, min_errors=20)


@pytest.mark.parametrize("L,S", [(0, 0), (0, 3), (3, 0), (1, 1)])
def test_causal_mask_zero_lengths(L, S):
    """Zero lengths give empty masks, and they work as SDPA's masks."""
    for align in ("top_left", "bottom_right"):
        m = attnpy.causal_mask(L, S, align=align, dtype=np.float64)
        assert m.shape == (L, S)
        out, w = attnpy.scaled_dot_product_attention(np.ones((L, 2)), np.ones((S, 2)),
                                                     np.ones((S, 3)), attn_mask=m)
        assert out.shape == (L, 3) and w.shape == (L, S)
        _, want = sdpa_reference(np.ones((L, 2)), np.ones((S, 2)), np.ones((S, 3)), m)
        np.testing.assert_array_equal(w, want)
    assert additive_mask(None, True, L, S).shape == (L, S)

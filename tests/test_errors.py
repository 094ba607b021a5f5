"""Bad arguments: the right exception, a message naming the argument, no crash.

Every case in BATTERY is one call that must raise. Each is a pytest case, and
the whole battery also runs once in a fresh interpreter (a crash there shows
up as a non-zero return code instead of taking pytest down). Every case also
checks that the inputs it passed are bit-identical afterwards.

Then the regressions about errors: messages that named the wrong argument or
none, and numbers out of range that raised OverflowError or a
self-contradicting TypeError instead of a ValueError.
"""
import os
import subprocess
import sys
import zlib
from dataclasses import dataclass
from typing import Callable, Tuple

import numpy as np
import pytest

import attnpy
from reference import sdpa_reference

sdpa = attnpy.scaled_dot_product_attention
HERE = os.path.dirname(os.path.abspath(__file__))


def rng_for(name):
    return np.random.default_rng(zlib.crc32(name.encode()))


def arr(name, shape, dtype=np.float32):
    return rng_for(f"{name}{shape}").standard_normal(shape).astype(dtype)


def qkv(dtype=np.float32, q=(2, 3, 4, 8), k=(2, 3, 5, 8), v=(2, 3, 5, 6)):
    """Valid query, key, value: output (2, 3, 4, 6), weights (2, 3, 4, 5)."""
    return arr("q", q, dtype), arr("k", k, dtype), arr("v", v, dtype)


# --------------------------------------------------------------------------
# the battery


@dataclass(frozen=True)
class Bad:
    id: str
    build: Callable[[], Tuple[Callable, tuple, dict]]  # -> (function, args, kwargs)
    exc: object  # an exception type or a tuple of them
    names: Tuple[str, ...]  # substrings the message must contain


def bad_sdpa(id, exc, names, **overrides):
    """A case calling sdpa on valid float32 inputs with some arguments replaced."""
    def build():
        q, k, v = qkv()
        args = dict(query=q, key=k, value=v)
        args.update({name: f() if callable(f) else f for name, f in overrides.items()})
        q, k, v = args.pop("query"), args.pop("key"), args.pop("value")
        return sdpa, (q, k, v), args
    return Bad(id, build, exc, names)


def lazy(f, *a, **kw):
    return lambda: f(*a, **kw)


def out_view(kind):
    """A would-be out array for the (2, 3, 4, 6) float32 output."""
    if kind == "fortran":
        return np.zeros((2, 3, 4, 6), np.float32, order="F")
    if kind == "stepped":
        return np.zeros((2, 3, 4, 12), np.float32)[..., ::2]
    if kind == "reversed":
        return np.zeros((2, 3, 4, 6), np.float32)[::-1]
    if kind == "readonly":
        o = np.zeros((2, 3, 4, 6), np.float32)
        o.flags.writeable = False
        return o
    raise ValueError(kind)


def unaligned(a):
    """A copy of a whose data pointer is off by one byte from its dtype's alignment."""
    buf = np.zeros(a.nbytes + 1, dtype=np.uint8)
    u = buf[1:].view(a.dtype).reshape(a.shape)
    u[...] = a
    assert not u.flags.aligned
    return u


def build_out_aliases_query():
    q = arr("q", (2, 3, 4, 8))
    k, v = arr("k", (2, 3, 5, 8)), arr("v", (2, 3, 5, 8))
    return sdpa, (q, k, v), dict(out=q)  # would overwrite the query


OUT_ERR = (ValueError, TypeError)

BATTERY = [
    # shapes
    bad_sdpa("query_1d", ValueError, ("query",), query=lazy(arr, "q", (8,))),
    bad_sdpa("query_0d", ValueError, ("query",), query=lambda: np.float32(1.0)),
    bad_sdpa("key_1d", ValueError, ("key",), key=lazy(arr, "k", (8,))),
    bad_sdpa("value_1d", ValueError, ("value",), value=lazy(arr, "v", (6,))),
    bad_sdpa("E_mismatch", ValueError, ("key",), key=lazy(arr, "k", (2, 3, 5, 7))),
    bad_sdpa("S_mismatch", ValueError, ("value",), value=lazy(arr, "v", (2, 3, 6, 6))),
    bad_sdpa("batch_not_broadcast_key", ValueError, ("query", "key"),
             key=lazy(arr, "k", (4, 3, 5, 8))),
    bad_sdpa("batch_not_broadcast_value", ValueError, ("value",),
             value=lazy(arr, "v", (5, 3, 5, 6))),
    bad_sdpa("heads_differ_without_gqa", ValueError, ("key",),
             key=lazy(arr, "k", (2, 2, 5, 8))),
    # dtypes
    bad_sdpa("query_int64_ndarray", TypeError, ("query", "float32", "float64"),
             query=lambda: np.arange(64, dtype=np.int64).reshape(2, 1, 4, 8)),
    bad_sdpa("key_int64_ndarray", TypeError, ("key", "float32", "float64"),
             key=lambda: np.ones((2, 3, 5, 8), dtype=np.int64)),
    bad_sdpa("query_bool_ndarray", TypeError, ("query",),
             query=lambda: np.ones((2, 3, 4, 8), dtype=bool)),
    bad_sdpa("value_float16", TypeError, ("value",), value=lazy(arr, "v", (2, 3, 5, 6), np.float16)),
    bad_sdpa("mix_query_float64", TypeError, ("query",),
             query=lazy(arr, "q", (2, 3, 4, 8), np.float64)),
    bad_sdpa("mix_key_float64", TypeError, ("key",), key=lazy(arr, "k", (2, 3, 5, 8), np.float64)),
    bad_sdpa("mix_value_float64", TypeError, ("value",),
             value=lazy(arr, "v", (2, 3, 5, 6), np.float64)),
    # an ndarray is read in place, never copied: a layout that cannot be read as is
    bad_sdpa("key_big_endian", (TypeError, ValueError), ("key",),
             key=lambda: arr("k", (2, 3, 5, 8)).astype(">f4")),
    bad_sdpa("query_unaligned", (TypeError, ValueError), ("query",),
             query=lambda: unaligned(arr("q", (2, 3, 4, 8)))),
    bad_sdpa("query_complex", TypeError, ("query",),
             query=lambda: arr("q", (2, 3, 4, 8)).astype(np.complex64)),
    bad_sdpa("query_complex_list", TypeError, ("query",),
             query=lambda: [[1 + 1j, 2.0], [0.5j, 1.0]]),
    # attn_mask
    bad_sdpa("mask_int32", TypeError, ("attn_mask",),
             attn_mask=lambda: np.ones((4, 5), dtype=np.int32)),
    bad_sdpa("mask_float64_for_float32", TypeError, ("attn_mask",),
             attn_mask=lambda: np.zeros((4, 5), dtype=np.float64)),
    Bad("mask_float32_for_float64",
        lambda: (sdpa, qkv(np.float64), dict(attn_mask=np.zeros((4, 5), np.float32))),
        TypeError, ("attn_mask",)),
    bad_sdpa("mask_shape_S_plus_1", ValueError, ("attn_mask",),
             attn_mask=lambda: np.ones((4, 6), dtype=bool)),
    bad_sdpa("mask_shape_L_plus_1", ValueError, ("attn_mask",),
             attn_mask=lambda: np.zeros((5, 5), dtype=np.float32)),
    bad_sdpa("mask_shape_heads", ValueError, ("attn_mask",),
             attn_mask=lambda: np.ones((4, 4, 5), dtype=bool)),
    bad_sdpa("mask_shape_1d_wrong", ValueError, ("attn_mask",),
             attn_mask=lambda: np.ones((4,), dtype=bool)),
    bad_sdpa("mask_too_many_dims", ValueError, ("attn_mask",),
             attn_mask=lambda: np.ones((7, 2, 3, 4, 5), dtype=bool)),
    bad_sdpa("mask_and_is_causal", ValueError, ("attn_mask", "is_causal"),
             attn_mask=lambda: np.ones((4, 5), dtype=bool), is_causal=True),
    # enable_gqa
    bad_sdpa("gqa_6_vs_4", ValueError, ("enable_gqa",), query=lazy(arr, "q", (2, 6, 4, 8)),
             key=lazy(arr, "k", (2, 4, 5, 8)), value=lazy(arr, "v", (2, 4, 5, 6)),
             enable_gqa=True),
    bad_sdpa("gqa_key_value_heads_differ", ValueError, ("value",),
             query=lazy(arr, "q", (2, 4, 4, 8)), key=lazy(arr, "k", (2, 2, 5, 8)),
             value=lazy(arr, "v", (2, 4, 5, 6)), enable_gqa=True),
    # scalars
    bad_sdpa("dropout_1.5", ValueError, ("dropout_p", "[0, 1]"), dropout_p=1.5),
    bad_sdpa("dropout_neg", ValueError, ("dropout_p", "[0, 1]"), dropout_p=-0.1),
    bad_sdpa("dropout_str", TypeError, ("dropout_p",), dropout_p="x"),
    bad_sdpa("scale_str", TypeError, ("scale",), scale="x"),
    bad_sdpa("scale_list", TypeError, ("scale",), scale=lambda: [0.5]),
    # out=
    bad_sdpa("out_wrong_shape", OUT_ERR, ("out",), out=lambda: np.zeros((2, 3, 4, 5), np.float32)),
    bad_sdpa("out_missing_dim", OUT_ERR, ("out",), out=lambda: np.zeros((3, 4, 6), np.float32)),
    bad_sdpa("out_wrong_dtype", OUT_ERR, ("out",), out=lambda: np.zeros((2, 3, 4, 6), np.float64)),
    bad_sdpa("out_fortran", OUT_ERR, ("out",), out=lazy(out_view, "fortran")),
    bad_sdpa("out_stepped", OUT_ERR, ("out",), out=lazy(out_view, "stepped")),
    bad_sdpa("out_reversed", OUT_ERR, ("out",), out=lazy(out_view, "reversed")),
    bad_sdpa("out_readonly", OUT_ERR, ("out",), out=lazy(out_view, "readonly")),
    bad_sdpa("out_list", OUT_ERR, ("out",), out=lambda: np.zeros((2, 3, 4, 6)).tolist()),
    Bad("out_aliases_query", build_out_aliases_query, OUT_ERR, ("out",)),
    # causal_mask
    Bad("causal_mask_bad_align", lambda: (attnpy.causal_mask, (4, 6), dict(align="diagonal")),
        ValueError, ("align",)),
    Bad("causal_mask_bad_align_case", lambda: (attnpy.causal_mask, (4,), dict(align="TOP_LEFT")),
        ValueError, ("align",)),
    Bad("causal_mask_negative_L", lambda: (attnpy.causal_mask, (-1, 4), {}), ValueError, ("L",)),
    Bad("causal_mask_int_dtype", lambda: (attnpy.causal_mask, (3,), dict(dtype=np.int32)),
        (TypeError, ValueError), ("dtype",)),
]


# --------------------------------------------------------------------------
# running one case


def _arrays_in(args, kwargs):
    return [a for a in list(args) + list(kwargs.values()) if isinstance(a, np.ndarray)]


def _root(a):
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def check_bad(case):
    """Run one case; return None if it behaved, else a description of what went wrong."""
    fn, args, kwargs = case.build()
    arrays = _arrays_in(args, kwargs)
    before = [_root(a).tobytes() for a in arrays]
    try:
        result = fn(*args, **kwargs)
    except case.exc as e:
        msg = str(e)
        missing = [n for n in case.names if n not in msg]
        if missing:
            return f"{case.id}: message {msg!r} does not mention {missing}"
    except Exception as e:  # the wrong type
        return f"{case.id}: expected {case.exc}, got {type(e).__name__}: {e}"
    else:
        return f"{case.id}: expected {case.exc}, no exception (returned {type(result).__name__})"
    for a, b in zip(arrays, before):
        if _root(a).tobytes() != b:
            return f"{case.id}: an input was modified on the error path"
    return None


def run_battery():
    """Run every case; exit 1 listing the failures (used by the subprocess test)."""
    failures = [f for f in map(check_bad, BATTERY) if f is not None]
    for f in failures:
        print(f)
    print(f"battery: {len(BATTERY) - len(failures)} ok, {len(failures)} failed")
    sys.exit(1 if failures else 0)


@pytest.mark.parametrize("case", BATTERY, ids=[c.id for c in BATTERY])
def test_bad_argument(case):
    problem = check_bad(case)
    assert problem is None, problem


def test_battery_in_subprocess_does_not_crash():
    proc = subprocess.run(
        [sys.executable, "-c", "import test_errors as t; t.run_battery()"],
        cwd=HERE, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.returncode, proc.stdout[-3000:], proc.stderr[-3000:])
    assert f"battery: {len(BATTERY)} ok, 0 failed" in proc.stdout


def test_battery_case_ids_are_unique():
    ids = [c.id for c in BATTERY]
    assert len(ids) == len(set(ids))


# --------------------------------------------------------------------------
# what is accepted


def test_valid_baseline_for_the_battery():
    """The battery's inputs are valid as given: each case breaks only its own argument."""
    q, k, v = qkv()
    res = sdpa(q, k, v, attn_mask=np.ones((4, 5), dtype=bool), dropout_p=0.0, scale=0.5,
               out=np.zeros((2, 3, 4, 6), np.float32))
    assert res.output.shape == (2, 3, 4, 6) and res.weights.shape == (2, 3, 4, 5)
    res = sdpa(*qkv(np.float64), attn_mask=np.zeros((4, 5), np.float64))
    assert res.output.dtype == np.float64
    res = sdpa(arr("q", (2, 4, 4, 8)), arr("k", (2, 2, 5, 8)), arr("v", (2, 2, 5, 6)),
               enable_gqa=True)
    assert res.output.shape == (2, 4, 4, 6)
    assert attnpy.causal_mask(4, 6, align="bottom_right").shape == (4, 6)


def _lists(shape_q=(2, 3, 4), shape_k=(2, 5, 4), shape_v=(2, 5, 3)):
    rng = rng_for("lists")
    return [rng.standard_normal(s).tolist() for s in (shape_q, shape_k, shape_v)]


@pytest.mark.parametrize("shapes", [((2, 3, 4), (2, 5, 4), (2, 5, 3)), ((3, 4), (5, 4), (5, 2))],
                         ids=["3d", "2d"])
def test_lists_as_inputs_match_arrays(shapes):
    ql, kl, vl = _lists(*shapes)
    res = sdpa(ql, kl, vl)
    expected = sdpa(np.array(ql), np.array(kl), np.array(vl))
    assert res.output.dtype == expected.output.dtype == np.float64
    np.testing.assert_array_equal(res.output, expected.output)
    np.testing.assert_array_equal(res.weights, expected.weights)
    ref_out, ref_w = sdpa_reference(ql, kl, vl)
    np.testing.assert_allclose(res.output, ref_out, atol=1e-12, rtol=1e-12)
    np.testing.assert_allclose(res.weights, ref_w, atol=1e-12, rtol=1e-12)


def test_list_masks_match_array_masks():
    ql, kl, vl = _lists()
    q, k, v = np.array(ql), np.array(kl), np.array(vl)
    bool_mask = rng_for("list-mask").random((3, 5)) < 0.7
    float_mask = rng_for("list-fmask").standard_normal((3, 5))
    for m in (bool_mask, float_mask):
        res = sdpa(q, k, v, attn_mask=m.tolist())
        expected = sdpa(q, k, v, attn_mask=m)
        np.testing.assert_array_equal(res.output, expected.output)
        np.testing.assert_array_equal(res.weights, expected.weights)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_inputs_bit_identical_after_successful_calls(dtype):
    q, k, v = qkv(dtype)
    mask = np.where(rng_for("m").random((4, 5)) < 0.7, 0, -np.inf).astype(dtype)
    mask[1] = -np.inf  # a fully masked row
    arrays = [q, k, v, mask]
    copies = [a.copy() for a in arrays]
    for kwargs in (dict(attn_mask=mask), dict(attn_mask=mask, need_weights=False),
                   dict(is_causal=True), dict(out=np.empty((2, 3, 4, 6), dtype))):
        sdpa(q, k, v, **kwargs)
        for a, c in zip(arrays, copies):
            assert np.array_equal(a, c) and a.tobytes() == c.tobytes()


class _RaisesOnConversion:
    """An array-like whose conversion fails with a given exception."""

    def __init__(self, exc):
        self.exc = exc

    def __array__(self, dtype=None, copy=None):
        raise self.exc


@pytest.mark.parametrize("exc", [MemoryError, KeyboardInterrupt])
def test_conversion_errors_other_than_bad_input_pass_through(exc):
    """A MemoryError (or Ctrl-C) while converting an array-like used to come
    out as "TypeError: query must be an array ...": only a failed conversion
    is the caller's bad input."""
    x = np.ones((3, 4))
    with pytest.raises(exc):
        sdpa(_RaisesOnConversion(exc()), x, x)
    with pytest.raises(exc):
        sdpa(x, x, x, attn_mask=_RaisesOnConversion(exc()))
    with pytest.raises(TypeError, match="query"):
        sdpa(_RaisesOnConversion(ValueError("no")), x, x)


# --------------------------------------------------------------------------
# arguments named in the message


# Regression: a query of the wrong width blamed q_proj_weight, the layer's own parameter
@pytest.mark.parametrize("name,shapes", [
    ("query", [(2, 3, 5)]),
    ("key", [(2, 3, 8), (2, 4, 5), (2, 4, 8)]),
    ("value", [(2, 3, 8), (2, 4, 8), (2, 4, 6)]),
])
def test_multihead_blames_the_input_of_the_wrong_width(name, shapes):
    """A query of the wrong width was reported as "q_proj_weight must have
    shape (8, 5); got (8, 8)": the layer's own parameter, not the argument."""
    layer = attnpy.MultiheadAttention(8, 2, dtype=np.float64)
    with pytest.raises(ValueError, match=rf"^{name} must have 8 features .* got shape"):
        layer(*(np.ones(s) for s in shapes))


def _unaligned(shape, dtype=np.float64):
    dt = np.dtype(dtype)
    raw = bytearray(int(np.prod(shape)) * dt.itemsize + 1)
    a = np.frombuffer(raw, dtype=dt, count=int(np.prod(shape)), offset=1).reshape(shape)
    a[...] = 1
    return a


# Regression: self_attention's errors named the core's arguments (query, q_proj_weight)
def test_self_attention_names_its_own_arguments():
    """self_attention hands x to the core as query, key and value and w_q.T as
    q_proj_weight: an unaligned x was "query is not aligned", an unaligned w_q
    "q_proj_weight is not aligned", and an int x made the weights the culprit
    ("w_q has dtype float64 but the layer computes in int64; pass
    w_q.astype(np.int64)")."""
    x, w = np.ones((3, 4)), np.ones((4, 2))
    with pytest.raises(ValueError, match="^x is not aligned"):
        attnpy.self_attention(_unaligned((3, 4)), w, w, w)
    for i, name in enumerate(("w_q", "w_k", "w_v")):
        ws = [w, w, w]
        ws[i] = _unaligned((4, 2))
        with pytest.raises(ValueError, match=f"^{name} is not aligned"):
            attnpy.self_attention(x, *ws)
    for dt in (np.int64, np.float16, np.dtype(">f8"), object):
        with pytest.raises(TypeError, match="^x must be float32 or float64"):
            attnpy.self_attention(x.astype(dt), w, w, w)


# Regression: np.dtype's 'data type not understood' named no argument
def test_a_dtype_numpy_does_not_know_is_named():
    """np.dtype's own "data type 'nonsense' not understood" named no argument."""
    with pytest.raises(TypeError, match="^dtype must be float32 or float64; got 'nonsense'"):
        attnpy.causal_mask(3, dtype="nonsense")
    with pytest.raises(TypeError, match="^dtype must be float32 or float64; got 'nonsense'"):
        attnpy.MultiheadAttention(4, 2, dtype="nonsense")


# Regression: range errors did not show the value given (code review)
def test_messages_show_the_value_given():
    q = np.zeros((2, 3))
    with pytest.raises(ValueError, match=r"got 1\.5"):
        attnpy.scaled_dot_product_attention(q, q, q, dropout_p=1.5)
    layer = attnpy.MultiheadAttention(4, 1)
    layer.dropout = 2.0   # as if set by hand: the core still checks it
    with pytest.raises(ValueError, match=r"got 2\b"):
        layer.train()(np.zeros((1, 2, 4), np.float32))


# Regression: a mask given as a list of ints was accepted, its polarity ambiguous (code review)
def test_an_int_list_mask_is_refused_as_ambiguous():
    q = np.zeros((2, 3))
    with pytest.raises(TypeError, match="attn_mask.*ambiguous"):
        attnpy.scaled_dot_product_attention(q, q, q, attn_mask=[[1, 0], [0, 1]])
    ok = attnpy.scaled_dot_product_attention(q, q, q, attn_mask=[[True, False], [True, True]])
    assert ok.weights[0, 1] == 0.0


# --------------------------------------------------------------------------
# numbers out of range: ValueError, not OverflowError or a self-contradicting TypeError


# Regression: set_num_threads accepted counts that do not fit (2**32 + 1 wrapped) (code review)
def test_set_num_threads_rejects_values_that_do_not_fit():
    for n in (2**32 + 1, 2**32, 257):
        with pytest.raises(ValueError):
            attnpy.set_num_threads(n)
    assert attnpy.get_num_threads() >= 1


# Regression: MultiheadAttention(dropout=10**400) raised OverflowError (fuzzer)
@pytest.mark.parametrize("p", [10**400, -(10**400), 2**64, 10**5000],
                         ids=["1e400", "-1e400", "2**64", "1e5000"])
def test_mha_huge_int_dropout_is_a_value_error(p):
    with pytest.raises(ValueError, match=r"^dropout must be in \[0, 1\]") as info:
        attnpy.MultiheadAttention(4, 2, dropout=p)
    assert len(str(info.value)) < 200


# Regression: the exact int range check of dropout must still accept ints in range (fuzzer)
def test_mha_int_dropout_in_range_still_accepted():
    assert attnpy.MultiheadAttention(4, 2, dropout=1).dropout == 1.0
    assert attnpy.MultiheadAttention(4, 2, dropout=np.int64(0)).dropout == 0.0


def _x():
    return np.ones((2, 2))


# Regression: scale=10**400 raised 'scale must be a float or None; got int' (fuzzer)
@pytest.mark.parametrize("call", [
    lambda: attnpy.scaled_dot_product_attention(_x(), _x(), _x(), scale=10**400),
    lambda: attnpy.scaled_dot_product_attention_backward(_x(), _x(), _x(), _x(),
                                                         scale=-(10**400)),
    lambda: attnpy.self_attention(_x(), _x(), _x(), _x(), scale=10**400),
], ids=["sdpa", "sdpa_backward", "self_attention"])
def test_scale_out_of_float_range_is_a_value_error_naming_scale(call):
    with pytest.raises(ValueError, match=r"^scale is out of the float range"):
        call()


# Regression: dropout_p=10**400 raised a self-contradicting TypeError (fuzzer)
def test_dropout_p_out_of_float_range_is_a_value_error():
    with pytest.raises(ValueError, match=r"^dropout_p is out of the float range"):
        attnpy.scaled_dot_product_attention(_x(), _x(), _x(), dropout_p=10**400)


# Regression: set_num_threads(2**70) raised 'n must be an int; got int' (fuzzer)
@pytest.mark.parametrize("n", [2**70, -(2**70)], ids=["2**70", "-2**70"])
def test_set_num_threads_huge_int_is_a_value_error(n):
    before = attnpy.get_num_threads()
    with pytest.raises(ValueError, match=r"^n must be between 1 and 256"):
        attnpy.set_num_threads(n)
    assert attnpy.get_num_threads() == before


# Regression: the range fix must leave non-numbers TypeErrors (fuzzer)
def test_non_numbers_still_type_errors():
    with pytest.raises(TypeError, match=r"^scale must be a float or None; got str"):
        attnpy.scaled_dot_product_attention(_x(), _x(), _x(), scale="2")
    with pytest.raises(TypeError, match=r"^n must be an int; got float"):
        attnpy.set_num_threads(1.5)


# --------------------------------------------------------------------------
# array-likes that do not convert name the argument


# Regression: an int16 x made self_attention convert w_v to int16: OverflowError (fuzzer)
def test_self_attention_int_x_is_refused_before_converting_weights():
    x = np.ones((1, 1), np.int16)
    w = np.ones((1, 1), np.int16)
    with pytest.raises(TypeError, match=r"^x must be float32 or float64 .*got int16"):
        attnpy.self_attention(x, w, w, [[3e38]])


# Regression: query=[[10**400, 0.0]] raised OverflowError, naming no argument (fuzzer)
@pytest.mark.parametrize("bad", [[[10**400, 0.0]], [[1.0, "a"]], [[1.0], [1.0, 2.0]]],
                         ids=["huge-int", "str", "ragged"])
def test_mha_array_like_that_does_not_convert_names_the_argument(bad):
    layer = attnpy.MultiheadAttention(2, 1)
    with pytest.raises((TypeError, ValueError), match=r"^query "):
        layer(bad)


# Regression: x=[[10**400, 1.0]] raised OverflowError, naming no argument (fuzzer)
def test_self_attention_list_x_out_of_range_names_x():
    w = np.ones((2, 2))
    with pytest.raises((TypeError, ValueError), match=r"^x "):
        attnpy.self_attention([[10**400, 1.0]], w, w, w)


# Importing from a source tree that was never built said "cannot import name
# '_core' from partially initialized module 'attnpy' (most likely due to a
# circular import)" (issue 12, item 8).
def test_import_without_a_build_says_what_to_do(tmp_path):
    import shutil
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "attnpy")
    shutil.copytree(src, tmp_path / "attnpy",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    # -S: no site-packages, so that an editable install's import hook (CI's
    # .venv) cannot find the built extension instead of this copy
    r = subprocess.run([sys.executable, "-S", "-c", "import attnpy"], cwd=tmp_path,
                       capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: attnpy's C extension (attnpy._core) is not built")
    assert "pip install ." in last and "bash dev.sh demo" in last
    assert "circular import" not in last


# Issue 12, item 7: messages that misled. An int array was told "or build the
# layer with dtype=int64" (which fails); a torch tensor that requires grad
# raised torch's RuntimeError; a float32 tensor was accepted by a float64
# layer that refuses a float32 ndarray; out of memory for the weights did not
# say need_weights=False.
def test_mha_int_input_suggests_only_a_float_dtype():
    layer = attnpy.MultiheadAttention(8, 2)
    with pytest.raises(TypeError) as e:
        layer(np.ones((2, 3, 8), dtype=np.int64))
    assert "query.astype(np.float32)" in str(e.value) and "dtype=int64" not in str(e.value)


@pytest.mark.torch
def test_torch_tensors_follow_the_ndarray_rules():
    torch = pytest.importorskip("torch")
    layer64 = attnpy.MultiheadAttention(8, 2, dtype=np.float64)
    with pytest.raises(TypeError, match="query has dtype float32 but the layer computes in "
                                        "float64"):
        layer64(torch.ones(2, 3, 8))
    assert layer64(torch.ones(2, 3, 8, dtype=torch.float64)).output.dtype == np.float64
    # a tensor is told how tensors change dtype (a tensor has no .astype)
    with pytest.raises(TypeError, match=r"pass query\.to\(torch\.float64\)") as e:
        layer64(torch.ones(2, 3, 8))
    assert ".astype" not in str(e.value)
    t = torch.ones(3, 4, requires_grad=True)
    with pytest.raises(TypeError, match=r"query is a tensor that requires grad.*query\.detach\(\)"):
        attnpy.MultiheadAttention(4, 2)(t[None])
    with pytest.raises(TypeError, match=r"query is a tensor that requires grad.*query\.detach\(\)"):
        attnpy.scaled_dot_product_attention(t, np.ones((3, 4)), np.ones((3, 4)))


def test_weights_out_of_memory_says_need_weights_false():
    q = np.ones((1, 200000, 4), np.float32)
    big = np.broadcast_to(q, (4000, 200000, 4))      # weights: 582 TiB
    with pytest.raises(MemoryError, match="pass need_weights=False"):
        attnpy.scaled_dot_product_attention(big, q, q)

"""Bugs found while hardening (issue 7), each with the test that showed it."""
import numpy as np
import pytest

import attnpy


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


def test_a_dtype_numpy_does_not_know_is_named():
    """np.dtype's own "data type 'nonsense' not understood" named no argument."""
    with pytest.raises(TypeError, match="^dtype must be float32 or float64; got 'nonsense'"):
        attnpy.causal_mask(3, dtype="nonsense")
    with pytest.raises(TypeError, match="^dtype must be float32 or float64; got 'nonsense'"):
        attnpy.MultiheadAttention(4, 2, dtype="nonsense")

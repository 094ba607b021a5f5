"""Sizes that cannot exist or cannot fit: ValueError or MemoryError before any allocation.

Broadcast views (stride 0) make huge shapes cheap: a (2**40, 1, 1, E) query
against a (1, 2**40, 1, E) key asks for an output of 2**80 rows. Each input
fits NumPy's 64-bit sizes; the output cannot. That used to surface as
NumPy's "array is too big; `arr.size * arr.dtype.itemsize` is larger than
the maximum possible size", which names no argument. Shapes that are
possible but larger than memory give MemoryError (NumPy's, with the size).

The MemoryError cases run in a subprocess: under AddressSanitizer (the test
command's second pass) a malloc of petabytes aborts the process unless
ASAN_OPTIONS has allocator_may_return_null=1, which the subprocess sets; in
a normal build the option means nothing.
"""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import attnpy

sdpa, sdpa_bwd = attnpy.scaled_dot_product_attention, attnpy.scaled_dot_product_attention_backward


def huge(shape, tail=(1, 4)):
    """A read-only view of zeros of shape + tail holding one element (all strides 0)."""
    shape = tuple(shape) + tuple(tail)
    return np.broadcast_to(np.zeros((1,) * len(shape)), shape)


@pytest.mark.parametrize("need_weights", [True, False])
def test_output_whose_size_overflows_64_bits_is_a_named_value_error(need_weights):
    for n in (2**40, 2**31):   # 2**80 rows; 2**62 rows x 4 x 8 bytes overflows too
        q, k = huge((n, 1)), huge((1, n))
        named = (r"(output .* of query, key and value|weights .* of query and key .*) would "
                 rf"have shape \({n}, {n}, 1, [14]\): more bytes than any memory holds")
        with pytest.raises(ValueError, match=named):
            sdpa(q, k, k, need_weights=need_weights)


def test_weights_whose_size_overflows_are_named_and_avoidable():
    # output (2**20, 2**20, 1, 1) fits 64 bits (8 TiB); weights (2**20, 2**20, 1, 2**31-1)
    # do not: checked before anything is allocated (without weights: a MemoryError, below)
    q = huge((2**20, 1), (1, 1))
    k = v = huge((1, 2**20), (2**31 - 1, 1))
    with pytest.raises(ValueError, match=r"weights .* of query and key .*need_weights=False"):
        sdpa(q, k, v)


def test_dimension_caps():
    with pytest.raises(ValueError, match=r"L \(query rows\) is 2147483648"):
        sdpa(huge((), (2**31, 3)), np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"S \(key rows\) is 2147483648"):
        sdpa(np.zeros((2, 3)), huge((), (2**31, 3)), huge((), (2**31, 3)))
    x = huge((2**31 - 1,), (2**20, 8))
    with pytest.raises(ValueError, match=r"weights \(N, num_heads, L, S\) of query and key"):
        attnpy.self_attention(x, np.zeros((8, 2)), np.zeros((8, 2)), np.zeros((8, 2)))
    with pytest.raises(ValueError, match="query, key and value dimensions must be at most"):
        attnpy.MultiheadAttention(8, 2, dtype=np.float64)(huge((1,), (2**31, 8)))


def test_multihead_weights_whose_size_overflows_are_named():
    # N * H * L * S' overflows while every input fits
    layer = attnpy.MultiheadAttention(2, 2, dtype=np.float64)
    x = huge((2**20,), (2**31 - 1, 2))
    with pytest.raises(ValueError, match=r"attention weights \(N, num_heads, L, S\) of query and key"):
        layer(x)


def test_possible_but_too_large_is_a_memory_error():
    script = textwrap.dedent(f"""
        import numpy as np, attnpy
        assert attnpy._core.__file__ == {attnpy._core.__file__!r}, attnpy._core.__file__
        sdpa = attnpy.scaled_dot_product_attention
        def huge(shape):
            return np.broadcast_to(np.zeros((1,) * len(shape)), shape)
        cases = [
            # no weights: 8 TiB of output
            lambda: sdpa(huge((2**20, 1, 1, 1)), huge((1, 2**20, 2**31 - 1, 1)),
                         huge((1, 2**20, 2**31 - 1, 1)), need_weights=False),
            # the weights, 8 PiB
            lambda: sdpa(np.zeros((2**20, 3)), huge((2**30, 3)), huge((2**30, 3))),
            lambda: attnpy.MultiheadAttention(8, 2, dtype=np.float64)(
                huge((2**31 - 1, 2**20, 8)), need_weights=False),
            lambda: attnpy.causal_mask(2**30),          # 4 EiB of float32
        ]
        for i, case in enumerate(cases):
            try:
                case()
            except MemoryError:
                print(i, "MemoryError")
            else:
                print(i, "no error")
    """)
    env = dict(os.environ)
    env["ASAN_OPTIONS"] = ":".join(filter(None, [env.get("ASAN_OPTIONS"),
                                                 "allocator_may_return_null=1"]))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines() == [f"{i} MemoryError" for i in range(4)], done.stdout

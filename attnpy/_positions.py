"""Positions: rotary embeddings, sinusoidal encodings, T5's buckets, a KV cache.

These are small element-wise steps around the attention, written with NumPy
on views of the caller's arrays (nothing is copied on the way in); the
attention itself, with ``query_offset``, ``window`` and ``alibi_slopes``,
runs in the C core (see :func:`attnpy.scaled_dot_product_attention`).

Conventions, stated once (README, "Positions"): key ``j`` sits at position
``j``; query ``i`` at ``query_offset + i``; positions are ints in
``[0, 2**31)``.
"""
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from . import _args

__all__ = ["KVCache", "RoPE", "relative_position_bucket", "rope", "sinusoidal_positions"]


def _float_array(x, name):
    """x as a float32/float64 ndarray: an ndarray as it is, an array-like converted."""
    if not isinstance(x, np.ndarray):
        x = _args._array_like(x, name, "float32 or float64")
        if x.dtype.kind in "biu":
            x = x.astype(np.float64)
    if x.dtype not in (np.float32, np.float64):
        raise TypeError(f"{name} must be a float32 or float64 array; got {x.dtype}")
    return x


def _positive_float(x, name):
    value = _args.real(x, name, "a float")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite float > 0; got {x!r}")
    return value


def _rotary_dim(rotary_dim, D):
    if rotary_dim is None:
        rotary_dim = D
    if isinstance(rotary_dim, (bool, np.bool_)) or not isinstance(rotary_dim, (int, np.integer)):
        raise TypeError(f"rotary_dim must be an int or None; got {type(rotary_dim).__name__}")
    if not (2 <= rotary_dim <= D and rotary_dim % 2 == 0):
        raise ValueError(f"rotary_dim must be even and in [2, D] with D = {D} (x's last "
                         f"dimension); got {rotary_dim}")
    return int(rotary_dim)


def _position_array(positions, L, name="positions"):
    """positions as an int64 array broadcastable to (..., L), checked."""
    if positions is None:
        return np.arange(L, dtype=np.int64)
    p = positions if isinstance(positions, np.ndarray) else _args._array_like(
        positions, name, "ints")
    if p.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an int array broadcastable to (..., L) with L = {L}; "
                        f"got dtype {p.dtype}")
    if p.ndim == 0 or p.shape[-1] not in (1, L):
        raise ValueError(f"{name} must be broadcastable to (..., L) with L = {L}; got shape "
                         f"{p.shape}")
    if p.size and (p.min() < 0 or p.max() > _args.MAX_EXTENT):
        bad = p.min() if p.min() < 0 else p.max()
        raise ValueError(f"{name} must be in [0, 2**31); got {bad}")
    return p.astype(np.int64, copy=False)


def rope(x, positions=None, *, base=10000.0, interleaved=False, rotary_dim=None, inverse=False,
         out=None):
    r"""Rotary position embedding (Su et al., RoFormer) of ``x``.

    Feature pairs ``(x_a, x_b)`` of the token at position ``p`` are turned by
    the angle ``p * theta_i``, ``theta_i = base**(-2 i / rotary_dim)``:

    .. math::
        x'_a = x_a \cos(p\theta_i) - x_b \sin(p\theta_i), \quad
        x'_b = x_b \cos(p\theta_i) + x_a \sin(p\theta_i)

    so that the score of a rotated query and a rotated key depends on their
    positions only through the offset between them.

    Parameters
    ----------
    x : array_like, shape (..., L, D)
        Queries or keys, one head or many (``(N, H, L, D)``), float32 or
        float64; read in place, whatever its strides.
    positions : array_like of int, shape broadcastable to (..., L), optional
        The position of each token, in ``[0, 2**31)``. Default ``arange(L)``;
        decoding after ``n`` cached tokens passes ``n + arange(T)``.
    base : float, default 10000.0
        The wavelength base (Llama 3 and Qwen2 use larger ones).
    interleaved : bool, default False
        ``False``: feature ``i`` pairs with ``i + rotary_dim / 2`` (the two
        halves; ``rotate_half`` of Llama and GPT-NeoX in Hugging Face).
        ``True``: feature ``2 i`` pairs with ``2 i + 1`` (GPT-J, RoFormer).
    rotary_dim : int, optional
        Rotate only the first ``rotary_dim`` features (even, default ``D``)
        and pass the others through (partial rotary: GPT-NeoX, Phi).
    inverse : bool, default False
        Turn by ``-p * theta_i``: the inverse, and the transpose, of the
        rotation, hence its backward: ``grad_x = rope(grad_out, positions,
        ..., inverse=True)``.
    out : ndarray, optional
        Where to write, shape ``broadcast(x.shape[:-1], positions.shape) +
        (D,)`` and x's dtype; it may be ``x`` itself (in place).

    Returns
    -------
    ndarray, shape (..., L, D)
        The rotated features, in x's dtype (angles are taken in float64).
    """
    x = _float_array(x, "x")
    if x.ndim < 2:
        raise ValueError(f"x must have shape (..., L, D), at least 2-D; got shape {x.shape}")
    L, D = x.shape[-2:]
    r = _rotary_dim(rotary_dim, D)
    theta_base = _positive_float(base, "base")
    pos = _position_array(positions, L)
    try:
        shape = np.broadcast_shapes(x.shape[:-1], pos.shape) + (D,)
    except ValueError:
        raise ValueError(f"positions of shape {pos.shape} do not broadcast with x's "
                         f"(..., L) = {x.shape[:-1]}") from None
    if out is not None:
        if not isinstance(out, np.ndarray) or out.dtype != x.dtype or out.shape != shape:
            got = (f"{out.dtype} {out.shape}" if isinstance(out, np.ndarray)
                   else type(out).__name__)
            raise ValueError(f"out must be an ndarray of {x.dtype} with shape {shape}; got {got}")
        if not out.flags.writeable:
            raise ValueError("out is read-only")
        same = (out.__array_interface__["data"][0] == x.__array_interface__["data"][0]
                and out.strides == x.strides and out.shape == x.shape)
        if not same and np.may_share_memory(out, x):
            raise ValueError("out overlaps x without being x itself: the rotation would read "
                             "what it has already written")

    # the angles p * theta_i, (..., L, r/2), in float64 then rounded once
    theta = theta_base ** (-np.arange(0, r, 2, dtype=np.float64) / r)
    angle = pos[..., None] * theta
    cos = np.cos(angle).astype(x.dtype)
    sin = np.sin(angle).astype(x.dtype)
    if inverse:
        sin = -sin
    if interleaved:
        a, b = x[..., 0:r:2], x[..., 1:r:2]
    else:
        a, b = x[..., :r // 2], x[..., r // 2:r]
    new_a = a * cos - b * sin          # both halves computed before any write:
    new_b = b * cos + a * sin          # out may be x itself
    if out is None:
        out = np.empty(shape, x.dtype)
    if r < D and out is not x:
        out[..., r:] = x[..., r:]
    if interleaved:
        out[..., 0:r:2], out[..., 1:r:2] = new_a, new_b
    else:
        out[..., :r // 2], out[..., r // 2:r] = new_a, new_b
    return out


@dataclass(frozen=True)
class RoPE:
    """Rotary embeddings for :class:`attnpy.MultiheadAttention` (``rope=RoPE()``).

    The layer turns its projected queries and keys, head by head, with
    :func:`attnpy.rope` and these settings; positions are ``0 .. L-1``, or
    after a cache's ``n`` tokens ``n .. n+T-1``.

    Parameters
    ----------
    base : float, default 10000.0
    interleaved : bool, default False
    rotary_dim : int, optional
        As in :func:`attnpy.rope`; at most the head width.
    """

    base: float = 10000.0
    interleaved: bool = False
    rotary_dim: Optional[int] = None

    def __post_init__(self):
        object.__setattr__(self, "base", _positive_float(self.base, "base"))
        object.__setattr__(self, "interleaved", bool(self.interleaved))
        if self.rotary_dim is not None:
            # checked against the head width by the layer
            _rotary_dim(self.rotary_dim, self.rotary_dim)

    def __call__(self, x, positions=None, *, inverse=False, out=None):
        return rope(x, positions, base=self.base, interleaved=self.interleaved,
                    rotary_dim=self.rotary_dim, inverse=inverse, out=out)


def sinusoidal_positions(L, d, *, base=10000.0, dtype=np.float32):
    """The position encoding of "Attention Is All You Need" (Vaswani et al.).

    ``PE[p, 2i] = sin(p / base**(2i/d))`` and ``PE[p, 2i+1] = cos(p /
    base**(2i/d))``: sines and cosines interleaved, as in the paper.

    Parameters
    ----------
    L : int
        Number of positions, ``0 .. L-1``.
    d : int
        Width of the encoding (the model width); odd ``d`` ends with a sine.
    base : float, default 10000.0
    dtype : float32 or float64

    Returns
    -------
    ndarray, shape (L, d)
    """
    L = _args.position(L, "L")
    if isinstance(d, (bool, np.bool_)) or not isinstance(d, (int, np.integer)):
        raise TypeError(f"d must be an int; got {type(d).__name__}")
    if not 1 <= d <= _args.MAX_EXTENT:
        raise ValueError(f"d must be in [1, 2**31); got {d}")
    b = _positive_float(base, "base")
    dtype = _args.dtype_arg(dtype)
    angle = np.arange(L, dtype=np.float64)[:, None] / b ** (np.arange(0, d, 2) / d)
    pe = np.empty((L, d), dtype)
    pe[:, 0::2] = np.sin(angle)
    pe[:, 1::2] = np.cos(angle[:, :d // 2])
    return pe


def relative_position_bucket(relative_position, *, bidirectional=True, num_buckets=32,
                             max_distance=128):
    """T5's buckets for relative positions ``key - query`` (Raffel et al.).

    Offsets below ``num_buckets // 2`` (halved again when bidirectional) get
    one bucket each; larger ones share logarithmically wider buckets up to
    ``max_distance``, beyond which all fall in the last. Bidirectional
    buckets give keys after the query the upper half. The logarithm is taken
    in float32, as T5 does, so that every bucket boundary is T5's.

    Parameters
    ----------
    relative_position : array_like of int
        ``memory_position - query_position``, any shape.
    bidirectional : bool, default True
        False for a decoder (causal): keys after the query all go to bucket 0.
    num_buckets : int, default 32
    max_distance : int, default 128

    Returns
    -------
    ndarray of int64, the shape of ``relative_position``
        The bucket of each offset, in ``[0, num_buckets)``; index a learned
        ``(num_buckets, num_heads)`` table with it to get ``attn_bias``.
    """
    rel = relative_position if isinstance(relative_position, np.ndarray) else \
        _args._array_like(relative_position, "relative_position", "ints")
    if rel.dtype.kind not in "iu":
        raise TypeError(f"relative_position must be an int array; got dtype {rel.dtype}")
    for name, n, low in (("num_buckets", num_buckets, 2 + 2 * bool(bidirectional)),
                         ("max_distance", max_distance, 1)):
        if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
            raise TypeError(f"{name} must be an int; got {type(n).__name__}")
        if n < low:
            raise ValueError(f"{name} must be >= {low}; got {n}")
    rel = rel.astype(np.int64)
    buckets = np.zeros(rel.shape, np.int64)
    n = int(num_buckets)
    if bidirectional:
        n //= 2
        buckets += (rel > 0) * n
        distance = np.abs(rel)
    else:
        distance = -np.minimum(rel, 0)
    exact = n // 2
    if max_distance <= exact:
        raise ValueError(f"max_distance must be more than the exact buckets' range ({exact}); "
                         f"got {max_distance}")
    # (near offsets take the other branch: their log is not needed)
    ratio = np.maximum(distance, exact).astype(np.float32) / np.float32(exact)
    far = exact + (np.log(ratio) / np.float32(math.log(max_distance / exact))
                   * np.float32(n - exact)).astype(np.int64)
    far = np.minimum(far, n - 1)
    buckets += np.where(distance < exact, distance, far)
    return buckets


class KVCache:
    """Keys and values of the tokens decoded so far, in preallocated storage.

    Parameters
    ----------
    batch, num_kv_heads, max_len, head_dim : int
        The storage is ``(batch, num_kv_heads, max_len, head_dim)``.
    value_dim : int, optional
        The values' width, default ``head_dim``.
    dtype : float32 or float64

    Attributes
    ----------
    keys : ndarray, shape (batch, num_kv_heads, max_len, head_dim)
    values : ndarray, shape (batch, num_kv_heads, max_len, value_dim)
        The whole storage; only the first ``len(cache)`` positions are filled.

    Examples
    --------
    One decoding step of ``T`` new tokens::

        keys, values = cache.append(k_new, v_new)          # (N, Hkv, n + T, D)
        attnpy.scaled_dot_product_attention(
            q_new, keys, values, is_causal=True, query_offset=len(cache) - T)
    """

    def __init__(self, batch, num_kv_heads, max_len, head_dim, *, value_dim=None,
                 dtype=np.float32):
        dims = [_args.position(n, name) for n, name in (
            (batch, "batch"), (num_kv_heads, "num_kv_heads"), (max_len, "max_len"),
            (head_dim, "head_dim"))]
        value_dim = dims[3] if value_dim is None else _args.position(value_dim, "value_dim")
        dt = _args.dtype_arg(dtype)
        self.keys = np.zeros(tuple(dims), dt)
        self.values = np.zeros(tuple(dims[:3]) + (value_dim,), dt)
        self._len = 0

    @property
    def max_len(self):
        return self.keys.shape[2]

    @property
    def dtype(self):
        return self.keys.dtype

    def __len__(self):
        return self._len

    def __repr__(self):
        N, Hkv, M, D = self.keys.shape
        return (f"KVCache(batch={N}, num_kv_heads={Hkv}, max_len={M}, head_dim={D}, "
                f"value_dim={self.values.shape[3]}, dtype={self.dtype}, filled={self._len})")

    def append(self, k, v):
        """Copy ``T`` new positions in; return the filled prefix.

        Parameters
        ----------
        k : array_like, shape (batch, num_kv_heads, T, head_dim)
        v : array_like, shape (batch, num_kv_heads, T, value_dim)
            Of the cache's dtype.

        Returns
        -------
        keys, values : ndarray, shapes (batch, num_kv_heads, len(cache), head_dim / value_dim)
            Views of the storage (no copy), valid until the next ``reset``.

        Raises
        ------
        ValueError
            Past ``max_len``, or of the wrong shape; the cache is unchanged.
        """
        N, Hkv, M, D = self.keys.shape
        Dv = self.values.shape[3]
        arrays = []
        for name, a, width in (("k", k, D), ("v", v, Dv)):
            if not isinstance(a, np.ndarray):
                a = _args.convert(a, name, self.dtype)
            if a.dtype != self.dtype:
                raise TypeError(f"{name} has dtype {a.dtype} but the cache holds {self.dtype}; "
                                f"pass {name}.astype(np.{self.dtype})")
            if a.ndim != 4 or a.shape[:2] != (N, Hkv) or a.shape[3] != width:
                raise ValueError(f"{name} must have shape (batch, num_kv_heads, T, {width}) = "
                                 f"({N}, {Hkv}, T, {width}); got {a.shape}")
            arrays.append(a)
        k, v = arrays
        T = k.shape[2]
        if v.shape[2] != T:
            raise ValueError(f"k and v must hold the same number of new positions; got "
                             f"{T} and {v.shape[2]}")
        if self._len + T > M:
            raise ValueError(f"the cache holds {self._len} of max_len = {M} positions: "
                             f"{T} more do not fit")
        end = self._len + T
        self.keys[:, :, self._len:end] = k
        self.values[:, :, self._len:end] = v
        self._len = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def reset(self):
        """Forget every position (the storage is kept)."""
        self._len = 0

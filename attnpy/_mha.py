"""MultiheadAttention and self_attention: parameters, layouts, result types.

Everything numeric happens in the C core; this module composes the layer
from its two operations (_core.linear and _core.sdpa, see _layer_forward),
holds the parameters under torch's names, turns the caller's layout into
(N, L, E) views (never copies), and names what comes back.
"""
from __future__ import annotations

import copy
import math
import uuid
from dataclasses import dataclass, field, fields
from typing import Optional

import numpy as np

from . import _args, _core, _positions, _repr

__all__ = ["MultiheadAttention", "MultiheadAttentionGradients", "MultiheadAttentionResult",
           "Trace", "self_attention"]


@dataclass(frozen=True)
class Trace:
    """Every stage of one forward pass, as the core wrote it. Read-only arrays.

    Shapes are batch-first, with the batch axis dropped for unbatched input.
    ``H`` heads, ``Hkv`` key/value heads, ``D = E // H``, ``S' = S +
    add_bias_kv + add_zero_attn`` (bias_k and the zero key are the last key
    rows).

    Attributes
    ----------
    q : ndarray, shape (N, H, L, D)
        Projected queries, split into heads (``query @ W_q.T + b_q``).
    k : ndarray, shape (N, Hkv, S', D)
        Projected keys, with the bias_k and zero rows when enabled. With a
        ``kv_cache``: this call's ``T`` new keys only, ``(N, Hkv, T, D)``,
        while the maps below span the whole cache (``S' = len(cache)``).
    v : ndarray, shape (N, Hkv, S', D)
        Projected values, likewise.
    q_rotated : ndarray, shape (N, H, L, D), or None
        With ``rope``: the queries after the rotary embedding, what the
        scores are made of. None without rope.
    k_rotated : ndarray, shape (N, Hkv, S', D), or None
        Likewise the keys (with a cache, the new keys: the cache holds them
        rotated).
    scores : ndarray, shape (N, H, L, S')
        Raw ``q @ k.T`` per head: unscaled, unmasked.
    logits : ndarray, shape (N, H, L, S')
        What the softmax sees: ``scale * scores + masks`` (``-inf`` where a
        bool mask forbids).
    weights : ndarray, shape (N, H, L, S')
        The softmax of the logits, before dropout.
    dropout_mask : ndarray of bool, shape (N, H, L, S'), or None
        True where dropout kept the weight (training with dropout only).
    dropped_weights : ndarray, shape (N, H, L, S'), or None
        ``weights * dropout_mask / (1 - p)``: what multiplies ``v``.
    head_outputs : ndarray, shape (N, H, L, D)
        Each head's ``weights @ v``.
    concat : ndarray, shape (N, L, E)
        The heads merged side by side (the same memory as head_outputs).
    output : ndarray, shape (N, L, E)
        ``concat @ out_proj.weight.T + out_proj.bias``.
    """

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    q_rotated: Optional[np.ndarray]
    k_rotated: Optional[np.ndarray]
    scores: np.ndarray
    logits: np.ndarray
    weights: np.ndarray
    dropout_mask: Optional[np.ndarray]
    dropped_weights: Optional[np.ndarray]
    head_outputs: np.ndarray
    concat: np.ndarray
    output: np.ndarray

    def __repr__(self):
        return _repr.short_repr(self, [f.name for f in fields(self)])

    def __setstate__(self, state):
        # a pickled or deep-copied trace stays read-only (NumPy's pickle
        # gives writeable arrays back)
        for name, a in state.items():
            object.__setattr__(self, name, _readonly(a) if isinstance(a, np.ndarray) else a)

    def _repr_html_(self):
        return _repr.html_repr(self, [f.name for f in fields(self)], self.weights)


@dataclass(frozen=True)
class MultiheadAttentionResult(_repr.Ran):
    """What a multi-head call returns. Unpacks like torch: ``out, weights = res``.

    Attributes
    ----------
    output : ndarray, shape (N, L, E), (L, N, E) or (L, E)
        In the caller's layout (batch_first, unbatched).
    weights : ndarray, shape (N, H, L, S'), (N, L, S') or None
        Per head, or averaged over heads with ``average_attn_weights=True``.
    weights_after_dropout : bool
        True when ``weights`` are the post-dropout weights (training mode
        with dropout, as torch returns them); the trace has both.
    trace : Trace or None
        With ``trace=True``: every stage.
    kernel : str
        The kernel that computed the attention (``'avx512'``,
        ``'reference'``, ...), and ``kernel_reason`` why.
    """

    output: np.ndarray
    weights: Optional[np.ndarray]
    weights_after_dropout: bool = False
    trace: Optional[Trace] = None
    # what MultiheadAttention.backward needs (kept with trace=True only)
    _context: Optional[dict] = field(default=None, repr=False, compare=False)
    # what ran the attention (the kernel and kernel_reason properties)
    _ran: Optional[int] = field(default=None, repr=False, compare=False)

    def __iter__(self):
        return iter((self.output, self.weights))


    def __repr__(self):
        return _repr.short_repr(self, ["output", "weights", "weights_after_dropout", "trace"])

    def _repr_html_(self):
        return _repr.html_repr(self, ["output", "weights", "weights_after_dropout", "trace"],
                               self.weights)


@dataclass(frozen=True)
class MultiheadAttentionGradients:
    """Gradients of a loss through one multi-head forward pass.

    Attributes
    ----------
    query, key, value : ndarray
        Shaped like the forward's query, key and value (the caller's layout).
        For self-attention (one ``x`` as query, key and value) the gradient
        with respect to ``x`` is ``query + key + value``.
    params : dict of str to ndarray
        One per parameter, under ``state_dict``'s names and shapes
        (``in_proj_weight``, ``in_proj_bias``, ``out_proj.weight``, ...).
    """

    query: np.ndarray
    key: np.ndarray
    value: np.ndarray
    params: dict

    def __repr__(self):
        return _repr.short_repr(self, ["query", "key", "value", "params"])


# ---------------------------------------------------------------------------
# helpers


def _as_input(x, name, dtype):
    """An ndarray as it is (checked, never copied); other array-likes converted."""
    dt = np.dtype(dtype)
    fix = f"{name}.astype(np.{dt})"
    if type(x).__module__.split(".")[0] == "torch":
        fix = f"{name}.to(torch.{dt})"  # a tensor has no .astype
    if not isinstance(x, np.ndarray):
        if hasattr(x, "__array__") and not isinstance(x, np.generic):
            # a tensor carries its dtype: it follows the ndarray rule below
            # (a float32 tensor was accepted by a float64 layer, a float32
            # ndarray refused)
            x = _args._asarray(x, name)
        else:
            x = _args.convert(x, name, dtype)
    if x.dtype != dtype:
        other = (f" or build the layer with dtype=np.{x.dtype}"
                 if x.dtype in (np.float32, np.float64) else "")  # the layer's dtypes only
        raise TypeError(f"{name} has dtype {x.dtype} but the layer computes in {dt}; "
                        f"pass {fix}{other}")
    return x


def _readonly(a):
    if a is None:
        return None
    a = a.view()
    a.flags.writeable = False
    return a


def _split(x, num_heads):
    """(N, rows, H*D) seen as (N, H, rows, D): a view, no copy."""
    N, rows, HD = x.shape
    return x.reshape(N, rows, num_heads, HD // num_heads).transpose(0, 2, 1, 3)


def _make_trace(raw, num_heads, num_kv_heads, unbatched):
    if raw is None:
        return None
    pick = (lambda a: a[0]) if unbatched else (lambda a: a)
    fields = dict(
        q=_split(raw["q"], num_heads),
        k=_split(raw["k"], num_kv_heads),
        v=_split(raw["v"], num_kv_heads),
        q_rotated=raw.get("q_rotated"), k_rotated=raw.get("k_rotated"),
        scores=raw["scores"], logits=raw["logits"], weights=raw["weights"],
        dropout_mask=raw["dropout_mask"], dropped_weights=raw["dropped_weights"],
        head_outputs=_split(raw["concat"], num_heads),
        concat=raw["concat"], output=raw["output"])
    return Trace(**{name: _readonly(pick(a)) if a is not None else None
                    for name, a in fields.items()})


def _check_int(name, n, minimum=1):
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"{name} must be an int; got {type(n).__name__}")
    if n < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {n}")
    return int(n)


# ---------------------------------------------------------------------------
# MultiheadAttention


class MultiheadAttention:
    r"""Multi-head attention, argument for argument ``torch.nn.MultiheadAttention``.

    .. math::
        \mathrm{MultiHead}(Q, K, V) = \mathrm{Concat}(\mathrm{head}_1, \dots,
        \mathrm{head}_H) W^O, \quad \mathrm{head}_h = \mathrm{softmax}\Big(
        \frac{Q W^Q_h (K W^K_h)^T}{\sqrt{D}} + M\Big) V W^V_h

    Parameters
    ----------
    embed_dim : int
        E, the width of queries and of the output.
    num_heads : int
        H; must divide ``embed_dim`` (head width ``D = E // H``).
    dropout : float, default 0.0
        Dropout probability on the attention weights, in training mode only.
    bias : bool, default True
        Biases on the input and output projections.
    add_bias_kv : bool, default False
        Append the learned ``bias_k`` / ``bias_v`` as one extra key/value.
    add_zero_attn : bool, default False
        Append a key/value of zeros (after bias_k/bias_v).
    kdim, vdim : int, optional
        Widths of key and value inputs; default ``embed_dim``. When both
        equal ``embed_dim`` the projections are packed in ``in_proj_weight``.
    batch_first : bool, default True
        Inputs and output are ``(N, L, E)``; with False, ``(L, N, E)``.
        **Differs from torch's default (False) on purpose**; ``from_torch``
        copies the module's setting.
    num_kv_heads : int, optional
        Hkv key/value heads for grouped-query (Hkv < H) or multi-query
        (Hkv = 1) attention: head ``h`` uses key/value head ``h // (H //
        Hkv)``. Default ``num_heads`` (torch's layer). Key and value
        projections then have ``Hkv * D`` rows.
    dtype : float32 or float64
        The dtype of the parameters and of the computation.
    seed : int, optional
        Seeds the initialisation and the dropout masks.
    rope : attnpy.RoPE, optional
        Rotary position embeddings on the projected queries and keys of
        every head (Llama, Qwen2, Mistral); the trace then shows
        ``q_rotated`` and ``k_rotated``. Positions are ``0 .. L-1`` for the
        queries and ``0 .. S-1`` for the keys, or after a ``kv_cache``'s
        ``n`` tokens ``n .. n+T-1``. Not with ``add_bias_kv`` or
        ``add_zero_attn`` (appended keys have no position).

    Notes
    -----
    Conventions follow ``torch.nn.MultiheadAttention``, which differ from
    :func:`attnpy.scaled_dot_product_attention`'s:

    - bool ``attn_mask`` and ``key_padding_mask``: **True = NOT allowed**;
      float masks are added to the scores;
    - ``attn_mask`` is ``(L, S)`` or ``(N * num_heads, L, S)`` (entry
      ``n * num_heads + h``); ``(N, num_heads, L, S)`` is accepted too;
    - scaling by ``1 / sqrt(D)``.

    Defaults that differ from torch on purpose: ``batch_first=True``,
    ``average_attn_weights=False`` (per-head maps are the point), and fully
    masked rows give zero weights and a zero attention output (torch's
    weights path gives NaN there).
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False,
                 add_zero_attn=False, kdim=None, vdim=None, batch_first=True,
                 num_kv_heads=None, dtype=np.float32, seed=None, rope=None):
        self.embed_dim = _check_int("embed_dim", embed_dim)
        self._id = uuid.uuid4().hex  # ties a traced result to its layer, across pickles
        self.num_heads = _check_int("num_heads", num_heads)
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.num_kv_heads = self.num_heads if num_kv_heads is None else _check_int(
            "num_kv_heads", num_kv_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads "
                             f"({num_kv_heads})")
        self.kdim = self.embed_dim if kdim is None else _check_int("kdim", kdim)
        self.vdim = self.embed_dim if vdim is None else _check_int("vdim", vdim)
        if isinstance(dropout, (bool, np.bool_)) or not isinstance(dropout, (int, float, np.floating, np.integer)):
            raise TypeError(f"dropout must be a float; got {type(dropout).__name__}")
        # compared as given: exact for ints of any size (float() would overflow)
        if not 0 <= dropout <= 1:
            shown = (f"{dropout}" if not isinstance(dropout, (int, np.integer)) or
                     abs(int(dropout)) < 2**64 else f"an int of {int(dropout).bit_length()} bits")
            raise ValueError(f"dropout must be in [0, 1]; got {shown}")
        self.dropout = float(dropout)
        self.bias = bool(bias)
        self.add_bias_kv = bool(add_bias_kv)
        self.add_zero_attn = bool(add_zero_attn)
        self.batch_first = bool(batch_first)
        self.dtype = _args.dtype_arg(dtype)
        self.head_dim = self.embed_dim // self.num_heads
        if rope is not None:
            if not isinstance(rope, _positions.RoPE):
                raise TypeError(f"rope must be None or an attnpy.RoPE; got {type(rope).__name__}")
            if rope.rotary_dim is not None and rope.rotary_dim > self.head_dim:
                raise ValueError(f"rope's rotary_dim ({rope.rotary_dim}) must be at most the "
                                 f"head width embed_dim // num_heads = {self.head_dim}")
            if self.add_bias_kv or self.add_zero_attn:
                raise ValueError("rope cannot go with add_bias_kv or add_zero_attn: the "
                                 "appended keys have no position")
        self.rope = rope
        self._qkv_same_embed_dim = self.kdim == self.embed_dim and self.vdim == self.embed_dim
        self.training = False
        self._rng = np.random.default_rng(seed)
        self._params = {}
        self._reset_parameters()

    # -- parameters ---------------------------------------------------------

    def __deepcopy__(self, memo):
        # a copy is another layer (its weights may change apart): its own id,
        # so that it refuses the original's traced results, as before
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for name, value in self.__dict__.items():
            setattr(new, name, copy.deepcopy(value, memo))
        new._id = uuid.uuid4().hex
        return new

    def _shapes(self):
        """torch's state_dict names and shapes for this configuration."""
        E, kvE = self.embed_dim, self.num_kv_heads * self.head_dim
        shapes = {}
        if self._qkv_same_embed_dim:
            shapes["in_proj_weight"] = (E + 2 * kvE, E)
        else:
            shapes["q_proj_weight"] = (E, E)
            shapes["k_proj_weight"] = (kvE, self.kdim)
            shapes["v_proj_weight"] = (kvE, self.vdim)
        if self.bias:
            shapes["in_proj_bias"] = (E + 2 * kvE,)
        if self.add_bias_kv:
            shapes["bias_k"] = (1, 1, kvE)
            shapes["bias_v"] = (1, 1, kvE)
        shapes["out_proj.weight"] = (E, E)
        if self.bias:
            shapes["out_proj.bias"] = (E,)
        return shapes

    def _reset_parameters(self):
        """torch's initialisation: xavier-uniform in-projection, kaiming-uniform
        (a = sqrt(5)) out-projection, zero biases, xavier-normal bias_k/bias_v."""
        rng, p = self._rng, {}
        for name, shape in self._shapes().items():
            if name.endswith("proj_weight"):
                fan_out, fan_in = shape
                bound = math.sqrt(6.0 / (fan_in + fan_out))
                p[name] = rng.uniform(-bound, bound, shape)
            elif name == "out_proj.weight":
                bound = 1.0 / math.sqrt(shape[1])
                p[name] = rng.uniform(-bound, bound, shape)
            elif name in ("bias_k", "bias_v"):
                p[name] = rng.normal(0.0, math.sqrt(2.0 / (2 * shape[2])), shape)
            else:
                p[name] = np.zeros(shape)
        self._params = {k: v.astype(self.dtype) for k, v in p.items()}

    def state_dict(self):
        """The parameters under torch's names. The arrays themselves, not copies."""
        return dict(self._params)

    def parameters(self):
        """The parameter arrays, in place: ``p -= lr * g`` updates the layer."""
        return list(self._params.values())

    def load_state_dict(self, state_dict):
        """Load parameters by torch's names (NumPy arrays or torch tensors).

        Every key of this configuration must be present, no other key, each
        with the right shape; values are copied in the layer's dtype.
        """
        shapes = self._shapes()
        missing = sorted(set(shapes) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(shapes))
        if missing or unexpected:
            raise KeyError(f"state_dict keys do not match this layer: missing {missing}, "
                           f"unexpected {unexpected}")
        new = {}
        for name, shape in shapes.items():
            value = state_dict[name]
            if hasattr(value, "detach"):  # a torch tensor
                value = value.detach().cpu().numpy()
            value = np.asarray(value)
            if value.shape != shape:
                raise ValueError(f"state_dict[{name!r}] must have shape {shape}; got {value.shape}")
            if not (np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)):
                raise TypeError(f"state_dict[{name!r}] must be a float array; got {value.dtype}")
            new[name] = np.array(value, dtype=self.dtype, copy=True)
        self._params = new

    @classmethod
    def from_torch(cls, module):
        """A layer with the weights and every option of a ``torch.nn.MultiheadAttention``."""
        weight = module.out_proj.weight
        dtype = {"torch.float32": np.float32, "torch.float64": np.float64}.get(str(weight.dtype))
        if dtype is None:
            raise TypeError(f"module parameters must be float32 or float64; got {weight.dtype}")
        layer = cls(module.embed_dim, module.num_heads, dropout=module.dropout,
                    bias=module.in_proj_bias is not None, add_bias_kv=module.bias_k is not None,
                    add_zero_attn=module.add_zero_attn, kdim=module.kdim, vdim=module.vdim,
                    batch_first=module.batch_first, dtype=dtype)
        layer.load_state_dict(module.state_dict())
        layer.train(module.training)
        return layer

    def train(self, mode=True):
        """Training mode: dropout applies. Returns self."""
        self.training = bool(mode)
        return self

    def eval(self):
        """Evaluation mode (the default): no dropout. Returns self."""
        return self.train(False)

    def __repr__(self):
        return (f"MultiheadAttention(embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"num_kv_heads={self.num_kv_heads}, dropout={self.dropout}, "
                f"batch_first={self.batch_first}, dtype={self.dtype}, "
                f"{'' if self.rope is None else f'rope={self.rope}, '}"
                f"{'training' if self.training else 'eval'})")

    def _projections(self):
        """W_q, W_k, W_v, b_q, b_k, b_v as views of the stored parameters."""
        p, E = self._params, self.embed_dim
        kvE = self.num_kv_heads * self.head_dim
        if self._qkv_same_embed_dim:
            w = p["in_proj_weight"]
            w_q, w_k, w_v = w[:E], w[E:E + kvE], w[E + kvE:]
        else:
            w_q, w_k, w_v = p["q_proj_weight"], p["k_proj_weight"], p["v_proj_weight"]
        b = p.get("in_proj_bias")
        b_q, b_k, b_v = (None, None, None) if b is None else (b[:E], b[E:E + kvE], b[E + kvE:])
        return w_q, w_k, w_v, b_q, b_k, b_v

    def _fused_projection(self, query, key, value):
        """(in_proj_weight, in_proj_bias) when one product makes q, k and v:
        self-attention (one array as query, key and value) with the packed
        weight and no rows appended to k and v. Else None."""
        if not (self._qkv_same_embed_dim and key is query and value is query
                and "bias_k" not in self._params and not self.add_zero_attn):
            return None
        return self._params["in_proj_weight"], self._params.get("in_proj_bias")

    # -- forward --------------------------------------------------------------

    def __call__(self, query, key=None, value=None, key_padding_mask=None, need_weights=True,
                 attn_mask=None, average_attn_weights=False, is_causal=False, trace=False,
                 kv_cache=None):
        """Attend from ``query`` to ``key``/``value``.

        Parameters
        ----------
        query : array_like, shape (N, L, E), (L, N, E) if not batch_first, or (L, E)
        key : array_like, shape (N, S, kdim), (S, N, kdim) or (S, kdim), optional
            Default: ``query`` (self-attention).
        value : array_like, shape (N, S, vdim), (S, N, vdim) or (S, vdim), optional
            Default: ``key``.
        key_padding_mask : array_like, shape (N, S) or (S,), optional
            bool **True = ignore this key**, or float added to the scores.
        need_weights : bool, default True
            Return the attention weights. With False (and no trace) the
            attention streams over keys and no L x S map is built.
        attn_mask : array_like, shape (L, S), (N * num_heads, L, S) or (N, num_heads, L, S), optional
            bool **True = NOT allowed**, or float added to the scores.
        average_attn_weights : bool, default False
            Average the returned weights over heads (torch's default is True).
        is_causal : bool, default False
            A hint, as in torch: it requires ``attn_mask`` (which is then used
            as given) and raises without one.
        trace : bool, default False
            Also return every stage (see :class:`Trace`).
        kv_cache : attnpy.KVCache, optional
            Self-attention decoding: the ``T`` tokens of ``query`` (``key``
            and ``value`` not given) append their projected keys and values
            to the cache, ``(N, num_kv_heads, max_len, D)`` of the layer's
            dtype, and attend causally to every cached token (bottom-right:
            ``query_offset = len(cache) - T``); weights ``(N, H, T,
            len(cache))``. No ``attn_mask`` or ``key_padding_mask`` with it;
            ``backward`` raises NotImplementedError on its results.

        Returns
        -------
        MultiheadAttentionResult
        """
        dtype = self.dtype
        if kv_cache is not None:
            self._check_cache(kv_cache, query, key, value, attn_mask, key_padding_mask)
        query = _as_input(query, "query", dtype)
        key = query if key is None else _as_input(key, "key", dtype)
        value = key if value is None else _as_input(value, "value", dtype)
        fused = self._fused_projection(query, key, value)   # before any view is taken
        if is_causal and attn_mask is None and kv_cache is None:
            raise ValueError("is_causal=True is a hint that needs attn_mask (as in torch); pass "
                             "attn_mask=attnpy.causal_mask(L, S)")

        unbatched = query.ndim == 2
        want = 2 if unbatched else 3
        for name, x in (("query", query), ("key", key), ("value", value)):
            if x.ndim != want:
                raise ValueError(f"{name} must be {want}-D like query "
                                 f"({'unbatched (L, E)' if unbatched else 'batched'}); "
                                 f"got shape {x.shape}")
        widths = (("query", query, self.embed_dim, "embed_dim"), ("key", key, self.kdim, "kdim"),
                  ("value", value, self.vdim, "vdim"))
        for name, x, width, what in widths:
            if x.shape[-1] != width:
                raise ValueError(f"{name} must have {width} features ({what}) in its last "
                                 f"dimension; got shape {x.shape}")
        for name, x in (("query", query), ("key", key), ("value", value)):
            _args.check_aligned(x, name)
        if unbatched:
            query, key, value = query[None], key[None], value[None]
        elif not self.batch_first:
            query, key, value = (x.swapaxes(0, 1) for x in (query, key, value))
        N, L, _ = query.shape
        S = key.shape[1]
        H = self.num_heads
        if kv_cache is not None and kv_cache.keys.shape[0] != N:
            raise ValueError(f"kv_cache holds a batch of {kv_cache.keys.shape[0]}; query has "
                             f"{N}")

        if key_padding_mask is not None:
            key_padding_mask = np.asarray(key_padding_mask) if not isinstance(
                key_padding_mask, np.ndarray) else key_padding_mask
            expected = (S,) if unbatched else (N, S)
            if key_padding_mask.shape != expected:
                raise ValueError(f"key_padding_mask must have shape (N, S) = {expected}; "
                                 f"got {key_padding_mask.shape}")
            key_padding_mask = key_padding_mask.reshape(N, 1, 1, S)   # a view
        if attn_mask is not None:
            attn_mask = np.asarray(attn_mask) if not isinstance(attn_mask, np.ndarray) else attn_mask
            shapes = {(L, S), (N * H, L, S), (N, H, L, S)}
            if attn_mask.shape not in shapes:
                raise ValueError(f"attn_mask must have shape (L, S) = {(L, S)}, "
                                 f"(N*num_heads, L, S) = {(N * H, L, S)} or (N, num_heads, L, S); "
                                 f"got {attn_mask.shape}")
            if attn_mask.ndim == 3:
                attn_mask = attn_mask.reshape(N, H, L, S)   # splits axis 0: always a view

        dropout_p = self.dropout if self.training else 0.0
        if not 0.0 <= dropout_p <= 1.0:   # the attribute may have been set by hand
            raise ValueError(f"dropout must be in [0, 1]; got {dropout_p}")
        seed = int(self._rng.integers(0, 2**63)) if dropout_p > 0 else 0
        p = self._params
        bias_kv = (p["bias_k"].reshape(-1), p["bias_v"].reshape(-1)) if "bias_k" in p else None
        out, weights, raw, ran = _layer_forward(
            query, key, value, self._projections(), fused,
            H, self.num_kv_heads, bias_kv, self.add_zero_attn,
            p["out_proj.weight"], p.get("out_proj.bias"),
            masks=[m for m in (_args.mask(attn_mask, "attn_mask", dtype, "ignore"),
                               _args.mask(key_padding_mask, "key_padding_mask", dtype, "ignore"))
                   if m],
            scale=_args.default_scale(self.head_dim), is_causal=False,
            dropout_p=dropout_p, seed=seed, need_weights=need_weights, trace=trace,
            rope=self.rope, cache=kv_cache)

        context = None
        if trace:
            # the layer by its id, not by reference: a pickled or deep-copied
            # result still belongs to this layer (and does not carry it along)
            context = dict(layer_id=self._id, query=query, key=key, value=value, raw=raw,
                           unbatched=unbatched, N=N, L=L, cached=kv_cache is not None)
        if weights is not None and average_attn_weights:
            weights = weights.mean(axis=1)
        if unbatched:
            out = out[0]
            weights = None if weights is None else weights[0]
        elif not self.batch_first:
            out = out.swapaxes(0, 1)
        return MultiheadAttentionResult(
            output=out, weights=weights,
            weights_after_dropout=weights is not None and dropout_p > 0,
            trace=_make_trace(raw, H, self.num_kv_heads, unbatched), _context=context, _ran=ran)

    forward = __call__

    def _check_cache(self, cache, query, key, value, attn_mask, key_padding_mask):
        if not isinstance(cache, _positions.KVCache):
            raise TypeError(f"kv_cache must be None or an attnpy.KVCache; got "
                            f"{type(cache).__name__}")
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise ValueError("kv_cache is for self-attention decoding: pass the new tokens as "
                             "query alone (key=None, value=None)")
        for name, m in (("attn_mask", attn_mask), ("key_padding_mask", key_padding_mask)):
            if m is not None:
                raise ValueError(f"{name} cannot go with kv_cache: the cache attends causally "
                                 f"to every cached token")
        if self.add_bias_kv or self.add_zero_attn:
            raise ValueError("kv_cache cannot go with add_bias_kv or add_zero_attn")
        want = (self.num_kv_heads, self.head_dim, self.embed_dim // self.num_heads)
        got = (cache.keys.shape[1], cache.keys.shape[3], cache.values.shape[3])
        if cache.dtype != self.dtype:
            raise TypeError(f"kv_cache holds {cache.dtype} but the layer computes in "
                            f"{self.dtype}")
        if got != want:
            raise ValueError(f"kv_cache must have num_kv_heads = {want[0]} and head_dim = "
                             f"value_dim = {want[1]} (this layer's); got {got}")

    def backward(self, result, grad_output):
        """Gradients of a loss with respect to the inputs and every parameter.

        Parameters
        ----------
        result : MultiheadAttentionResult
            What this layer returned from a call with ``trace=True`` (the
            forward keeps what the backward needs: the projections, the
            weights, the dropout seed).
        grad_output : array_like, shape like ``result.output``
            The gradient of the loss with respect to the output.

        Returns
        -------
        MultiheadAttentionGradients

        Notes
        -----
        The parameters' current values are used: call ``backward`` before
        updating them. With dropout, the forward's dropout mask is used.
        """
        ctx = result._context if isinstance(result, MultiheadAttentionResult) else None
        if ctx is None:
            raise ValueError("result must come from a call with trace=True: the backward pass "
                             "needs the forward's projections and weights")
        if ctx["layer_id"] != self._id:
            raise ValueError("result comes from another layer's forward pass")
        if ctx.get("cached"):
            raise NotImplementedError("backward of a call with kv_cache: the cached keys and "
                                      "values come from earlier calls; train without the cache")
        grad_output = _as_input(grad_output, "grad_output", self.dtype)
        if grad_output.shape != result.output.shape:
            raise ValueError(f"grad_output must have the output's shape {result.output.shape}; "
                             f"got {grad_output.shape}")
        if ctx["unbatched"]:
            grad_output = grad_output[None]
        elif not self.batch_first:
            grad_output = grad_output.swapaxes(0, 1)

        E, kvE = self.embed_dim, self.num_kv_heads * self.head_dim
        grads = {name: np.zeros(shape, self.dtype) for name, shape in self._shapes().items()}
        if self._qkv_same_embed_dim:
            g = grads["in_proj_weight"]
            g_wq, g_wk, g_wv = g[:E], g[E:E + kvE], g[E + kvE:]
        else:
            g_wq, g_wk, g_wv = (grads["q_proj_weight"], grads["k_proj_weight"],
                                grads["v_proj_weight"])
        gb = grads.get("in_proj_bias")
        g_bq, g_bk, g_bv = (None, None, None) if gb is None else (gb[:E], gb[E:E + kvE],
                                                                   gb[E + kvE:])
        g_biask = grads["bias_k"].reshape(-1) if "bias_k" in grads else None
        g_biasv = grads["bias_v"].reshape(-1) if "bias_v" in grads else None

        p = self._params
        gq, gk, gv = _layer_backward(
            ctx["query"], ctx["key"], ctx["value"], self._projections(), ctx["raw"], grad_output,
            p["out_proj.weight"], (g_wq, g_wk, g_wv, g_bq, g_bk, g_bv), grads["out_proj.weight"],
            grads.get("out_proj.bias"), (g_biask, g_biasv) if g_biask is not None else None,
            (grads["in_proj_weight"], gb) if self._qkv_same_embed_dim else None)
        if ctx["unbatched"]:
            gq, gk, gv = gq[0], gk[0], gv[0]
        elif not self.batch_first:
            gq, gk, gv = (x.swapaxes(0, 1) for x in (gq, gk, gv))
        return MultiheadAttentionGradients(query=gq, key=gk, value=gv, params=grads)


# ---------------------------------------------------------------------------
# the textbook single head


def self_attention(x, w_q, w_k, w_v, *, attn_mask=None, is_causal=False, scale=None,
                   trace=False):
    r"""Single-head self-attention as the course books write it (Vaswani et al.).

    .. math:: Q = X W_q,\; K = X W_k,\; V = X W_v,\quad
              \mathrm{out} = \mathrm{softmax}\Big(\frac{Q K^T}{\sqrt{d_k}} + M\Big) V

    Parameters
    ----------
    x : array_like, shape (L, d_model) or (N, L, d_model)
    w_q, w_k : array_like, shape (d_model, d_k)
        Multiplied on the right (``X W``), the textbook orientation; torch's
        Linear stores the transpose.
    w_v : array_like, shape (d_model, d_v)
    attn_mask : array_like, broadcastable to (N, L, L), optional
        bool **True = attend** (SDPA's polarity), or float added.
    is_causal : bool, default False
        Query ``i`` sees keys ``j <= i``.
    scale : float, optional
        Default ``1 / sqrt(d_k)``.
    trace : bool, default False
        Also return Q, K, V, scores, logits and weights (single head: the
        head axis is kept, ``H = 1``).

    Returns
    -------
    MultiheadAttentionResult
        ``output (…, L, d_v)``, ``weights (…, L, L)``, and the trace.
    """
    x = x if isinstance(x, np.ndarray) else _args.convert(x, "x", np.float64)
    dtype = x.dtype
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"x must be float32 or float64 (native byte order); got {dtype}")
    w_q, w_k, w_v = (_as_input(w, name, dtype) for w, name in
                     ((w_q, "w_q"), (w_k, "w_k"), (w_v, "w_v")))
    # x is the core's query, key and value and w_q.T its q_proj_weight: its
    # messages would name those, so the layout is checked here
    for name, a in (("x", x), ("w_q", w_q), ("w_k", w_k), ("w_v", w_v)):
        _args.check_aligned(a, name)
    if x.ndim not in (2, 3):
        raise ValueError(f"x must have shape (L, d_model) or (N, L, d_model); got {x.shape}")
    for name, w in (("w_q", w_q), ("w_k", w_k), ("w_v", w_v)):
        if w.ndim != 2 or w.shape[0] != x.shape[-1]:
            raise ValueError(f"{name} must have shape (d_model, d) = ({x.shape[-1]}, d); "
                             f"got {w.shape}")
    if w_k.shape[1] != w_q.shape[1]:
        raise ValueError(f"w_q and w_k must have the same width d_k; got {w_q.shape} and {w_k.shape}")
    if is_causal and attn_mask is not None:
        raise ValueError("attn_mask and is_causal=True cannot both be given; pass one")
    unbatched = x.ndim == 2
    xb = x[None] if unbatched else x
    if attn_mask is not None and not isinstance(attn_mask, np.ndarray):
        attn_mask = np.asarray(attn_mask)
    if attn_mask is not None and attn_mask.ndim == 3:
        attn_mask = attn_mask[:, None]          # (N, L, S) -> (N, 1, L, S), a view
    E = w_q.shape[1]
    m = _args.mask(attn_mask, "attn_mask", dtype, "attend")
    out, weights, raw, ran = _layer_forward(
        xb, xb, xb, (w_q.T, w_k.T, w_v.T, None, None, None), None, 1, 1, None, False, None,
        None, masks=[m] if m else [], scale=_args.default_scale(E) if scale is None else _args.real(scale, "scale", "a float or None"), is_causal=bool(is_causal),
        dropout_p=0.0, seed=0, need_weights=True, trace=trace)
    weights = weights[:, 0]
    if unbatched:
        out, weights = out[0], weights[0]
    return MultiheadAttentionResult(output=out, weights=weights,
                                    trace=_make_trace(raw, 1, 1, unbatched), _ran=ran)


# ---------------------------------------------------------------------------
# the layer, composed: project -> split -> attend -> merge -> project
#
# Exactly what the exercises teach. Every step is one call into the core on
# views: the projections are _core.linear into buffers of (N, rows, H*D), the
# head split and merge are strided views of those buffers (no copy), and the
# attention is _core.sdpa on the views, writing each head's output straight
# into its columns of `concat`.


def _check_sizes(N, L, S2, H, dtype, want_maps, lengths):
    for n in lengths:
        if n > _args.MAX_EXTENT:
            raise ValueError(f"query, key and value dimensions must be at most 2**31 - 1; got {n}")
    if want_maps and N * H * L * S2 * np.dtype(dtype).itemsize >= 2**63:
        raise ValueError(f"the attention weights (N, num_heads, L, S) of query and key would have "
                         f"shape ({N}, {H}, {L}, {S2}): more bytes than any memory holds "
                         f"(need_weights=False does without them)")


def _layer_forward(query, key, value, proj, fused, H, Hkv, bias_kv, add_zero_attn, w_out, b_out,
                   *, masks, scale, is_causal, dropout_p, seed, need_weights, trace,
                   rope=None, cache=None):
    """The layer on (N, L, qdim), (N, S, kdim), (N, S, vdim) inputs.

    proj = (w_q, w_k, w_v, b_q, b_k, b_v), each weight (out, in) as torch
    stores it; fused = (w, b) when one product makes q, k and v; rope turns
    the projected q and k; cache (self-attention) takes the new keys and
    values and the attention spans it. Returns (output, weights or None, raw
    stages or None).
    """
    w_q, w_k, w_v, b_q, b_k, b_v = proj
    dtype = query.dtype
    N, L, _ = query.shape
    S = key.shape[1]
    D, Dv = w_q.shape[0] // H, w_v.shape[0] // Hkv
    extra = (bias_kv is not None) + bool(add_zero_attn)
    dropout = dropout_p > 0
    _check_sizes(N, L, S + extra, H, dtype, need_weights or trace,
                 (N, L, S, query.shape[2], key.shape[2], value.shape[2], H * D, Hkv * Dv))
    if key.shape[0] != N or value.shape[:2] != (N, S):
        raise ValueError(f"key and value must have the batch size of query (N={N}) and the same "
                         f"length S; got key {key.shape}, value {value.shape}")

    # 1. projections; k and v get `extra` more rows: bias_k / bias_v, then zeros
    if fused is not None:
        qkv = _core.linear(query, *fused)
        q, k, v = qkv[..., :H * D], qkv[..., H * D:(H + Hkv) * D], qkv[..., (H + Hkv) * D:]
    else:
        q = _core.linear(query, w_q, b_q)
        k = np.empty((N, S + extra, Hkv * D), dtype)
        v = np.empty((N, S + extra, Hkv * Dv), dtype)
        _core.linear(key, w_k, b_k, out=k[:, :S])
        _core.linear(value, w_v, b_v, out=v[:, :S])
        if bias_kv is not None:
            k[:, S], v[:, S] = bias_kv
        if add_zero_attn:
            k[:, -1], v[:, -1] = 0, 0

    # 2. positions: the rotary embedding turns each head's q and k (new
    # arrays); a cache takes the new keys and values and gives back all
    qh, kh, vh = _split(q, H), _split(k, Hkv), _split(v, Hkv)
    start = 0 if cache is None else len(cache)
    rotated = None
    if rope is not None:
        pos_q, pos_k = start + np.arange(L), start + np.arange(S)
        qh, kh = rope(qh, pos_q), rope(kh, pos_k)
        rotated = dict(q_rotated=qh, k_rotated=kh, _rope=(rope, pos_q, pos_k))
    options = dict(scale=scale, masks=masks, extra_keys=extra, is_causal=is_causal,
                   enable_gqa=Hkv != H, dropout_p=dropout_p, seed=seed)
    if cache is not None:
        _check_sizes(N, L, start + S, H, dtype, need_weights or trace, (start + S,))
        kh, vh = cache.append(kh, vh)
        options.update(is_causal=True, query_offset=start)

    # 3. attention per head, on views; the heads' outputs land side by side
    concat = np.empty((N, L, H * Dv), dtype)
    # traced without dropout: the rows' lse too, the backward's saved statistics
    _, weights, staged, ran = _core.sdpa(qh, kh, vh, need_weights=need_weights or trace,
                                         trace=trace, out=_split(concat, H),
                                         need_lse=trace and not dropout, **options)

    # 4. output projection
    out = concat if w_out is None else _core.linear(concat, w_out, b_out)
    raw = None
    if trace:
        # what the backward needs too: the options and the head counts
        raw = dict(q=q, k=k, v=v, weights=weights, concat=concat, output=out, **staged,
                   **(rotated or {}), _options=options, _heads=(H, Hkv),
                   _qkv=qkv if fused is not None else None)
    if not need_weights:
        returned = None
    else:
        returned = staged["dropped_weights"] if dropout else weights
    return out, returned, raw, ran


def _param_grads(x, dy, dw, db):
    """The parameters' gradients of y = x w^T + b from dy (N, M, O) and x
    (N, M, K): dw = sum_n dy[n]^T x[n] and db = sum dy, into the given arrays
    (skipped when None)."""
    N, M, O = dy.shape
    if dw is not None and N * M == 0:
        dw[...] = 0                       # no rows (not N empty products)
    elif dw is not None and dy.flags.c_contiguous and x.strides[0] == M * x.strides[1]:
        # the batch continues the rows: one product over all N * M rows
        _core.linear(dy.reshape(1, N * M, O).transpose(0, 2, 1), x.reshape(N * M, -1).T,
                     out=dw[None])
    elif dw is not None:
        for n in range(N):
            _core.linear(dy[n].T[None], x[n].T, out=dw[None], accumulate=n > 0)
    if db is not None:
        db[...] = dy.sum(axis=(0, 1))


def _layer_backward(query, key, value, proj, raw, grad_output, w_out, g_proj, g_wout, g_bout,
                    g_bias_kv, g_fused=None):
    """The layer's gradients, step by step back through _layer_forward.

    Parameter gradients are written into the arrays of g_proj = (g_wq, g_wk,
    g_wv, g_bq, g_bk, g_bv), g_wout, g_bout and g_bias_kv (g_fused: the whole
    (in_proj_weight, in_proj_bias) gradients, of which g_proj's are views);
    returns the gradients of query, key and value.
    """
    w_q, w_k, w_v = proj[:3]
    g_wq, g_wk, g_wv, g_bq, g_bk, g_bv = g_proj
    H, Hkv = raw["_heads"]
    q, k, v, concat, qkv = raw["q"], raw["k"], raw["v"], raw["concat"], raw["_qkv"]
    ctx = raw["_options"]
    S = key.shape[1]

    # 3. output projection
    dconcat = _core.linear(grad_output, w_out.T)
    _param_grads(concat, grad_output, g_wout, g_bout)

    # 2. attention (and the rotary embedding): each head's gradients into its columns of dq, dk, dv (of
    # one buffer when one product made q, k and v: then one product makes
    # in_proj_weight's gradient too)
    if qkv is not None and g_fused is not None:
        dqkv = np.empty_like(qkv)
        dq, dk, dv = (dqkv[..., :q.shape[2]], dqkv[..., q.shape[2]:q.shape[2] + k.shape[2]],
                      dqkv[..., q.shape[2] + k.shape[2]:])
    else:
        dqkv = None
        dq, dk, dv = np.empty_like(q), np.empty(k.shape, q.dtype), np.empty(v.shape, q.dtype)
    qh, kh = raw.get("q_rotated"), raw.get("k_rotated")
    if qh is None:
        qh, kh = _split(q, H), _split(k, Hkv)
    dqh, dkh = _split(dq, H), _split(dk, Hkv)
    # without dropout, the forward's lse and head outputs spare the tiled
    # backward its forward pass; with dropout, the weights are read
    saved = {} if raw.get("lse") is None else dict(output=_split(concat, H), lse=raw["lse"])
    _core.sdpa_backward(
        _split(dconcat, H), qh, kh, _split(v, Hkv),
        weights=raw["weights"] if ctx["dropout_p"] > 0 else None,
        grads=(dqh, dkh, _split(dv, Hkv)), **saved, **ctx)
    if "_rope" in raw:
        # the rotation's transpose is its inverse: turn the gradients back
        rope, pos_q, pos_k = raw["_rope"]
        rope(dqh, pos_q, inverse=True, out=dqh)
        rope(dkh, pos_k, inverse=True, out=dkh)

    # bias_k, bias_v: the sums of the key / value gradients at row S
    if g_bias_kv is not None:
        g_bias_kv[0][...] = dk[:, S].sum(axis=0)
        g_bias_kv[1][...] = dv[:, S].sum(axis=0)

    # 1. input projections (the first S rows of dk, dv: the appended rows have no input)
    if dqkv is not None:
        _param_grads(query, dqkv, *g_fused)
    else:
        _param_grads(query, dq, g_wq, g_bq)
        _param_grads(key, dk[:, :S], g_wk, g_bk)
        _param_grads(value, dv[:, :S], g_wv, g_bv)
    return (_core.linear(dq, w_q.T), _core.linear(dk[:, :S], w_k.T),
            _core.linear(dv[:, :S], w_v.T))

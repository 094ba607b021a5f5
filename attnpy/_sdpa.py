"""scaled_dot_product_attention and causal_mask: signatures, defaults, docs.

The computation is in the C core (csrc/); this module only names things.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import numpy as np

from . import _args, _core, _repr

_new_tuple = tuple.__new__

__all__ = ["AttentionResult", "AttentionGradients", "BackwardTrace", "scaled_dot_product_attention",
           "scaled_dot_product_attention_backward", "causal_mask", "alibi_slopes"]


class _AttentionFields(NamedTuple):
    output: np.ndarray
    weights: Optional[np.ndarray]


class AttentionResult(_AttentionFields, _repr.Ran):
    """What an attention call returns; unpacks as ``output, weights``.

    Attributes
    ----------
    output : ndarray, shape (..., Hq, L, Ev)
        The attention output.
    weights : ndarray, shape (..., Hq, L, S), or None
        The softmax attention weights of every head (not averaged), as the
        core wrote them. None when called with ``need_weights=False``.
    kernel : str
        The kernel that computed them (``'avx512'``, ``'reference'``, ...),
        and ``kernel_reason`` why (``'use_tiled'``, ``'use_ref:selected'``,
        ``'use_ref:qk_overflow'``, ...).
    lse : ndarray, shape (..., Hq, L), or None
        With ``return_lse=True``: each row's log-sum-exp of the softmax's
        input, ``log(sum_j exp(logits_ij))`` (``-inf`` for a row with every
        key masked), so that ``weights = exp(logits - lse[..., None])``.
        Not a tuple field: ``output, weights = result`` still unpacks.
    """

    @property
    def lse(self):
        return self.__dict__.get("_lse")

    def __repr__(self):
        return _repr.short_repr(self, self._fields)

    def _repr_html_(self):
        return _repr.html_repr(self, self._fields, self.weights)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                 is_causal=False, scale=None, enable_gqa=False, *,
                                 need_weights=True, out=None, attn_bias=None, query_offset=0,
                                 window=None, alibi_slopes=None,
                                 seed=None, return_lse=False) -> AttentionResult:
    r"""Scaled dot-product attention, with the weight maps.

    Computes, for every batch index and head,

    .. math:: \mathrm{softmax}(\mathrm{scale} \cdot Q K^T + M) \, V

    with the same arguments and meanings as
    ``torch.nn.functional.scaled_dot_product_attention``, so one set of
    arguments can be passed to both. Inputs are read in place, whatever their
    strides (transposed, sliced, broadcast views): no copy is ever made.

    Parameters
    ----------
    query : array_like, shape (..., Hq, L, E)
        Queries. At least 2-D: a 2-D ``(L, E)`` query is one head, no batch.
    key : array_like, shape (..., H, S, E)
        Keys.
    value : array_like, shape (..., H, S, Ev)
        Values. The leading dimensions of query, key and value broadcast
        against each other as in ``np.matmul``.
    attn_mask : array_like, optional, broadcastable to (..., Hq, L, S)
        bool: **True = attend** (as in torch's SDPA; note that
        ``torch.nn.MultiheadAttention`` uses the opposite polarity).
        float (same dtype as query): added to the scores, e.g. 0 / -inf from
        :func:`causal_mask`.
    dropout_p : float, default 0.0
        Dropout on the weights, as torch: each (query, key) weight is zeroed
        with probability ``dropout_p`` and the kept ones are scaled by
        ``1 / (1 - dropout_p)``. The returned ``weights`` are the softmax
        before dropout. Which keys are dropped is a function of ``seed`` and
        the element's index only (the same on every kernel and thread count).
    is_causal : bool, default False
        Hide the keys after each query's position: query ``i`` (at position
        ``query_offset + i``) sees keys ``j <= query_offset + i``. With
        ``query_offset=0`` this is torch's top-left ``ones(L, S).tril()``.
        Cannot be combined with ``attn_mask`` (as in torch); combines with
        ``attn_bias``, ``window`` and ``alibi_slopes``.
    scale : float, optional
        Multiplies :math:`QK^T`. Default ``1 / sqrt(E)``.
    enable_gqa : bool, default False
        Grouped-query attention: query head ``h`` uses key/value head
        ``h // (Hq // H)``; ``Hq`` must be a multiple of ``H``. Without it the
        head axis broadcasts like any batch axis.
    need_weights : bool, default True
        Return the weights. With False, keys are streamed with an online
        softmax and no ``L x S`` buffer is allocated at all.
    out : ndarray, shape (..., Hq, L, Ev), optional
        C-contiguous array of the output's dtype that receives the output.
    attn_bias : ndarray, broadcastable to (..., Hq, L, S), optional
        Float array of the query's dtype added to the scaled scores (after
        ``scale``, as a float ``attn_mask``), e.g. T5's relative position
        bias. Combines with ``attn_mask`` (a padding mask), ``is_causal``,
        ``window`` and ``alibi_slopes``.
    query_offset : int, default 0
        Positions: key ``j`` sits at position ``j``, query ``i`` at
        ``query_offset + i``. ``query_offset = S - L`` aligns the causal mask
        bottom-right (decoding with a key/value cache). ``window`` and
        ``alibi_slopes`` use the same positions.
    window : (int, int), optional
        ``(left, right)``, both >= 0: a query at position ``p`` sees only the
        keys at positions ``p - left .. p + right``. Mistral's
        ``sliding_window=w`` is ``window=(w - 1, 0)`` with ``is_causal=True``.
        Keys out of reach are never scored: the cost is O(L (left + right)).
    alibi_slopes : array_like, shape (Hq,) or broadcastable to (..., Hq), optional
        ALiBi (Press et al.): ``-slope[h] * |pos_q - pos_k|`` is added to head
        ``h``'s scaled scores, computed in the kernel (no L x S buffer). See
        :func:`attnpy.alibi_slopes`. Taken as float64.
    seed : int, optional
        The dropout generator's seed; None draws a fresh one.
    return_lse : bool, default False
        Also keep each row's log-sum-exp, ``result.lse`` of shape
        ``(..., Hq, L)``: with ``result.output`` it is what
        :func:`scaled_dot_product_attention_backward` needs to skip running
        the forward again (as torch's autograd saves them).

    Returns
    -------
    AttentionResult
        ``(output, weights)``: ``output`` of shape ``(..., Hq, L, Ev)``,
        ``weights`` of shape ``(..., Hq, L, S)`` or None; ``result.lse``
        of shape ``(..., Hq, L)`` with ``return_lse=True``, else None.

    Notes
    -----
    A query row whose keys are all masked gets zero weights and a zero
    output row (as torch's SDPA since 2.5), never NaN. A key whose weight is
    exactly zero does not read its value row.

    dtypes: float32 or float64, the same for query, key and value; a float
    mask has that dtype too. Array-likes that are not ndarrays (lists) are
    converted; an ndarray of another dtype raises ``TypeError`` rather than
    being copied.

    Examples
    --------
    >>> import numpy as np, attnpy
    >>> x = np.random.default_rng(0).standard_normal((4, 8), dtype=np.float32)
    >>> out, weights = attnpy.scaled_dot_product_attention(x, x, x, is_causal=True)
    >>> out.shape, weights.shape
    ((4, 8), (4, 4))
    """
    # fast paths first: this is the per-call overhead of every lesson-sized call
    if not type(query) is type(key) is type(value) is np.ndarray:
        query, key, value = _args.float_inputs((query, key, value), ("query", "key", "value"))
    extra = None   # the keywords beyond torch's, for the core; None when all at defaults
    if not (type(dropout_p) is float or type(dropout_p) is int) or dropout_p != 0:
        p, seed = _dropout_seed(dropout_p, seed, "forward")
        if p:
            extra = {"dropout_p": p, "seed": seed}
    if not (type(query_offset) is int and query_offset == 0 and window is None
            and alibi_slopes is None):
        extra = {**(extra or {}), **_positions(query, query_offset, window, alibi_slopes)}
    if out is not None:
        if not isinstance(out, np.ndarray):
            raise TypeError(f"out must be a NumPy array; got {type(out).__name__}")
        if out.dtype != query.dtype or not out.dtype.isnative:
            raise TypeError(f"out must have dtype {query.dtype} like query; got {out.dtype}")
        if not (out.flags.c_contiguous and out.flags.aligned):
            raise ValueError("out must be a C-contiguous, aligned array")
    is_causal = True if is_causal else False
    if scale is None:   # the default, 1/sqrt(E), written out: this path is every call's
        E = query.shape[-1] if query.ndim else 0
        scale = 1.0 / math.sqrt(E) if E else math.inf
    if type(scale) is not float:
        scale = _args.scale_of(scale, query)
    need_weights = True if need_weights else False
    try:
        if attn_mask is None and out is None and not enable_gqa and extra is None and \
                attn_bias is None and not return_lse:
            # options at their defaults are left out: each keyword passed costs time
            if is_causal:
                output, weights, _, ran = _core.sdpa(query, key, value, scale=scale, is_causal=True,
                                                need_weights=need_weights)
            else:
                output, weights, _, ran = _core.sdpa(query, key, value, scale=scale,
                                                need_weights=need_weights)
        else:
            output, weights, stages, ran = _core.sdpa(
                query, key, value, scale=scale,
                masks=_masks(query, attn_mask, is_causal, attn_bias),
                is_causal=is_causal, enable_gqa=True if enable_gqa else False,
                need_weights=need_weights, out=out, need_lse=True if return_lse else False,
                **(extra or {}))
            if return_lse:
                lse = stages["lse"][..., 0]   # the core's (..., Hq, L, 1), as a view
    except MemoryError as e:
        raise _out_of_memory(e, need_weights) from None
    result = _new_tuple(AttentionResult, (output, weights))  # no NamedTuple __new__: faster
    result._ran = ran
    if return_lse:
        result._lse = lse
    return result


def _saved_statistics(output, lse, grad_output, query):
    """The backward's output= and lse= checked and explained, as keywords
    for the core (lse with the core's trailing axis of 1); {} for neither."""
    if output is None and lse is None:
        return {}
    if output is None or lse is None:
        given, missing = ("output", "lse") if lse is None else ("lse", "output")
        raise ValueError(f"{given} is given without {missing}: pass both (the forward's "
                         f"result.output and result.lse, from return_lse=True) or neither")
    for name, arr, shape in (("output", output, grad_output.shape),
                             ("lse", lse, grad_output.shape[:-1])):
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"{name} must be a NumPy array (the forward's result.{name}); "
                            f"got {type(arr).__name__}")
        if arr.dtype != query.dtype:
            raise TypeError(f"{name} must have dtype {query.dtype} like query; got {arr.dtype}")
        if arr.shape != shape:
            raise ValueError(f"{name} must have shape {shape} (grad_output's"
                             f"{'' if name == 'output' else ' without its last axis'}); "
                             f"got {arr.shape}")
    return {"output": output, "lse": lse[..., None]}


def _out_of_memory(e, need_weights):
    """NumPy's "Unable to allocate 128. GiB", with what a student can do."""
    hint = (": the weights are one (L, S) map per head; pass need_weights=False to "
            "compute the output without them (no L x S buffer at all)") if need_weights else ""
    return MemoryError(f"{e}{hint}")


def _masks(query, attn_mask, is_causal, attn_bias=None):
    """SDPA's attn_mask and attn_bias for the core: a tuple of (array, kind, name)."""
    masks = ()
    if attn_mask is not None:
        if is_causal:
            raise ValueError("attn_mask and is_causal=True cannot both be given (torch raises "
                             "too); pass the causal mask in attn_mask (see attnpy.causal_mask) "
                             "or use is_causal alone")
        masks = (_args.mask(attn_mask, "attn_mask", _args.float_dtype(query), "attend"),)
    if attn_bias is not None:
        bias = _args.mask(attn_bias, "attn_bias", _args.float_dtype(query), "attend")
        if bias[1] != "add":
            raise TypeError(f"attn_bias must be a float array of the query's dtype "
                            f"({_args.float_dtype(query)}), added to the scores; got bool "
                            f"(a bool mask goes in attn_mask)")
        masks += (bias,)
    return masks


def _positions(query, query_offset, window, alibi_slopes):
    """The core's keywords for query_offset, window and alibi_slopes, checked."""
    options = {}
    if not (type(query_offset) is int and query_offset == 0):
        options["query_offset"] = _args.position(query_offset, "query_offset")
    if window is not None:
        try:
            left, right = window
        except (TypeError, ValueError):
            raise TypeError(f"window must be None or a pair (left, right) of ints; got "
                            f"{window!r}") from None
        options["window"] = (_args.position(left, "window's left side"),
                             _args.position(right, "window's right side"))
    if alibi_slopes is not None:
        slopes = np.asarray(alibi_slopes)
        if slopes.dtype.kind not in "fiu" or slopes.dtype.kind == "b":
            raise TypeError(f"alibi_slopes must be a float array of shape (Hq,) or "
                            f"broadcastable to (..., Hq); got dtype {slopes.dtype}")
        # the slopes are Hq numbers: taken as float64 (a copy of Hq values at most)
        slopes = slopes.astype(np.float64, copy=False)
        if not np.all(np.isfinite(slopes)):
            raise ValueError("alibi_slopes must be finite")
        if query.ndim == 2 and slopes.size == 1 and slopes.ndim <= 1:
            slopes = slopes.reshape(())      # one head, no head axis
        if not slopes.flags.aligned:
            slopes = slopes.copy()
        options["alibi_slopes"] = slopes
    return options


def _dropout_seed(dropout_p, seed, who):
    """(p, seed) for the core: dropout_p checked, seed drawn when None."""
    p = _args.real(dropout_p, "dropout_p", "a float")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1]; got {dropout_p!r}")
    if p == 0.0:
        return 0.0, 0
    if seed is None:
        if who == "backward":
            raise ValueError("dropout_p > 0 in the backward needs the forward's seed "
                             "(seed=...): the dropped keys are recomputed from it")
        seed = int(np.random.SeedSequence().generate_state(1, np.uint64)[0])
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int or None; got {type(seed).__name__}")
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64); got {seed}")
    return p, int(seed)


def causal_mask(L, S=None, *, align="top_left", dtype=np.float32):
    """An additive causal mask: 0 where attending is allowed, -inf elsewhere.

    Additive float masks mean the same in every API (SDPA and
    MultiheadAttention alike), unlike bool masks, whose polarity differs.

    Parameters
    ----------
    L : int
        Number of queries.
    S : int, optional
        Number of keys; default ``L``.
    align : {"top_left", "bottom_right"}
        ``"top_left"``: query ``i`` sees keys ``j <= i`` (torch's
        ``is_causal``). ``"bottom_right"``: query ``i`` sees keys
        ``j <= i + S - L``, the last query seeing every key -- what decoding
        with a key/value cache needs (torch's ``causal_lower_right``).
    dtype : float32 or float64
        The mask's dtype; it must match the query's.

    Returns
    -------
    ndarray, shape (L, S)
    """
    if S is None:
        S = L
    L, S = _size("L", L), _size("S", S)
    if align not in ("top_left", "bottom_right"):
        raise ValueError(f"align must be 'top_left' or 'bottom_right'; got {align!r}")
    dtype = _args.dtype_arg(dtype)
    if L * S * dtype.itemsize >= 2**63:
        raise ValueError(f"L x S = {L} x {S} is too large for one array of {dtype}")
    mask = np.zeros((L, S), dtype=dtype)   # first: too large is a MemoryError before any index
    if mask.size == 0:
        return mask                           # no L-long index for an empty mask
    offset = 0 if align == "top_left" else S - L
    i = np.arange(L)[:, None]
    j = np.arange(S)[None, :]
    mask[j > i + offset] = -np.inf
    return mask


def alibi_slopes(num_heads):
    """The ALiBi slopes of Press et al. (2022) for ``num_heads`` heads.

    For a power of two ``n``, head ``h`` (from 0) gets ``2**(-8 (h + 1) / n)``.
    Otherwise (the recipe BLOOM uses) the ``n`` heads of the largest power of
    two below ``num_heads`` get those, and the others every second slope of
    ``2 n`` heads: ``2**(-4 (2 i + 1) / n)`` for ``i = 0, 1, ...``.

    Parameters
    ----------
    num_heads : int
        The number of query heads, >= 1.

    Returns
    -------
    ndarray, shape (num_heads,), float64
        Pass it as ``alibi_slopes=`` to :func:`scaled_dot_product_attention`.
    """
    H = _size("num_heads", num_heads)
    if H < 1:
        raise ValueError(f"num_heads must be >= 1; got {num_heads}")
    n = 1 << (H.bit_length() - 1)                       # the largest power of two <= H
    slopes = 2.0 ** (-8.0 * np.arange(1, n + 1) / n)
    extra = 2.0 ** (-4.0 * np.arange(1, 2 * (H - n), 2) / n)
    return np.concatenate([slopes, extra])


def _size(name, n):
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"{name} must be an int; got {type(n).__name__}")
    if n < 0:
        raise ValueError(f"{name} must be >= 0; got {n}")
    if n > _args.MAX_EXTENT:
        raise ValueError(f"{name} is {n}; attnpy supports dimensions up to 2**31 - 1")
    return int(n)



class BackwardTrace(NamedTuple):
    """What the backward pass computed on the way to the input gradients.

    Attributes
    ----------
    grad_weights : ndarray, shape (..., Hq, L, S)
        dLoss/dP, P the softmax weights: ``grad_output @ value.T`` (with the
        dropout mask applied when there was dropout).
    grad_scores : ndarray, shape (..., Hq, L, S)
        dLoss/dS, S the softmax's input (the scaled, masked scores): the
        softmax's Jacobian applied, ``P * (grad_weights - sum(P * grad_weights))``.
    """

    grad_weights: np.ndarray
    grad_scores: np.ndarray

    def __repr__(self):
        return _repr.short_repr(self, self._fields)


class AttentionGradients(NamedTuple):
    """Gradients of a loss with respect to query, key and value.

    Attributes
    ----------
    query, key, value : ndarray
        Same shapes and dtypes as the inputs (summed over broadcast dims and,
        with grouped-query attention, over the query heads of a key/value head).
    trace : BackwardTrace or None
    """

    query: np.ndarray
    key: np.ndarray
    value: np.ndarray
    trace: Optional[BackwardTrace]

    def __repr__(self):
        return _repr.short_repr(self, self._fields)


def scaled_dot_product_attention_backward(grad_output, query, key, value, attn_mask=None,
                                          is_causal=False, scale=None, enable_gqa=False, *,
                                          weights=None, trace=False, attn_bias=None,
                                          query_offset=0, window=None, alibi_slopes=None,
                                          dropout_p=0.0, seed=None, output=None,
                                          lse=None) -> AttentionGradients:
    r"""The backward pass of :func:`scaled_dot_product_attention`.

    With :math:`S = \mathrm{scale}\, Q K^T + M`, :math:`P = \mathrm{softmax}(S)`,
    :math:`O = P V` and :math:`dO` = ``grad_output``:

    .. math::
        dV = P^T dO,\quad dP = dO\, V^T,\quad
        dS = P \odot (dP - \mathrm{rowsum}(P \odot dP)),\quad
        dQ = \mathrm{scale}\; dS\, K,\quad dK = \mathrm{scale}\; dS^T Q

    Parameters
    ----------
    grad_output : array_like, shape (..., Hq, L, Ev)
        The gradient of the loss with respect to the attention output.
    query, key, value, attn_mask, is_causal, scale, enable_gqa
        Exactly as given to the forward call.
    attn_bias, query_offset, window, alibi_slopes, dropout_p, seed
        Exactly as given to the forward call too (with ``dropout_p > 0``,
        ``seed`` must be the forward's: the dropped keys are recomputed).
        ``attn_bias`` gets no gradient here: its gradient is ``trace=True``'s
        ``grad_scores`` summed over its broadcast dims.
    weights : ndarray, shape (..., Hq, L, S), optional
        The forward's weights. Without them the softmax is recomputed row by
        row (memory O(S) per thread, no L x S buffer); with them it is read.
        Both give the same gradients to rounding.
    trace : bool, default False
        Also return the gradients of the weights and of the scores.
    output : ndarray, shape (..., Hq, L, Ev), optional
    lse : ndarray, shape (..., Hq, L), optional
        The forward's ``output`` and ``lse`` (``return_lse=True``), both or
        neither, of the query's dtype: the saved statistics. With them the
        tiled kernels take each row's softmax from ``lse``
        (``P = exp(S - lse)``) and ``rowsum(P * dP)`` from ``output``
        (``rowsum(dO * O)``) instead of running the forward again: five block
        products per pair of tiles instead of seven, as torch's autograd.
        They must be this forward's; the reference kernel (weights given,
        dropout, ``trace``) recomputes and does not read them.

    Returns
    -------
    AttentionGradients
        ``query``, ``key``, ``value`` with the inputs' shapes and dtypes;
        ``trace`` (a :class:`BackwardTrace`) or None.

    Notes
    -----
    A fully masked row has zero weights, so it passes no gradient: its rows
    of ``query``'s gradient are zero, and it adds nothing to ``key`` and
    ``value``'s. Keys with zero weight get no gradient from that row.
    """
    if not type(query) is type(key) is type(value) is np.ndarray:
        query, key, value = _args.float_inputs((query, key, value), ("query", "key", "value"))
    # array-likes given for what the forward returned take the query's dtype
    if not isinstance(grad_output, np.ndarray):
        grad_output = _args.convert(grad_output, "grad_output", _args.float_dtype(query))
    if weights is not None and not isinstance(weights, np.ndarray):
        weights = _args.convert(weights, "weights", _args.float_dtype(query))
    saved = _saved_statistics(output, lse, grad_output, query)
    is_causal = True if is_causal else False
    p, seed = _dropout_seed(dropout_p, seed, "backward")
    gq, gk, gv, gw, gs = _core.sdpa_backward(
        grad_output, query, key, value, scale=_args.scale_of(scale, query),
        masks=_masks(query, attn_mask, is_causal, attn_bias),
        is_causal=is_causal, enable_gqa=bool(enable_gqa), weights=weights, trace=bool(trace),
        dropout_p=p, seed=seed, **saved, **_positions(query, query_offset, window, alibi_slopes))
    return AttentionGradients(gq, gk, gv, BackwardTrace(gw, gs) if trace else None)

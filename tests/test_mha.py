"""The multi-head layer, attnpy.MultiheadAttention.

1. Parity with torch.nn.MultiheadAttention (eval mode), from_torch, state
   dicts, initialisation and errors (below);
2. what goes beyond torch's layer -- grouped-query heads, dropout, the
   trace's guarantees, the textbook self_attention -- against the float64
   NumPy reference (reference.py);
(the regressions that called the removed private entry points
_core.multihead_attention(_backward) now target the layer's composition, in
test_boundary.py).

Parity with torch.nn.MultiheadAttention (eval mode):

Every case builds a torch module with random parameters (normal, std 0.5, so
that every bias is non-zero), converts it with ``from_torch`` and compares

- the result's output and weights with the torch module's own call, and
- every trace stage with the same stage computed here with torch ops from the
  module's parameters (``torch_stages``), in the module's dtype. That
  stage-by-stage computation is itself checked against the module's output.

Tolerances: float32 atol = rtol = 1e-5, float64 1e-12. Besides torch in the
same dtype, attnpy is held to the same tolerance against the exact value: the
stages computed in float64 from the very same float32 numbers. A float32
comparison with torch that fails passes only if torch is the one further from
that exact value (torch's own float32 rounding, seen with E = 64); those cases
are listed in the JSON report under "torch_float32_rounding".

Fully masked rows are the one intended difference: attnpy gives zero weights
there (torch: NaN). They are left out of the comparisons with the module,
the stage reference sets them to zero, and attnpy's are checked to be
exactly zero.

The matrix is a seeded random sample plus targeted cases, so that every value
of every option appears with both dtypes (test_matrix_covers_every_option).
The largest error of each stage per dtype goes to ERRORS_JSON at the end of
the module.
"""
import copy
import json
import math
import warnings
import zlib
from dataclasses import dataclass, replace

import numpy as np
import pytest

import attnpy
from optional_torch import F, torch
from reference import mha_reference, self_attention_reference

TOL = {
    np.float32: dict(atol=1e-5, rtol=1e-5),
    np.float64: dict(atol=1e-12, rtol=1e-12),
}
DTYPES = (np.float32, np.float64)
TORCH_DTYPE = {np.float32: torch.float32, np.float64: torch.float64} if torch else {}
ERRORS_JSON = "/tmp/attnpy_mha_errors.json"
PARAM_STD = 0.5

STAGES = ("q", "k", "v", "scores", "logits", "weights", "head_outputs", "concat", "output")
MASKS = ("none", "bool2d", "float2d", "bool3d", "float3d", "bool4d", "float4d", "causal")
KPMS = ("none", "bool", "float")
KV_DIMS = ("same", "kdim", "vdim", "both")


# --------------------------------------------------------------------------
# the error record, written once at the end of the module

ERRORS = {}              # dtype -> stage -> max errors
TORCH_ROUNDING = []      # float32 comparisons where torch, not attnpy, was off


def record(dtype, stage, actual, desired):
    """Keep the largest |actual - desired| (finite entries) and the largest |desired|."""
    a = np.asarray(actual, dtype=np.float64)
    d = np.asarray(desired, dtype=np.float64)
    both = np.isfinite(a) & np.isfinite(d)
    err = float(np.abs(a[both] - d[both]).max(initial=0.0))
    mag = float(np.abs(d[both]).max(initial=0.0))
    entry = ERRORS.setdefault(np.dtype(dtype).name, {}).setdefault(
        stage, {"max_abs_err": 0.0, "max_abs_value": 0.0, "compared": 0})
    entry["max_abs_err"] = max(entry["max_abs_err"], err)
    entry["max_abs_value"] = max(entry["max_abs_value"], mag)
    entry["compared"] += 1


@pytest.fixture(scope="module", autouse=True)
def write_errors_json():
    yield
    report = {"tolerances": {np.dtype(d).name: TOL[d] for d in DTYPES},
              "what": "max |attnpy - torch| per stage: trace stages vs torch ops on the "
                      "module's parameters in the same dtype, module_* vs the torch "
                      "module's own call (fully masked rows excluded); '<stage>."
                      "vs_float64_exact': vs the same computation in float64 from the "
                      "same numbers (equal to the plain entry for float64)",
              "max_abs_errors": ERRORS,
              "torch_float32_rounding": TORCH_ROUNDING}
    with open(ERRORS_JSON, "w") as f:
        json.dump(report, f, indent=2, sort_keys=True)


def assert_close(actual, desired, dtype, what):
    """allclose at the dtype's tolerance (-inf must match -inf, NaN fails)."""
    actual, desired = np.asarray(actual), np.asarray(desired)
    assert actual.shape == desired.shape, f"{what}: shape {actual.shape} != {desired.shape}"
    np.testing.assert_allclose(actual, desired, **TOL[dtype], err_msg=what)


# --------------------------------------------------------------------------
# the cases


@dataclass(frozen=True)
class Case:
    tag: str
    dtype: type
    cross: bool
    kv_dims: str          # KV_DIMS; only for cross-attention
    bias: bool
    bias_kv: bool
    zero_attn: bool
    batch_first: bool
    unbatched: bool
    attn_mask: str        # MASKS; "causal": a causal bool mask and is_causal=True
    kpm: str              # KPMS
    need_weights: bool
    average: bool
    E: int
    H: int
    N: int
    L: int
    S: int

    @property
    def kdim(self):
        return self.E if self.kv_dims in ("same", "vdim") else self.E + 3

    @property
    def vdim(self):
        return self.E if self.kv_dims in ("same", "kdim") else 2 * self.E - 1

    @property
    def is_causal(self):
        return self.attn_mask == "causal"

    @property
    def id(self):
        parts = [self.tag, np.dtype(self.dtype).name,
                 ("cross" if self.cross else "self") + ("" if self.kv_dims == "same"
                                                        else "_" + self.kv_dims),
                 "bias" if self.bias else "nobias"]
        parts += ["biaskv"] * self.bias_kv + ["zeroattn"] * self.zero_attn
        parts += ["unbatched" if self.unbatched else
                  ("bfirst" if self.batch_first else "seqfirst"),
                  f"am_{self.attn_mask}", f"kpm_{self.kpm}",
                  ("weights_avg" if self.average else "weights_heads")
                  if self.need_weights else "noweights",
                  f"E{self.E}H{self.H}N{self.N}L{self.L}S{self.S}"]
        return "-".join(parts)


HEADS = {8: (1, 2, 4, 8), 12: (1, 2, 3, 4, 6), 16: (2, 4, 8), 32: (4, 8), 64: (4, 16)}
FIELD_VALUES = {
    "dtype": DTYPES, "cross": (False, True), "kv_dims": KV_DIMS, "bias": (False, True),
    "bias_kv": (False, True), "zero_attn": (False, True), "batch_first": (False, True),
    "unbatched": (False, True), "attn_mask": MASKS, "kpm": KPMS,
    "need_weights": (False, True), "average": (False, True),
}


def consistent(case):
    """Fix the fields that depend on others (self-attention: S = L, kv dims = E)."""
    if case.kv_dims != "same" and not case.cross:
        case = replace(case, cross=True)
    if not case.cross:
        case = replace(case, S=case.L)
    elif case.S == case.L:
        case = replace(case, S=case.L + 2)
    if case.unbatched:
        case = replace(case, N=1)
    return case


def random_case(rng, tag, **fixed):
    def pick(values):
        return values[rng.integers(len(values))]

    E = pick(tuple(HEADS))
    fields = {name: pick(values) for name, values in FIELD_VALUES.items()}
    fields["kv_dims"] = pick(KV_DIMS) if fields["cross"] else "same"
    fields.update(E=E, H=pick(HEADS[E]), N=int(rng.integers(1, 4)), L=int(rng.integers(1, 7)),
                  S=int(rng.integers(1, 8)))
    fields.update(fixed)
    return consistent(Case(tag=tag, **fields))


def build_cases(n_random=200, seed=20240611):
    rng = np.random.default_rng(seed)
    cases = [random_case(rng, f"r{i:03d}") for i in range(n_random)]
    # targeted: every value of every option, with each dtype
    for dtype in DTYPES:
        dt = np.dtype(dtype).name[-2:]
        for name, values in FIELD_VALUES.items():
            if name == "dtype":
                continue
            for value in values:
                cases.append(random_case(rng, f"t{dt}_{name}_{value}", dtype=dtype,
                                         **{name: value}))
        # both masks together, every kind of each
        for am in MASKS[1:]:
            for kpm in KPMS[1:]:
                cases.append(random_case(rng, f"t{dt}_both", dtype=dtype, attn_mask=am, kpm=kpm))
        # configurations where torch's module takes its fast path (native MHA kernel)
        for am in ("none", "bool2d", "bool3d", "causal"):
            for nw in (False, True):
                cases.append(random_case(
                    rng, f"t{dt}_fastpath", dtype=dtype, cross=False, kv_dims="same",
                    bias=True, bias_kv=False, zero_attn=False, batch_first=True,
                    unbatched=False, attn_mask=am, kpm=("none", "bool")[nw], need_weights=nw,
                    E=16, H=4))
        # longer sequences: several tiles of keys and queries for the float32 kernels
        for i in range(12):
            cases.append(random_case(rng, f"t{dt}_long{i}", dtype=dtype,
                                     L=int(rng.integers(9, 40)), S=int(rng.integers(9, 80))))
    return cases


CASES = build_cases()


# --------------------------------------------------------------------------
# building one case: the torch module, the inputs, the masks


def seeded_rng(*parts):
    return np.random.default_rng(zlib.crc32("|".join(map(str, parts)).encode()))


def make_module(case, seed):
    """A torch MultiheadAttention of the case's configuration with random parameters."""
    torch.manual_seed(seed)
    m = torch.nn.MultiheadAttention(
        case.E, case.H, bias=case.bias, add_bias_kv=case.bias_kv,
        add_zero_attn=case.zero_attn,
        kdim=None if case.kv_dims == "same" else case.kdim,
        vdim=None if case.kv_dims == "same" else case.vdim,
        batch_first=case.batch_first, dtype=TORCH_DTYPE[case.dtype])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, PARAM_STD, generator=g)
    return m.eval()


def random_mask(rng, kind, shape, dtype):
    """bool (True = NOT allowed) or float (added, some -inf); sometimes a fully masked row."""
    if kind == "bool":
        m = rng.random(shape) < 0.3
    else:
        m = 2.0 * rng.standard_normal(shape)
        m[rng.random(shape) < 0.15] = -np.inf
        m = m.astype(dtype)
    if rng.random() < 0.4:  # a dead row
        rows = m.reshape(-1, shape[-1])
        rows[rng.integers(len(rows))] = True if kind == "bool" else -np.inf
    return m


def make_masks(case, rng):
    """(attn_mask, key_padding_mask) as attnpy takes them (the batch axis dropped when
    unbatched), and the same as torch tensors."""
    N, H, L, S = case.N, case.H, case.L, case.S
    am = kpm = t_am = t_kpm = None
    if case.attn_mask == "causal":
        am = np.triu(np.ones((L, S), dtype=bool), 1)
        t_am = torch.from_numpy(am)
    elif case.attn_mask != "none":
        kind, dims = case.attn_mask[:-2], case.attn_mask[-2:]
        shape = {"2d": (L, S), "3d": (N * H, L, S), "4d": (N, H, L, S)}[dims]
        am = random_mask(rng, kind, shape, case.dtype)
        t_am = torch.from_numpy(am.reshape(N * H, L, S) if dims == "4d" else am.copy())
    if case.kpm != "none":
        kpm = random_mask(rng, case.kpm, (N, S), case.dtype)
        if case.unbatched:
            kpm = kpm[0]
        t_kpm = torch.from_numpy(kpm.copy())
    return am, kpm, t_am, t_kpm


def caller_layout(x, case):
    """(N, T, C) batch-first -> what the caller passes: (T, C) unbatched, (T, N, C)
    sequence-first (a transposed view)."""
    if case.unbatched:
        return x[0]
    return x if case.batch_first else x.swapaxes(0, 1)


def batch_first_view(x, case):
    """The inverse of caller_layout, for outputs (weights are batch-first already)."""
    if case.unbatched:
        return x[None]
    return x if case.batch_first else x.swapaxes(0, 1)


def make_inputs(case):
    rng = seeded_rng(case.id)
    dtype = case.dtype
    q = rng.standard_normal((case.N, case.L, case.E)).astype(dtype)
    if case.cross:
        k = rng.standard_normal((case.N, case.S, case.kdim)).astype(dtype)
        v = rng.standard_normal((case.N, case.S, case.vdim)).astype(dtype)
    else:
        k = v = q
    am, kpm, t_am, t_kpm = make_masks(case, rng)
    return q, k, v, am, kpm, t_am, t_kpm, int(rng.integers(2**31))


# --------------------------------------------------------------------------
# torch side


def torch_masks_4d(case, t_am, t_kpm):
    """torch's canonical masks (bool -> 0 / -inf), as (N, H, L, S) and (N, 1, 1, S)."""
    N, H, L, S = case.N, case.H, case.L, case.S
    tdtype = TORCH_DTYPE[case.dtype]

    def canonical(m):
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=tdtype).masked_fill_(m, -math.inf)
        return m

    am = None if t_am is None else canonical(t_am).reshape(-1, L, S)
    am = None if am is None else (am[None] if am.shape[0] == 1 else am.view(N, H, L, S))
    kpm = None if t_kpm is None else canonical(t_kpm).reshape(N, 1, 1, S)
    return am, kpm


def torch_stages(m, case, query, key, value, t_am, t_kpm):
    """Every stage of the module's forward, with torch ops, batch-first (N, ...).

    Follows F.multi_head_attention_forward: projections with F.linear, bias_k/bias_v
    appended as the last key, heads split with view/transpose, the zero key appended
    per head, masks padded with zeros for those keys and added (attn_mask +
    key_padding_mask), then baddbmm(mask, q * scale, k^T), softmax, @ v, merge,
    out_proj. Fully masked rows (all -inf logits) get zero weights (attnpy's choice).
    """
    N, H, L, S, E = case.N, case.H, case.L, case.S, case.E
    D = E // H
    if m._qkv_same_embed_dim:
        w_q, w_k, w_v = m.in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = m.q_proj_weight, m.k_proj_weight, m.v_proj_weight
    b_q, b_k, b_v = (None,) * 3 if m.in_proj_bias is None else m.in_proj_bias.chunk(3)
    q = F.linear(query, w_q, b_q)
    k = F.linear(key, w_k, b_k)
    v = F.linear(value, w_v, b_v)
    if m.bias_k is not None:
        k = torch.cat([k, m.bias_k.expand(N, 1, E)], dim=1)
        v = torch.cat([v, m.bias_v.expand(N, 1, E)], dim=1)

    def heads(x):
        return x.reshape(N, x.shape[1], H, D).transpose(1, 2)

    q, k, v = heads(q), heads(k), heads(v)
    if m.add_zero_attn:
        zeros = torch.zeros(N, H, 1, D, dtype=q.dtype)
        k = torch.cat([k, zeros], dim=2)
        v = torch.cat([v, zeros], dim=2)
    S1 = k.shape[2]

    am, kpm = torch_masks_4d(case, t_am, t_kpm)
    mask = torch.zeros(N, H, L, S, dtype=q.dtype)
    if am is not None:
        mask = mask + am
    if kpm is not None:
        mask = mask + kpm
    mask = F.pad(mask, (0, S1 - S))

    scale = math.sqrt(1.0 / D)
    scores = q @ k.transpose(-2, -1)
    logits = torch.baddbmm(mask.reshape(N * H, L, S1), (q * scale).reshape(N * H, L, D),
                           k.reshape(N * H, S1, D).transpose(-2, -1)).view(N, H, L, S1)
    dead = torch.isneginf(logits).all(dim=-1)
    weights = torch.softmax(logits, dim=-1).masked_fill(dead[..., None], 0.0)
    head_outputs = weights @ v
    concat = head_outputs.transpose(1, 2).reshape(N, L, E)
    output = F.linear(concat, m.out_proj.weight, m.out_proj.bias)
    stages = dict(q=q, k=k, v=v, scores=scores, logits=logits, weights=weights,
                  head_outputs=head_outputs, concat=concat, output=output)
    return {name: t.detach().numpy() for name, t in stages.items()}, dead.numpy()


def torch_module_call(m, case, q, k, v, t_am, t_kpm):
    """The module's own forward on the caller-layout inputs (torch's fast path
    included when it applies). Returns (output, weights) as NumPy, caller layout."""
    tq = torch.from_numpy(caller_layout(q, case))
    if case.cross:
        tk = torch.from_numpy(caller_layout(k, case))
        tv = torch.from_numpy(caller_layout(v, case))
    else:
        tk = tv = tq  # the same tensor: torch's self-attention fast path can apply
    is_causal = case.is_causal
    if is_causal and (case.bias_kv or case.zero_attn) and not case.need_weights \
            and case.kpm == "none":
        # torch then drops attn_mask and calls SDPA with is_causal=True over the
        # S + 1 (+ 1) keys, which hides the bias_k / zero key from most rows: not what
        # the given mask (padded with an allowed column) says, and not what torch's own
        # need_weights=True path computes. attnpy follows the mask; so does this call.
        # See test_is_causal_with_extra_keys_follows_the_mask.
        is_causal = False
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*mismatched key_padding_mask and attn_mask")
        out, w = m(tq, tk, tv, key_padding_mask=t_kpm, need_weights=case.need_weights,
                   attn_mask=t_am, average_attn_weights=case.average, is_causal=is_causal)
    return out.numpy(), None if w is None else w.numpy()


# --------------------------------------------------------------------------
# the matrix


def run_attnpy(layer, case, q, k, v, am, kpm, **kw):
    query = caller_layout(q, case)
    if case.cross:
        return layer(query, caller_layout(k, case), caller_layout(v, case),
                     key_padding_mask=kpm, attn_mask=am, is_causal=case.is_causal, **kw)
    return layer(query, key_padding_mask=kpm, attn_mask=am, is_causal=case.is_causal, **kw)


def float64_twin(m, case, q, k, v, t_am, t_kpm):
    """The module, inputs and masks converted exactly to float64 (identity for float64)."""
    if case.dtype == np.float64:
        return m, case, q, k, v, t_am, t_kpm

    def up(t):
        return t if t is None or t.dtype == torch.bool else t.double()

    return (copy.deepcopy(m).double(), replace(case, dtype=np.float64),
            *(x.astype(np.float64) for x in (q, k, v)), up(t_am), up(t_kpm))


def assert_close_normwise(actual, exact, dtype, what):
    """Like assert_close, but the absolute tolerance grows with the row.

    A float32 sum of products is off by a few ulps of the sum of |terms|, so an
    output element near 0 in a row whose values reach 60 carries the rounding
    of 60, not of its own size (torch's float32 does the same, by more). Here
    atol is the dtype's atol times max(1, max |row|): unchanged for rows of
    magnitude <= 1 (every weights row), relative to the row above that.
    """
    actual, exact = np.asarray(actual), np.asarray(exact)
    assert actual.shape == exact.shape, f"{what}: shape {actual.shape} != {exact.shape}"
    if actual.ndim == 0:
        assert_close(actual, exact, dtype, what)
        return
    finite = np.where(np.isfinite(exact), np.abs(exact), 0.0)
    row = np.maximum(1.0, finite.max(axis=-1, keepdims=True))
    tol = TOL[dtype]
    bound = tol["atol"] * row + tol["rtol"] * np.abs(exact)
    same_inf = (actual == exact) & ~np.isfinite(exact)
    with np.errstate(invalid="ignore"):  # inf - inf where both are -inf: same_inf
        bad = ~(same_inf | (np.abs(actual.astype(np.float64) - exact) <= bound))
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {bad.size} elements off by more than "
        f"atol*max(1, |row|) + rtol*|x|; worst {np.abs(actual - exact)[bad].max():.3g}")


def assert_close_to_torch(actual, torch_value, exact, dtype, what, stage, case_id):
    """attnpy vs torch in the same dtype, at the dtype's tolerance, normwise per
    row (see assert_close_normwise: both are float32 sums of products).

    ``exact`` is the same computation in float64 from the same (float32) numbers.
    attnpy must always be within tolerance of it. When a float32 comparison with
    torch fails, it still passes only if torch is the one further from the exact
    value (torch's own float32 rounding); such cases are counted in the JSON
    report under "torch_float32_rounding" with both errors.
    """
    record(dtype, stage, actual, torch_value)
    record(dtype, stage + ".vs_float64_exact", actual, exact)
    a, t, x = (np.asarray(y, dtype=np.float64) for y in (actual, torch_value, exact))
    fin = np.isfinite(x)
    a, t, x = a[fin], t[fin], x[fin]
    errors = dict(attnpy_err_vs_float64=float(np.abs(a - x).max(initial=0.0)),
                  torch_err_vs_float64=float(np.abs(t - x).max(initial=0.0)),
                  max_abs_diff_vs_torch=float(np.abs(a - t).max(initial=0.0)),
                  max_abs_value=float(np.abs(x).max(initial=0.0)))
    try:
        assert_close_normwise(actual, exact, dtype, f"{what} vs the float64 exact value")
    except AssertionError as e:
        # A float32 pipeline (projections, then products of their rounded
        # outputs) can miss any fixed bound where a dot product cancels; then
        # attnpy must be about as accurate as torch's float32 at this stage.
        # "About": within 3x of torch's error. Over a handful of elements the
        # worst errors of two independent float32 pipelines differ by chance
        # (the largest ratio seen over this matrix was 2.2, scores of r033).
        like_torch = (dtype == np.float32 and errors["attnpy_err_vs_float64"]
                      <= 3 * errors["torch_err_vs_float64"])
        if not like_torch:
            raise AssertionError(f"{e}\nfor comparison, max errors vs the float64 value: "
                                 f"attnpy {errors['attnpy_err_vs_float64']:.3g}, torch "
                                 f"{errors['torch_err_vs_float64']:.3g}; "
                                 f"max |value| {errors['max_abs_value']:.3g}") from None
        TORCH_ROUNDING.append(dict(case=case_id, stage=stage, check="vs_float64", **errors))
    try:
        assert_close_normwise(actual, torch_value, dtype, f"{what} vs torch")
    except AssertionError:
        if dtype != np.float32:
            raise
        assert errors["attnpy_err_vs_float64"] <= errors["torch_err_vs_float64"], (
            f"{what}: attnpy differs from torch beyond tolerance and is not the closer "
            f"one to the float64 value ({errors})")
        TORCH_ROUNDING.append(dict(case=case_id, stage=stage, **errors))


@pytest.mark.torch
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_parity(case):
    dtype = case.dtype
    q, k, v, am, kpm, t_am, t_kpm, seed = make_inputs(case)
    m = make_module(case, seed)
    layer = attnpy.MultiheadAttention.from_torch(m)

    def stages(m, case, q, k, v, t_am, t_kpm):
        return torch_stages(m, case, *map(torch.from_numpy, (q, k, v)), t_am, t_kpm)

    ref, dead = stages(m, case, q, k, v, t_am, t_kpm)        # torch ops, case's dtype
    twin = float64_twin(m, case, q, k, v, t_am, t_kpm)
    exact, dead64 = stages(*twin)                             # the same in float64
    assert np.array_equal(dead, dead64)
    live_heads = ~dead                    # (N, H, L): rows torch computes without NaN
    live_rows = ~dead.any(axis=1)         # (N, L): query positions no head lost

    # test self-check: the stage reference has torch's semantics (in float64, where
    # rounding does not blur the comparison)
    t_out64, _ = torch_module_call(*twin)
    assert_close(exact["output"][live_rows], batch_first_view(t_out64, case)[live_rows],
                 np.float64, "stage reference vs torch module (test self-check)")

    # the module's own call ------------------------------------------------
    t_out, t_w = torch_module_call(m, case, q, k, v, t_am, t_kpm)
    assert np.isfinite(batch_first_view(t_out, case)[live_rows]).all()

    res = run_attnpy(layer, case, q, k, v, am, kpm, need_weights=case.need_weights,
                     average_attn_weights=case.average)
    assert res.trace is None
    assert res.output.dtype == dtype and res.output.shape == t_out.shape
    out = batch_first_view(res.output, case)
    assert_close_to_torch(out[live_rows], batch_first_view(t_out, case)[live_rows],
                          exact["output"][live_rows], dtype, "output", "module_output",
                          case.id)
    # all rows, fully masked ones included (zero weights there)
    assert_close_normwise(out, exact["output"], dtype, "output vs float64 stage reference")

    if not case.need_weights:
        assert res.weights is None and t_w is None
    else:
        assert res.weights.dtype == dtype and res.weights.shape == t_w.shape
        w = res.weights[None] if case.unbatched else res.weights
        tw = t_w[None] if case.unbatched else t_w
        live = live_rows if case.average else live_heads
        exact_w = exact["weights"].mean(axis=1) if case.average else exact["weights"]
        assert_close_to_torch(w[live], tw[live], exact_w[live], dtype, "weights",
                              "module_weights", case.id)
        assert_close(w, exact_w, dtype, "weights vs float64 stage reference (all rows)")
        if not case.average:
            assert np.all(w[dead] == 0), "fully masked rows must have zero weights"

    # every stage ----------------------------------------------------------
    res = run_attnpy(layer, case, q, k, v, am, kpm, need_weights=True, trace=True)
    tr = res.trace
    assert tr.dropout_mask is None and tr.dropped_weights is None  # eval mode
    for stage in STAGES:
        actual = getattr(tr, stage)
        assert actual.dtype == dtype, stage
        desired, desired64 = ((r[stage][0] if case.unbatched else r[stage])
                              for r in (ref, exact))
        assert_close_to_torch(actual, desired, desired64, dtype, f"trace.{stage}", stage,
                              case.id)
    tw = tr.weights[None] if case.unbatched else tr.weights
    tl = tr.logits[None] if case.unbatched else tr.logits
    assert np.array_equal(np.isneginf(tl).all(axis=-1), dead)
    assert np.all(tw[dead] == 0), "fully masked rows must have zero weights"
    ho = tr.head_outputs[None] if case.unbatched else tr.head_outputs
    assert np.all(ho[dead] == 0), "fully masked rows must have a zero head output"


def test_matrix_covers_every_option():
    """Every value of every option and every pair of masks together appear with
    both dtypes; the matrix stays in its size budget."""
    seen = {}
    for case in CASES:
        dt = np.dtype(case.dtype).name
        for name in FIELD_VALUES:
            seen.setdefault((dt, name), set()).add(getattr(case, name))
        seen.setdefault((dt, "both_masks"), set()).add(
            (case.attn_mask, case.kpm) if "none" not in (case.attn_mask, case.kpm) else None)
    for dtype in DTYPES:
        dt = np.dtype(dtype).name
        for name, values in FIELD_VALUES.items():
            if name != "dtype":
                assert seen[(dt, name)] == set(values), (dt, name)
        both = {(am, kpm) for am in MASKS[1:] for kpm in KPMS[1:]}
        assert both <= seen[(dt, "both_masks")], dt
    assert 150 <= len(CASES) <= 400
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.torch
def test_fully_masked_rows_occur():
    """The matrix really exercises fully masked rows (through each kind of mask)."""
    kinds = set()
    for case in CASES:
        *_, am, kpm, t_am, t_kpm, _seed = make_inputs(case)
        a4, k4 = torch_masks_4d(case, t_am, t_kpm)
        if case.bias_kv or case.zero_attn:
            continue  # the extra keys are always allowed
        for name, m4 in (("attn_mask", a4), ("key_padding_mask", k4)):
            if m4 is not None and torch.isneginf(m4).all(dim=-1).any():
                kinds.add((np.dtype(case.dtype).name, name, m4.dtype))
    for dt, tdt in (("float32", torch.float32), ("float64", torch.float64)):
        assert {(dt, "attn_mask", tdt), (dt, "key_padding_mask", tdt)} <= kinds


# --------------------------------------------------------------------------
# is_causal with bias_k / zero key: attnpy follows the mask


@pytest.mark.torch
@pytest.mark.parametrize("extra", ["bias_kv", "zero_attn"])
@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "noweights"])
def test_is_causal_with_extra_keys_follows_the_mask(extra, need_weights):
    """With is_causal=True the mask is used as given, the extra key allowed, as torch
    does with need_weights=True (its need_weights=False path swaps the mask for SDPA's
    causal rule over S + 1 keys, which hides the extra key)."""
    E, H, L = 8, 2, 5
    m = torch.nn.MultiheadAttention(E, H, batch_first=True, add_bias_kv=extra == "bias_kv",
                                    add_zero_attn=extra == "zero_attn", dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, PARAM_STD, generator=g)
    m.eval()
    x = np.random.default_rng(3).standard_normal((2, L, E))
    mask = np.triu(np.ones((L, L), dtype=bool), 1)
    with torch.no_grad():
        t_out, t_w = m(torch.from_numpy(x), torch.from_numpy(x), torch.from_numpy(x),
                       attn_mask=torch.from_numpy(mask), is_causal=True, need_weights=True,
                       average_attn_weights=False)
    res = attnpy.MultiheadAttention.from_torch(m)(x, attn_mask=mask, is_causal=True,
                                                  need_weights=need_weights)
    assert_close(res.output, t_out.numpy(), np.float64, "output vs torch (mask semantics)")
    if need_weights:
        assert_close(res.weights, t_w.numpy(), np.float64, "weights vs torch")
        assert np.all(res.weights[..., -1] > 0)  # the extra key is attended by every row


# --------------------------------------------------------------------------
# from_torch, state_dict, load_state_dict

SD_CONFIGS = {
    "packed": dict(embed_dim=16, num_heads=4),
    "packed_nobias": dict(embed_dim=16, num_heads=4, bias=False),
    "kdim_vdim": dict(embed_dim=12, num_heads=3, kdim=5, vdim=7),
    "kdim_only": dict(embed_dim=12, num_heads=2, kdim=5),
    "bias_kv_zero_attn": dict(embed_dim=8, num_heads=2, add_bias_kv=True, add_zero_attn=True),
    "kdim_nobias_bias_kv": dict(embed_dim=8, num_heads=4, kdim=3, vdim=3, bias=False,
                                add_bias_kv=True, batch_first=False),
}


def torch_module(config, dtype=None, seed=0):
    dtype = torch.float64 if dtype is None else dtype
    g = torch.Generator().manual_seed(seed)
    m = torch.nn.MultiheadAttention(**{"batch_first": True, **config}, dtype=dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, PARAM_STD, generator=g)
    return m.eval()


def sample_inputs(layer, rng, N=2, L=3, S=4):
    dtype = layer.dtype
    q = rng.standard_normal((N, L, layer.embed_dim)).astype(dtype)
    k = rng.standard_normal((N, S, layer.kdim)).astype(dtype)
    v = rng.standard_normal((N, S, layer.vdim)).astype(dtype)
    if not layer.batch_first:
        q, k, v = (x.swapaxes(0, 1) for x in (q, k, v))
    return q, k, v


@pytest.mark.torch
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("config", SD_CONFIGS, ids=str)
def test_state_dict_round_trip(config, dtype):
    m = torch_module(SD_CONFIGS[config], TORCH_DTYPE[dtype])
    layer = attnpy.MultiheadAttention.from_torch(m)
    assert layer.batch_first == m.batch_first and layer.dtype == dtype
    t_sd = m.state_dict()
    sd = layer.state_dict()
    assert set(sd) == set(t_sd)
    for name, t in t_sd.items():
        assert sd[name].shape == tuple(t.shape), name
        assert sd[name].dtype == dtype, name
        assert np.array_equal(sd[name], t.numpy()), name

    # a fresh layer (other initial weights) loading torch's state_dict computes the same
    other = attnpy.MultiheadAttention(**{"batch_first": True, **SD_CONFIGS[config]},
                                      dtype=dtype, seed=1)
    q, k, v = sample_inputs(layer, np.random.default_rng(0))
    before = other(q, k, v).output
    other.load_state_dict(t_sd)
    a, b = layer(q, k, v), other(q, k, v)
    assert not np.array_equal(before, a.output)  # the load really changed something
    assert np.array_equal(a.output, b.output) and np.array_equal(a.weights, b.weights)
    # and NumPy state_dicts load as well (attnpy -> attnpy)
    third = attnpy.MultiheadAttention(**{"batch_first": True, **SD_CONFIGS[config]},
                                      dtype=dtype, seed=2)
    third.load_state_dict({name: np.array(x) for name, x in sd.items()})
    assert np.array_equal(third(q, k, v).output, a.output)
    # and it matches torch
    with torch.no_grad():
        t_out, _ = m(*(torch.from_numpy(np.ascontiguousarray(x)) for x in (q, k, v)))
    assert_close(a.output, t_out.numpy(), dtype, "output vs torch after from_torch")


@pytest.mark.torch
def test_load_state_dict_copies():
    """Loading copies: changing the source afterwards does not change the layer."""
    m = torch_module(SD_CONFIGS["packed"])
    layer = attnpy.MultiheadAttention(16, 4, dtype=np.float64)
    sd = {name: t.numpy().copy() for name, t in m.state_dict().items()}
    layer.load_state_dict(sd)
    keep = layer.state_dict()["in_proj_weight"].copy()
    sd["in_proj_weight"][...] = 0.0
    assert np.array_equal(layer.state_dict()["in_proj_weight"], keep)


@pytest.mark.torch
@pytest.mark.parametrize("config", ["packed", "kdim_vdim", "bias_kv_zero_attn"])
def test_load_state_dict_missing_key(config):
    sd = torch_module(SD_CONFIGS[config]).state_dict()
    layer = attnpy.MultiheadAttention(**SD_CONFIGS[config], dtype=np.float64)
    for name in sd:
        partial = {k: v for k, v in sd.items() if k != name}
        with pytest.raises(KeyError, match=name.replace(".", r"\.")):
            layer.load_state_dict(partial)


@pytest.mark.torch
@pytest.mark.parametrize("config", ["packed", "kdim_vdim"])
def test_load_state_dict_unexpected_key(config):
    sd = dict(torch_module(SD_CONFIGS[config]).state_dict())
    layer = attnpy.MultiheadAttention(**SD_CONFIGS[config], dtype=np.float64)
    with pytest.raises(KeyError, match="extra_weight"):
        layer.load_state_dict({**sd, "extra_weight": torch.zeros(3)})
    # the packed / separate projections are not interchangeable
    with pytest.raises(KeyError):
        other = "kdim_vdim" if config == "packed" else "packed"
        layer.load_state_dict(torch_module(SD_CONFIGS[other]).state_dict())


@pytest.mark.torch
@pytest.mark.parametrize("config", ["packed", "kdim_vdim", "bias_kv_zero_attn"])
def test_load_state_dict_wrong_shape(config):
    sd = torch_module(SD_CONFIGS[config]).state_dict()
    layer = attnpy.MultiheadAttention(**SD_CONFIGS[config], dtype=np.float64)
    keep = {k: v.copy() for k, v in layer.state_dict().items()}
    for name, t in sd.items():
        bad = dict(sd)
        bad[name] = torch.zeros(tuple(t.shape[:-1]) + (t.shape[-1] + 1,), dtype=t.dtype)
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            layer.load_state_dict(bad)
        bad[name] = t.reshape(-1) if t.ndim > 1 else t[None]
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            layer.load_state_dict(bad)
    # a failed load leaves the layer as it was
    assert all(np.array_equal(layer.state_dict()[k], keep[k]) for k in keep)


# --------------------------------------------------------------------------
# initialisation like torch's


def test_init_statistics_packed():
    E, H = 64, 4
    layer = attnpy.MultiheadAttention(E, H, seed=0, add_bias_kv=True)
    sd = layer.state_dict()
    w = sd["in_proj_weight"].astype(np.float64)
    assert w.shape == (3 * E, E) and sd["in_proj_weight"].dtype == np.float32
    bound = math.sqrt(6.0 / (E + 3 * E))          # xavier_uniform_ on the (3E, E) matrix
    assert np.abs(w).max() <= bound
    assert np.abs(w).max() > 0.99 * bound          # fills the range, not a narrower one
    assert abs(w.std() / (bound / math.sqrt(3)) - 1) < 0.10
    assert abs(w.mean()) < 0.05 * bound
    counts, _ = np.histogram(w, bins=10, range=(-bound, bound))
    assert np.all(np.abs(counts / (w.size / 10) - 1) < 0.2), counts  # roughly flat

    wo = sd["out_proj.weight"].astype(np.float64)
    bound_o = 1.0 / math.sqrt(E)                   # kaiming_uniform_(a=sqrt(5))
    assert np.abs(wo).max() <= bound_o and np.abs(wo).max() > 0.99 * bound_o
    assert abs(wo.std() / (bound_o / math.sqrt(3)) - 1) < 0.10

    assert np.all(sd["in_proj_bias"] == 0) and sd["in_proj_bias"].shape == (3 * E,)
    assert np.all(sd["out_proj.bias"] == 0) and sd["out_proj.bias"].shape == (E,)


def test_init_statistics_separate_projections():
    E, kdim, vdim = 64, 32, 96
    layer = attnpy.MultiheadAttention(E, 8, kdim=kdim, vdim=vdim, seed=1, dtype=np.float64)
    sd = layer.state_dict()
    for name, fan_in in (("q_proj_weight", E), ("k_proj_weight", kdim), ("v_proj_weight", vdim)):
        w = sd[name]
        assert w.shape == (E, fan_in)
        bound = math.sqrt(6.0 / (E + fan_in))       # xavier_uniform_ on each matrix
        assert np.abs(w).max() <= bound and np.abs(w).max() > 0.98 * bound, name
        assert abs(w.std() / (bound / math.sqrt(3)) - 1) < 0.10, name


def test_init_statistics_bias_kv():
    """bias_k / bias_v: xavier_normal_ on (1, 1, E): std sqrt(2 / (E + E))."""
    E = 64
    samples = np.concatenate([
        np.concatenate([sd["bias_k"].ravel(), sd["bias_v"].ravel()])
        for sd in (attnpy.MultiheadAttention(E, 4, add_bias_kv=True, seed=s).state_dict()
                   for s in range(20))])
    assert abs(samples.std() / math.sqrt(1.0 / E) - 1) < 0.10
    assert abs(samples.mean()) < 0.1 * math.sqrt(1.0 / E)


@pytest.mark.torch
def test_init_matches_torch_statistics():
    """The same spread as torch's own initialisation of the same layer."""
    E = 64
    torch.manual_seed(0)
    m = torch.nn.MultiheadAttention(E, 4)
    sd = attnpy.MultiheadAttention(E, 4, seed=0).state_dict()
    for name in ("in_proj_weight", "out_proj.weight"):
        t_std = float(m.state_dict()[name].std())
        assert abs(float(sd[name].std()) / t_std - 1) < 0.10, name


def test_init_seeded():
    a = attnpy.MultiheadAttention(16, 4, seed=7).state_dict()
    b = attnpy.MultiheadAttention(16, 4, seed=7).state_dict()
    c = attnpy.MultiheadAttention(16, 4, seed=8).state_dict()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["in_proj_weight"], c["in_proj_weight"])


# --------------------------------------------------------------------------
# errors


@pytest.fixture
def layer32():
    return attnpy.MultiheadAttention(8, 2, seed=0)


@pytest.mark.parametrize("which", ["query", "key", "value"])
def test_wrong_dtype_input(layer32, which):
    x = np.zeros((2, 3, 8), np.float32)
    args = {"query": x, "key": x, "value": x}
    args[which] = x.astype(np.float64)
    with pytest.raises(TypeError, match=which):
        layer32(args["query"], args["key"], args["value"])


def test_wrong_dtype_query_float64_layer():
    layer = attnpy.MultiheadAttention(8, 2, seed=0, dtype=np.float64)
    with pytest.raises(TypeError, match="query"):
        layer(np.zeros((2, 3, 8), np.float32))


@pytest.mark.parametrize("shape", [(3, 5), (5, 3), (2, 3, 3), (4, 3, 4), (2, 2, 3, 4),
                                   (1, 3, 3), (3,), (2, 2, 2, 3, 3)], ids=str)
def test_attn_mask_wrong_shape(layer32, shape):
    x = np.zeros((2, 3, 8), np.float32)   # N=2, L=S=3, H=2: (3,3), (4,3,3), (2,2,3,3) are right
    with pytest.raises(ValueError, match="attn_mask"):
        layer32(x, attn_mask=np.zeros(shape, bool))


@pytest.mark.parametrize("shape", [(3,), (2, 4), (1, 3), (3, 2), (2, 1, 3), (2, 3, 1)],
                         ids=str)
def test_key_padding_mask_wrong_shape(layer32, shape):
    x = np.zeros((2, 3, 8), np.float32)
    with pytest.raises(ValueError, match="key_padding_mask"):
        layer32(x, key_padding_mask=np.zeros(shape, bool))


def test_key_padding_mask_wrong_shape_unbatched(layer32):
    x = np.zeros((3, 8), np.float32)
    with pytest.raises(ValueError, match="key_padding_mask"):
        layer32(x, key_padding_mask=np.zeros((1, 3), bool))


def test_is_causal_needs_attn_mask(layer32):
    x = np.zeros((2, 3, 8), np.float32)
    with pytest.raises(ValueError, match="is_causal"):
        layer32(x, is_causal=True)


@pytest.mark.parametrize("embed_dim, num_heads", [(10, 3), (8, 3), (6, 4)])
def test_embed_dim_not_divisible(embed_dim, num_heads):
    with pytest.raises(ValueError, match="divisible"):
        attnpy.MultiheadAttention(embed_dim, num_heads)


# --------------------------------------------------------------------------
# beyond torch's layer: grouped-query heads, dropout, the trace's guarantees,
# and the textbook self_attention. Checked against the float64 NumPy
# reference (reference.py; torch has no num_kv_heads).


def rng_for(name):
    return np.random.default_rng(abs(hash(name)) % 2**32)


def random_layer(E, H, Hkv=None, dtype=np.float64, **kw):
    mha = attnpy.MultiheadAttention(E, H, num_kv_heads=Hkv, dtype=dtype, seed=1, **kw)
    rng = np.random.default_rng(2)
    for p in mha.parameters():
        p[...] = rng.standard_normal(p.shape) * 0.5       # in place: parameters() are live
    return mha


@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2), (6, 3), (4, 1)], ids=["mha", "gqa2", "gqa3", "mqa"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_grouped_query_heads(H, Hkv, dtype):
    E = 24
    mha = random_layer(E, H, Hkv, dtype=dtype)
    rng = rng_for(f"gqa{H}{Hkv}")
    x = rng.standard_normal((2, 5, E)).astype(dtype)
    kv = rng.standard_normal((2, 7, E)).astype(dtype)
    padding = np.zeros((2, 7), bool)
    padding[1, 4:] = True
    res = mha(x, kv, kv, key_padding_mask=padding, trace=True)
    ref = mha_reference(mha, x, kv, kv, key_padding_mask=padding)
    ref_out, ref_w = ref["output"], ref["weights"]
    tol = 1e-4 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(res.output, ref_out, atol=tol, rtol=tol)
    np.testing.assert_allclose(res.weights, ref_w, atol=tol, rtol=tol)
    assert mha.state_dict()["in_proj_weight"].shape == (E + 2 * Hkv * (E // H), E)
    assert res.trace.k.shape == (2, Hkv, 7, E // H)


# ---------------------------------------------------------------- dropout

def test_dropout_is_seeded_and_only_in_training():
    x = rng_for("drop").standard_normal((2, 16, 32))
    a = random_layer(32, 4, dropout=0.3)
    out_eval = a(x).output
    a.train()
    b = attnpy.MultiheadAttention(32, 4, dropout=0.3, dtype=np.float64, seed=1)
    b.load_state_dict(a.state_dict())
    b._rng = np.random.default_rng(99)
    a._rng = np.random.default_rng(99)
    b.train()
    r1, r2 = a(x, trace=True), b(x, trace=True)
    np.testing.assert_array_equal(r1.output, r2.output)               # same seed, same result
    np.testing.assert_array_equal(r1.trace.dropout_mask, r2.trace.dropout_mask)
    assert not np.allclose(r1.output, out_eval)                        # dropout did something
    r3 = a(x, trace=True)                                              # the next call draws anew
    assert not np.array_equal(r3.trace.dropout_mask, r1.trace.dropout_mask)
    a.eval()
    np.testing.assert_array_equal(a(x).output, out_eval)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keeps_1_minus_p_and_rescales(p):
    mha = random_layer(32, 4, dropout=p).train()
    x = rng_for(f"p{p}").standard_normal((4, 64, 32))
    res = mha(x, trace=True)
    t = res.trace
    n = t.dropout_mask.size
    kept = t.dropout_mask.mean()
    # binomial: 5 standard deviations
    assert abs(kept - (1 - p)) <= 5 * np.sqrt(p * (1 - p) / n), (kept, 1 - p, n)
    expected = np.where(t.dropout_mask, t.weights / (1 - p), 0.0)
    np.testing.assert_allclose(t.dropped_weights, expected, rtol=1e-12, atol=0)
    # the returned weights are the post-dropout ones, as torch returns them
    assert res.weights_after_dropout
    np.testing.assert_array_equal(res.weights, t.dropped_weights)
    # and they are what multiplied v
    np.testing.assert_allclose(t.head_outputs, t.dropped_weights @ np.repeat(t.v, 1, axis=1),
                               rtol=1e-10, atol=1e-12)
    # the softmax itself is untouched: rows still sum to 1
    np.testing.assert_allclose(t.weights.sum(-1), 1.0, rtol=1e-12)


def test_streaming_dropout_equals_materialised_dropout():
    """need_weights=False streams over keys; the dropout decisions are the same
    hash of (seed, element), so both paths agree."""
    x = rng_for("stream").standard_normal((2, 130, 16))
    a = random_layer(16, 2, dropout=0.4).train()
    b = random_layer(16, 2, dropout=0.4).train()
    a._rng, b._rng = np.random.default_rng(5), np.random.default_rng(5)
    streamed = a(x, need_weights=False)
    materialised = b(x, need_weights=True)
    assert streamed.weights is None
    np.testing.assert_allclose(streamed.output, materialised.output, rtol=1e-12, atol=1e-12)


def test_dropout_p_one_drops_everything():
    mha = random_layer(8, 2, dropout=1.0, bias=False).train()
    res = mha(rng_for("p1").standard_normal((1, 3, 8)), trace=True)
    assert not res.trace.dropout_mask.any()
    np.testing.assert_array_equal(res.trace.head_outputs, 0.0)


# ---------------------------------------------------------------- the trace

def test_trace_is_read_only_and_outputs_are_not():
    mha = random_layer(8, 2)
    res = mha(rng_for("ro").standard_normal((2, 3, 8)), trace=True)
    for name in ("q", "k", "v", "scores", "logits", "weights", "head_outputs", "concat", "output"):
        arr = getattr(res.trace, name)
        assert not arr.flags.writeable, name
        with pytest.raises(ValueError):
            arr[...] = 0
    assert res.output.flags.writeable
    np.testing.assert_array_equal(res.trace.output, res.output)


def test_trace_head_outputs_are_concat_views():
    """Splitting and merging heads copies nothing: head_outputs and concat
    share memory, as do q and the projection buffer."""
    mha = random_layer(12, 3)
    t = mha(rng_for("views").standard_normal((2, 4, 12)), trace=True).trace
    assert np.shares_memory(t.head_outputs, t.concat)
    for h in range(3):
        np.testing.assert_array_equal(t.head_outputs[:, h], t.concat[:, :, 4 * h:4 * h + 4])


def test_no_trace_no_weights_keeps_nothing():
    mha = random_layer(8, 2)
    res = mha(rng_for("none").standard_normal((2, 3, 8)), need_weights=False)
    assert res.weights is None and res.trace is None


def test_unbatched_matches_batched():
    mha = random_layer(8, 2, add_bias_kv=True, add_zero_attn=True)
    x = rng_for("unb").standard_normal((5, 8))
    one = mha(x, trace=True)
    many = mha(x[None], trace=True)
    np.testing.assert_array_equal(one.output, many.output[0])
    np.testing.assert_array_equal(one.weights, many.weights[0])
    assert one.trace.k.shape == (2, 5 + 2, 4)


def test_parameters_are_live():
    mha = random_layer(8, 2)
    x = rng_for("live").standard_normal((1, 3, 8))
    before = mha(x).output
    for p in mha.parameters():
        p *= 0.0
    np.testing.assert_array_equal(mha(x).output, 0.0)
    assert not np.allclose(before, 0.0)


# ---------------------------------------------------------------- self_attention

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("causal", [False, True])
def test_self_attention_textbook(dtype, causal):
    rng = rng_for(f"sa{causal}")
    L, d_model, d_k, d_v = 6, 10, 4, 3
    x = rng.standard_normal((L, d_model)).astype(dtype)
    w_q, w_k = (rng.standard_normal((d_model, d_k)).astype(dtype) for _ in range(2))
    w_v = rng.standard_normal((d_model, d_v)).astype(dtype)
    res = attnpy.self_attention(x, w_q, w_k, w_v, is_causal=causal, trace=True)

    X = x.astype(np.float64)
    Q, K = X @ w_q, X @ w_k
    out, w = self_attention_reference(X, w_q, w_k, w_v, is_causal=causal)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(res.weights, w, atol=tol, rtol=tol)
    np.testing.assert_allclose(res.output, out, atol=tol, rtol=tol)
    np.testing.assert_allclose(res.trace.q[0], Q, atol=tol, rtol=tol)
    np.testing.assert_allclose(res.trace.scores[0], Q @ K.T, atol=10 * tol, rtol=tol)
    assert res.output.shape == (L, d_v)


def test_self_attention_mask_polarity_is_sdpa():
    rng = rng_for("sapol")
    x = rng.standard_normal((2, 4, 6))
    w = rng.standard_normal((6, 6))
    allowed = np.tril(np.ones((4, 4), bool))
    masked = attnpy.self_attention(x, w, w, w, attn_mask=allowed)
    causal = attnpy.self_attention(x, w, w, w, is_causal=True)
    np.testing.assert_allclose(masked.output, causal.output, rtol=1e-13, atol=1e-13)


def test_self_attention_bad_weights_name_the_argument():
    x = np.zeros((3, 4))
    with pytest.raises(ValueError, match="w_k"):
        attnpy.self_attention(x, np.zeros((4, 2)), np.zeros((5, 2)), np.zeros((4, 2)))
    with pytest.raises(TypeError, match="w_q"):
        attnpy.self_attention(x, np.zeros((4, 2), np.float32), np.zeros((4, 2)), np.zeros((4, 2)))


def test_nothing_given_is_written():
    """Inputs, masks, parameters and the forward's result are bit-identical
    after the forward, the backward and error paths."""
    rng = rng_for("untouched")
    mha = random_layer(8, 2, add_bias_kv=True, dropout=0.2).train()
    x = rng.standard_normal((2, 5, 8))
    kv = rng.standard_normal((2, 6, 8))
    kpm = rng.random((2, 6)) < 0.3
    am = rng.standard_normal((5, 6))
    g = rng.standard_normal((2, 5, 8))
    w = rng.standard_normal((8, 4))
    given = [x, kv, kpm, am, g, w] + mha.parameters()
    before = [a.copy() for a in given]
    res = mha(x, kv, kv, key_padding_mask=kpm, attn_mask=am, trace=True)
    trace_before = {f: getattr(res.trace, f).copy() for f in ("q", "k", "v", "weights", "concat")}
    mha.backward(res, g)
    attnpy.self_attention(x, w, w, w, is_causal=True, trace=True)
    with pytest.raises(ValueError):
        mha(x, kv, kv, key_padding_mask=kpm[:, :3])
    with pytest.raises(ValueError):
        mha.backward(res, g[:, :2])
    for a, b in zip(given, before):
        np.testing.assert_array_equal(a, b)
    for f, b in trace_before.items():
        np.testing.assert_array_equal(getattr(res.trace, f), b)

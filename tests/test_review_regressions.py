"""Regressions for bugs a code review found (each reproduced before the fix)."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import attnpy
from attnpy import _core


def run_isolated(code):
    """Run code in a fresh interpreter: a crash must show as a failed test,
    not take the test run down."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120)


def test_huge_broadcast_dims_raise_instead_of_overflowing_workspaces():
    proc = run_isolated("""
        import numpy as np, attnpy
        E = 2**55
        q = np.broadcast_to(np.ones((1, 1)), (2, E))
        for nw in (True, False):
            try:
                attnpy.scaled_dot_product_attention(q, q, np.ones((2, 4)), need_weights=nw)
            except ValueError as e:
                assert "2**31" in str(e), e
            else:
                raise SystemExit("no error")
        mha = attnpy.MultiheadAttention(8, 2)
        x = np.broadcast_to(np.ones((1, 1, 1), np.float32), (1, 2**33, 8))   # L = 2**33
        try:
            mha(x)
        except ValueError as e:
            assert "2**31" in str(e), e
        else:
            raise SystemExit("no error from the layer")
        print("ok")
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "ok"


def test_fast_backward_ignores_non_finite_values_of_masked_keys():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, 40, 16)) for _ in range(3))
    v[..., 5, :] = np.inf
    mask = np.ones((40, 40), bool)
    mask[:, 5] = False
    dout = rng.standard_normal((1, 2, 40, 16))
    for kernel in attnpy.supported_kernels():
        with attnpy.use_kernel(kernel):
            g = attnpy.scaled_dot_product_attention_backward(dout, q, k, v, attn_mask=mask)
        assert np.isfinite(g.query).all() and np.isfinite(g.key).all(), kernel
        assert np.isfinite(np.delete(g.value, 5, axis=-2)).all(), kernel


def _backward_args(layer, res, grad_output, **grads):
    """The arguments MultiheadAttention.backward gives the core, with some
    gradient arrays replaced."""
    ctx, raw, p = res._context, res._context["raw"], layer.state_dict()
    w_q, w_k, w_v, b_q, b_k, b_v = layer._projections()
    args = dict(query=ctx["query"], key=ctx["key"], value=ctx["value"], w_q=w_q, w_k=w_k,
                w_v=w_v, b_q=b_q, b_k=b_k, b_v=b_v, w_out=p["out_proj.weight"],
                b_out=p.get("out_proj.bias"),
                bias_k=p["bias_k"].reshape(-1) if "bias_k" in p else None,
                bias_v=p["bias_v"].reshape(-1) if "bias_v" in p else None,
                num_heads=layer.num_heads, num_kv_heads=layer.num_kv_heads,
                add_zero_attn=layer.add_zero_attn, attn_mask=None, key_padding_mask=None,
                mask_true_attends=False, is_causal=False, scale=None, dropout_p=0.0, seed=0,
                grad_output=grad_output, q=raw["q"], k=raw["k"], v=raw["v"],
                concat=raw["concat"], weights=raw["weights"])
    for name in ("grad_w_q", "grad_w_k", "grad_w_v", "grad_b_q", "grad_b_k", "grad_b_v",
                 "grad_w_out", "grad_b_out", "grad_bias_k", "grad_bias_v"):
        args[name] = None
    args.update(grads)
    return args


def test_bias_kv_gradients_come_together():
    layer = attnpy.MultiheadAttention(8, 2, add_bias_kv=True, dtype=np.float64, seed=0)
    x = np.random.default_rng(1).standard_normal((1, 3, 8))
    res = layer(x, trace=True)
    g = np.zeros((1, 3, 8))
    for given in ("grad_bias_k", "grad_bias_v"):
        with pytest.raises(ValueError, match="grad_bias_k and grad_bias_v"):
            _core.multihead_attention_backward(**_backward_args(layer, res, g,
                                                                **{given: np.zeros(8)}))


def test_gradients_may_not_overwrite_what_the_backward_reads():
    layer = attnpy.MultiheadAttention(8, 2, dtype=np.float64, seed=0)
    x = np.random.default_rng(2).standard_normal((1, 3, 8))
    res = layer(x, trace=True)
    w_q = layer._projections()[0]
    before = w_q.copy()
    with pytest.raises(ValueError, match="grad_w_q shares memory"):
        _core.multihead_attention_backward(**_backward_args(layer, res, np.zeros((1, 3, 8)),
                                                            grad_w_q=w_q))
    np.testing.assert_array_equal(w_q, before)


def test_messages_show_the_value_given():
    q = np.zeros((2, 3))
    with pytest.raises(ValueError, match=r"got 1\.0"):
        attnpy.scaled_dot_product_attention(q, q, q, dropout_p=1.0)
    layer = attnpy.MultiheadAttention(4, 1)
    layer.dropout = 2.0   # as if set by hand: the core still checks it
    with pytest.raises(ValueError, match=r"got 2\b"):
        layer.train()(np.zeros((1, 2, 4), np.float32))


def test_set_num_threads_rejects_values_that_do_not_fit():
    for n in (2**32 + 1, 2**32, 257):
        with pytest.raises(ValueError):
            attnpy.set_num_threads(n)
    assert attnpy.get_num_threads() >= 1


def test_an_int_list_mask_is_refused_as_ambiguous():
    q = np.zeros((2, 3))
    with pytest.raises(TypeError, match="attn_mask.*ambiguous"):
        attnpy.scaled_dot_product_attention(q, q, q, attn_mask=[[1, 0], [0, 1]])
    ok = attnpy.scaled_dot_product_attention(q, q, q, attn_mask=[[True, False], [True, True]])
    assert ok.weights[0, 1] == 0.0

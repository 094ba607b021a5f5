"""The benchmark's ONNX Runtime peer computes what attnpy computes.

bench/bench.py times ONNX Runtime's opset-23 Attention operator against
attnpy.scaled_dot_product_attention; a ratio means something only if both
compute the same attention. These tests build the very model the benchmark
builds (bench/peers.py) and check ORT's output, and on +w its weights
(qk_matmul_output, mode 3), against the float64 reference and against
attnpy, then that the benchmark's own check (peers.check_agrees) rejects an
output that is off. The whole file is skipped without onnx and onnxruntime
(requirements-dev.txt has both).
"""
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx", reason="the ONNX peer needs onnx (requirements-dev.txt)")
pytest.importorskip("onnxruntime", reason="the ONNX peer needs onnxruntime (requirements-dev.txt)")

import attnpy  # noqa: E402
from reference import sdpa_reference  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import peers  # noqa: E402

# (query shape, key/value shape, value width): square and not, one to many
# heads, a value width other than the key's
SHAPES = [((1, 1, 8, 4), (1, 1, 8, 4), 4),
          ((2, 3, 17, 16), (2, 3, 17, 16), 16),
          ((1, 4, 64, 32), (1, 4, 64, 32), 32),
          ((2, 2, 7, 8), (2, 2, 12, 8), 5)]
# float32 against the float64 reference: the sums are float32 on both sides
REF_TOL = dict(rtol=1e-5, atol=1e-6)


def _inputs(q_shape, kv_shape, ev, dtype, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal(q_shape).astype(dtype)
    k = rng.standard_normal(kv_shape).astype(dtype)
    v = rng.standard_normal(kv_shape[:3] + (ev,)).astype(dtype)
    return q, k, v


@pytest.mark.parametrize("need_weights", [False, True], ids=["", "+w"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("q_shape,kv_shape,ev", SHAPES, ids=lambda s: "x".join(map(str, s))
                         if isinstance(s, tuple) else str(s))
def test_ort_attention_matches_the_reference_and_attnpy(q_shape, kv_shape, ev, causal,
                                                        need_weights):
    q, k, v = _inputs(q_shape, kv_shape, ev, np.float32)
    got = peers.ort_attention(q, k, v, causal, need_weights, threads=2)()
    assert len(got) == (2 if need_weights else 1)
    ref_out, ref_w = sdpa_reference(q, k, v, is_causal=causal)
    np.testing.assert_allclose(got[0], ref_out, **REF_TOL)
    out, weights = attnpy.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                       need_weights=True)
    np.testing.assert_allclose(out, ref_out, **REF_TOL)
    # the benchmark's check passes where the two agree
    peers.check_agrees("ONNX Runtime", "test", "float32", got[0], out)
    if need_weights:
        assert got[1].shape == q_shape[:3] + (kv_shape[2],)
        np.testing.assert_allclose(got[1], ref_w, **REF_TOL)
        np.testing.assert_allclose(got[1].sum(-1), 1.0, rtol=1e-5)
        if causal:      # top-left aligned, as attnpy's and torch's is_causal
            L, S = got[1].shape[-2:]
            assert np.all(got[1][..., ~np.tri(L, S, dtype=bool)] == 0)
        peers.check_agrees("ONNX Runtime", "test", "float32", got[1], weights, "weights")


@pytest.mark.parametrize("D", [8, 16])
def test_ort_float64_agrees_within_the_benchs_tolerance(D):
    """ORT runs float64 but scales at float32 precision (bench/peers.py):
    within PEER_TOLERANCE["float64"], which the f64 rows of the bench use."""
    q, k, v = _inputs((2, 2, 33, D), (2, 2, 33, D), D, np.float64, seed=1)
    out, weights = peers.ort_attention(q, k, v, False, True, threads=2)()
    ref_out, ref_w = sdpa_reference(q, k, v)
    assert out.dtype == np.float64 and weights.dtype == np.float64
    peers.check_agrees("ONNX Runtime", "test", "float64", out, ref_out)
    peers.check_agrees("ONNX Runtime", "test", "float64", weights, ref_w, "weights")


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_the_model_is_one_opset_23_attention_node(causal, need_weights):
    model = peers.ort_attention_model((1, 2, 8, 4), (1, 2, 8, 4), (1, 2, 8, 4), "float32",
                                      causal, need_weights)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 23)]
    (node,) = model.graph.node
    assert node.op_type == "Attention" and node.domain == ""
    attrs = {a.name: a.i for a in node.attribute}
    expected = ({"is_causal": 1} if causal else {}) | (
        {"qk_matmul_output_mode": 3} if need_weights else {})
    assert attrs == expected                # scale left at its default, 1/sqrt(D)
    assert list(node.input) == ["Q", "K", "V"]
    assert list(node.output) == (["Y", "", "", "W"] if need_weights else ["Y"])


def test_the_benchs_check_rejects_what_differs():
    q, k, v = _inputs((1, 2, 16, 8), (1, 2, 16, 8), 8, np.float32)
    out, weights = attnpy.scaled_dot_product_attention(q, k, v, need_weights=True)
    off = out.copy()
    off[0, 1, 3, 2] += 1e-3
    with pytest.raises(RuntimeError, match="differs from attnpy's"):
        peers.check_agrees("ONNX Runtime", "row", "float32", off, out)
    with pytest.raises(RuntimeError, match="shape"):
        peers.check_agrees("ONNX Runtime", "row", "float32", off[..., :4], out)
    # weights taken before the softmax (mode 0: the scaled scores) are caught
    scores = peers.ort_attention_model(q.shape, k.shape, v.shape, "float32", False, True)
    (mode,) = [a for a in scores.graph.node[0].attribute if a.name == "qk_matmul_output_mode"]
    mode.i = 0
    got = peers.ort_session(scores, 1).run(None, {"Q": q, "K": k, "V": v})
    with pytest.raises(RuntimeError, match="weights on row 'row' differs"):
        peers.check_agrees("ONNX Runtime", "row", "float32", got[1], weights, "weights")

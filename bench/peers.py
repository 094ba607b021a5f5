"""The benchmark's optional peers beyond torch and NumPy: ONNX Runtime and JAX.

bench/bench.py times them and tests/test_peers.py checks the same ONNX model
against attnpy and the float64 reference, so what the benchmark times is
what the test checks. Both peers are optional: without onnx + onnxruntime,
or without jax, the benchmark runs without that peer and says why.

ONNX Runtime ("ort"): a model of one opset-23 ``Attention`` node (ai.onnx
domain) on 4-D (B, H, L, D) query, key and value, run by an InferenceSession
on the CPUExecutionProvider. What the operator does, as checked against
onnx 1.23.2's schema and onnxruntime 1.32.0's CPU kernel:
  - ``scale`` left at its default, 1/sqrt(D), the same as attnpy's;
  - ``is_causal=1`` lets query i attend key j iff j <= i + past_length; with
    no past key it is the lower triangle aligned top-left, attnpy's and
    torch's ``is_causal`` (also for L != S);
  - the weights come from the optional 4th output, ``qk_matmul_output``,
    with ``qk_matmul_output_mode=3``: after the softmax (0 is q k^T * scale,
    1 after the softcap, 2 after the mask is added);
  - float64 runs, but the scale is applied at float32 precision (sqrt(scale)
    on q and on k, exact only when D is a power of 4), so float64 outputs
    differ from a float64 reference by about 1e-7 relative: PEER_TOLERANCE.

JAX ("jax"): ``jax.jit(jax.nn.dot_product_attention)`` on the CPU, float32
rows without weights only (it returns no weights; float64 needs jax's x64
mode). It wants (B, L, H, D): the arrays are transposed and put on the
device once, outside the timed call. Thread count: jax 0.10 ignores the
often-quoted XLA_FLAGS="--xla_cpu_multi_thread_eigen=false
intra_op_parallelism_threads=N" (the bare second word is not a flag; with
"--" XLA rejects it as unknown) and the first only changes how Eigen splits
a kernel. The size of XLA's CPU thread pool is read from the environment
variable PJRT_NPROC when the CPU client starts (checked: one thread with
PJRT_NPROC=1, both cores with 2), so pin_jax_threads sets it before jax is
imported.
"""
from __future__ import annotations

import os
import sys

# (rtol, atol) of a peer's output and weights against attnpy's, by dtype.
# float32: both sum in float32, in different orders. float64: ORT's float32
# scale (see above) dominates, ~1e-7 relative.
PEER_TOLERANCE = {"float32": (1e-4, 1e-5), "float64": (1e-6, 1e-6)}


def import_ort():
    """(onnx, onnxruntime), or raise ImportError naming what is missing."""
    import onnx
    import onnxruntime
    return onnx, onnxruntime


def ort_attention_model(q_shape, k_shape, v_shape, dtype, causal, need_weights):
    """A checked ModelProto: Y = Attention(Q, K, V), and W = the weights
    (qk_matmul_output, mode 3) when need_weights. Shapes are fixed, one
    model per row, so that ORT can plan its buffers."""
    onnx, _ = import_ort()
    from onnx import TensorProto, helper
    elem = {"float32": TensorProto.FLOAT, "float64": TensorProto.DOUBLE}[str(dtype)]
    B, H, L, _ = q_shape
    S, Ev = k_shape[2], v_shape[3]
    attrs = {"is_causal": 1} if causal else {}
    # outputs by position: Y, present_key, present_value, qk_matmul_output;
    # an empty name leaves an optional output out
    outputs = ["Y"]
    if need_weights:
        attrs["qk_matmul_output_mode"] = 3
        outputs = ["Y", "", "", "W"]
    node = helper.make_node("Attention", ["Q", "K", "V"], outputs, **attrs)
    value = lambda name, shape: helper.make_tensor_value_info(name, elem, list(shape))
    graph = helper.make_graph(
        [node], "attention",
        [value("Q", q_shape), value("K", k_shape), value("V", v_shape)],
        [value("Y", (B, H, L, Ev))] + ([value("W", (B, H, L, S))] if need_weights else []))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)],
                              producer_name="attnpy bench")
    onnx.checker.check_model(model, full_check=True)   # shapes inferred and matched too
    return model


def ort_session(model, threads):
    """An InferenceSession on the CPU with `threads` intra-op threads (the
    calling thread is one of them) and one inter-op thread; the graph
    optimisation level is ORT's default."""
    _, ort = import_ort()
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])


def ort_attention(q, k, v, causal, need_weights, threads):
    """A zero-argument callable running the model on these very arrays;
    it returns [Y] or [Y, W] as NumPy arrays."""
    model = ort_attention_model(q.shape, k.shape, v.shape, q.dtype, causal, need_weights)
    sess = ort_session(model, threads)
    feeds = {"Q": q, "K": k, "V": v}
    return lambda: sess.run(None, feeds)


def pin_jax_threads(threads):
    """Before jax is imported: the CPU backend only, with a pool of `threads`
    threads. Returns None, or why the pin cannot hold (jax already loaded)."""
    if "jax" in sys.modules:
        return "jax was imported before the thread count could be set"
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["PJRT_NPROC"] = str(threads)
    return None


def check_agrees(peer, row_label, dtype, got, want, what="output"):
    """Raise if a peer's array differs from attnpy's beyond PEER_TOLERANCE:
    a peer computing something else would make its ratio meaningless."""
    import numpy as np
    rtol, atol = PEER_TOLERANCE[str(dtype)]
    got = np.asarray(got)
    if got.shape != want.shape:
        raise RuntimeError(f"{peer} {what} on row {row_label!r}: shape {got.shape}, "
                           f"attnpy's is {want.shape}")
    if not np.allclose(got, want, rtol=rtol, atol=atol):
        err = np.abs(got.astype(np.float64) - want)
        raise RuntimeError(f"{peer} {what} on row {row_label!r} differs from attnpy's: max abs "
                           f"error {err.max():.3g} (rtol {rtol:g}, atol {atol:g})")

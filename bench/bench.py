"""attnpy against PyTorch, NumPy, ONNX Runtime and JAX on the CPU, side by side
in one run.

    python bench/bench.py [--quick] [--threads N] [--out DIR] [--budget SECONDS]

Every row times attnpy and its peers with the same thread count, in rounds
of blocks (a few attnpy calls, a few torch calls, a few NumPy calls, a few
of each other peer's, again),
so that the noise of a shared machine falls on all of them alike. Before each
block the other libraries' thread pools are given time to go idle (see
time_row); medians are reported. The script
measures the machine's float32 FMA peak itself and writes results.md and
results.png into --out (default: bench/).

Peers:
  need_weights=False: torch.nn.functional.scaled_dot_product_attention
  need_weights=True:  torch as a user computes the maps,
                      softmax(q @ k.mT * scale + mask) @ v
  multi-head rows:    torch.nn.MultiheadAttention (need_weights as the row says,
                      average_attn_weights=False)
  every forward row:  NumPy (matmul + softmax), float32 like the inputs
  backward rows:      torch.autograd.grad on a retained graph (the backward
                      alone, on both sides: each reads its forward's saved
                      statistics, torch's graph its out and logsumexp,
                      attnpy's backward output= and lse=)
  SDPA forward rows:  ONNX Runtime ("ORT"), a one-node model of the opset-23
                      Attention operator (weights from its qk_matmul_output,
                      mode 3, on +w rows), float32 and float64
  SDPA forward rows without weights, float32:
                      JAX, jax.jit(jax.nn.dot_product_attention)
ORT and JAX are optional (bench/peers.py): without them their cells are
dashes and the run says why. Their outputs are checked against attnpy's
before a row is timed; a difference stops the run.
"""
from __future__ import annotations

import argparse
import functools
import gc
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _reexec_without_openblas_overrides():
    """OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE are set on some machines for old
    OpenBLAS builds; they slow a current NumPy. Unset both, for this process."""
    if "OPENBLAS_CORETYPE" in os.environ or "OPENBLAS_L2_SIZE" in os.environ:
        env = {k: v for k, v in os.environ.items()
               if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
        os.execve(sys.executable, [sys.executable] + sys.argv, env)


# ---------------------------------------------------------------------------
# the rows


@dataclass
class Row:
    label: str
    kind: str                  # "sdpa", "mha", "sdpa_bwd" or "mha_bwd"
    shape: tuple               # (B, H, L, D) or (N, E, H, L)
    causal: bool = False
    need_weights: bool = False
    dtype: str = "float32"
    peers: tuple = ("torch", "numpy")
    reps: int = 0              # 0: chosen from the first timing
    results: dict = field(default_factory=dict)

    @property
    def flops(self):
        """The two products: 4 B H L S D, the lower triangle only when causal.
        Multi-head rows add the four projections (2 N L E^2 each)."""
        if self.kind in ("sdpa", "sdpa_bwd"):
            B, H, L, D = self.shape
            f = 4.0 * B * H * L * L * D
            if self.kind == "sdpa_bwd":   # five products: q k^T again, dP, dS k, dS^T q, P^T dO
                f *= 2.5
            return f / 2 if self.causal else f
        N, E, H, L = self.shape
        f = 4.0 * N * L * L * E + 8.0 * N * L * E * E
        return f * 2.5 if self.kind == "mha_bwd" else f


def _sdpa_peers(dtype="float32", need_weights=False):
    """An SDPA forward row's peers: JAX only where it computes what attnpy
    does (float32, no weights: it returns none, and float64 needs x64 mode)."""
    jax = ("jax",) if dtype == "float32" and not need_weights else ()
    return ("torch", "numpy", "ort") + jax


def matrix(quick):
    shapes = [(1, 1, 8, 4), (1, 12, 32, 32), (8, 8, 128, 64), (4, 8, 512, 64), (1, 8, 2048, 64)]
    if quick:
        shapes = [(1, 1, 8, 4), (1, 4, 64, 16)]
    rows = []
    for shape in shapes:
        for causal in (False, True):
            for nw in (False, True):
                rows.append(Row(_label(shape, causal, nw), "sdpa", shape, causal, nw,
                                peers=_sdpa_peers("float32", nw)))
    big = (1, 16, 4096, 64) if not quick else (1, 2, 256, 32)
    for causal in (False, True):
        rows.append(Row(_label(big, causal, False), "sdpa", big, causal, False,
                        peers=_sdpa_peers()))
    f64 = (4, 8, 512, 64) if not quick else (1, 2, 64, 16)
    for nw in (False, True):
        rows.append(Row(_label(f64, False, nw) + " f64", "sdpa", f64, False, nw, "float64",
                        peers=_sdpa_peers("float64", nw)))
    mha = [(8, 384, 12, 128), (2, 768, 12, 512)] if not quick else [(2, 64, 4, 16)]
    for shape in mha:
        for nw in (False, True):
            N, E, H, L = shape
            rows.append(Row(f"MHA N={N} E={E} H={H} L={L}{' +w' if nw else ''}", "mha",
                            shape, False, nw))
    for shape in shapes:
        for causal in (False, True):
            rows.append(Row("bwd " + _label(shape, causal, False), "sdpa_bwd", shape, causal,
                            peers=("torch",)))
    for shape in mha:
        N, E, H, L = shape
        rows.append(Row(f"bwd MHA N={N} E={E} H={H} L={L}", "mha_bwd", shape, peers=("torch",)))
    # the memory row is attnpy against torch's SDPA only: ORT's allocator keeps
    # its buffers from one call to the next (a second call grows RSS by
    # nothing), so a per-call RSS growth would say little about it or XLA
    mem = (1, 16, 8192, 64) if not quick else (1, 2, 512, 32)
    rows.append(Row(_label(mem, False, False) + " mem", "sdpa", mem, False, False,
                    peers=("torch",), reps=3 if not quick else 1))
    return rows


def _label(shape, causal, nw):
    B, H, L, D = shape
    return f"B={B} H={H} L={L} D={D}{' causal' if causal else ''}{' +w' if nw else ''}"


# ---------------------------------------------------------------------------
# the contestants

# the peers of the table's columns, in order; their names there and in prose
TABLE_PEERS = ("torch", "numpy", "ort", "jax")
PEER_NAMES = {"torch": "torch", "numpy": "NumPy", "ort": "ORT", "jax": "JAX"}
LONG_NAMES = {"torch": "torch", "numpy": "NumPy", "ort": "ONNX Runtime", "jax": "JAX"}


@dataclass
class ExtraPeers:
    """ONNX Runtime and JAX as this run has them: the modules, None where
    they are not importable (skipped says why), and the thread count."""
    threads: int
    ort: object = None          # onnxruntime
    onnx: object = None
    jax: object = None
    jaxlib_version: str = ""
    jax_unpinned: str = ""      # why JAX's thread count could not be set, if it could not
    skipped: dict = field(default_factory=dict)     # "ort" / "jax": why


def load_extra_peers(threads):
    """Import the optional peers, each pinned to `threads` threads (JAX's
    pin must come before its import: bench/peers.py). Prints one line for
    a peer that is skipped."""
    import peers    # bench/peers.py: imported here, not at the top, so that
                    # bench/compare.py can import this file for its rows alone
    extra = ExtraPeers(threads)
    try:
        extra.onnx, extra.ort = peers.import_ort()
    except ImportError as e:
        extra.skipped["ort"] = f"not importable ({e})"
    why = peers.pin_jax_threads(threads)
    try:
        import jax
        import jaxlib
        extra.jax, extra.jaxlib_version, extra.jax_unpinned = jax, jaxlib.__version__, why or ""
    except ImportError as e:
        extra.skipped["jax"] = f"not importable ({e})"
    for name in ("ort", "jax"):
        if name in extra.skipped:
            print(f"{PEER_NAMES[name]} skipped: {extra.skipped[name]}")
    return extra


def make_calls(row, np, torch, attnpy, extra=None):
    """{name: zero-argument callable} for attnpy and the row's peers; ORT and
    JAX only where `extra` (ExtraPeers) has them."""
    dt = np.dtype(row.dtype)
    rng = np.random.default_rng(0)
    calls = {}
    if row.kind == "sdpa_bwd":
        B, H, L, D = row.shape
        q, k, v, dout = (rng.standard_normal((B, H, L, D), dtype=dt) for _ in range(4))
        tq, tk, tv = (torch.from_numpy(x).requires_grad_(True) for x in (q, k, v))
        t_out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=row.causal)
        tdout = torch.from_numpy(dout)
        # both sides' backward reads what the forward saved: torch's graph
        # keeps out and logsumexp, attnpy's result its output and lse
        fwd = attnpy.scaled_dot_product_attention(q, k, v, is_causal=row.causal,
                                                  need_weights=False, return_lse=True)
        calls["attnpy"] = lambda: attnpy.scaled_dot_product_attention_backward(
            dout, q, k, v, is_causal=row.causal, output=fwd.output, lse=fwd.lse)
        calls["torch"] = lambda: torch.autograd.grad(t_out, (tq, tk, tv), tdout,
                                                     retain_graph=True)
        return calls
    if row.kind == "mha_bwd":
        N, E, H, L = row.shape
        m = torch.nn.MultiheadAttention(E, H, batch_first=True).eval()
        mha = attnpy.MultiheadAttention.from_torch(m)
        x = rng.standard_normal((N, L, E), dtype=np.float32)
        dout = rng.standard_normal((N, L, E), dtype=np.float32)
        res = mha(x, trace=True)
        tx = torch.from_numpy(x).requires_grad_(True)
        t_out, _ = m(tx, tx, tx, need_weights=False)
        tdout = torch.from_numpy(dout)
        wrt = (tx,) + tuple(m.parameters())
        calls["attnpy"] = lambda: mha.backward(res, dout)
        calls["torch"] = lambda: torch.autograd.grad(t_out, wrt, tdout, retain_graph=True)
        return calls
    if row.kind == "sdpa":
        B, H, L, D = row.shape
        q, k, v = (rng.standard_normal((B, H, L, D), dtype=dt) for _ in range(3))
        tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
        scale = 1.0 / math.sqrt(D)
        causal_add = np.triu(np.full((L, L), -np.inf, dt), 1)
        t_causal_add = torch.from_numpy(causal_add)
        calls["attnpy"] = lambda: attnpy.scaled_dot_product_attention(
            q, k, v, is_causal=row.causal, need_weights=row.need_weights)
        if row.need_weights:
            def torch_maps():
                s = tq @ tk.mT * scale
                if row.causal:
                    s = s + t_causal_add
                w = torch.softmax(s, -1)
                return w @ tv, w
            calls["torch"] = torch_maps
        else:
            calls["torch"] = lambda: torch.nn.functional.scaled_dot_product_attention(
                tq, tk, tv, is_causal=row.causal)

        def numpy_attention():
            s = q @ k.swapaxes(-1, -2)
            s *= dt.type(scale)
            if row.causal:
                s += causal_add
            s -= s.max(axis=-1, keepdims=True)
            np.exp(s, out=s)
            s /= s.sum(axis=-1, keepdims=True)
            return s @ v, s
        calls["numpy"] = numpy_attention
        if extra is not None and extra.ort is not None and "ort" in row.peers:
            import peers
            calls["ort"] = peers.ort_attention(q, k, v, row.causal, row.need_weights,
                                               extra.threads)
        if extra is not None and extra.jax is not None and "jax" in row.peers:
            jax = extra.jax
            # (B, L, H, D), on the device once: the timed call is the attention alone
            jq, jk, jv = (jax.device_put(np.ascontiguousarray(x.transpose(0, 2, 1, 3)))
                          for x in (q, k, v))
            jax_attention = jax.jit(functools.partial(jax.nn.dot_product_attention,
                                                      is_causal=row.causal))
            calls["jax"] = lambda: jax_attention(jq, jk, jv).block_until_ready()
    else:
        N, E, H, L = row.shape
        m = torch.nn.MultiheadAttention(E, H, batch_first=True).eval()
        mha = attnpy.MultiheadAttention.from_torch(m)
        x = rng.standard_normal((N, L, E), dtype=np.float32)
        tx = torch.from_numpy(x)
        calls["attnpy"] = lambda: mha(x, need_weights=row.need_weights)

        def torch_mha():
            with torch.inference_mode():
                return m(tx, tx, tx, need_weights=row.need_weights, average_attn_weights=False)
        calls["torch"] = torch_mha
        sd = mha.state_dict()
        w_in, b_in = sd["in_proj_weight"], sd["in_proj_bias"]
        w_out, b_out = sd["out_proj.weight"], sd["out_proj.bias"]
        D = E // H

        def numpy_mha():
            qkv = x @ w_in.T + b_in                                 # (N, L, 3E)
            q, k, v = (qkv[..., i * E:(i + 1) * E].reshape(N, L, H, D).transpose(0, 2, 1, 3)
                       for i in range(3))
            s = q @ k.swapaxes(-1, -2)
            s *= np.float32(1.0 / math.sqrt(D))
            s -= s.max(axis=-1, keepdims=True)
            np.exp(s, out=s)
            s /= s.sum(axis=-1, keepdims=True)
            o = (s @ v).transpose(0, 2, 1, 3).reshape(N, L, E)
            return o @ w_out.T + b_out, s
        calls["numpy"] = numpy_mha
    return {name: fn for name, fn in calls.items() if name == "attnpy" or name in row.peers}


def check_peers(row, calls, np):
    """ORT's and JAX's outputs (and ORT's weights on +w rows) against attnpy's,
    once per row before it is timed: a peer computing something else would
    make its ratio meaningless, so a difference raises. The calls also
    compile JAX's function and build ORT's buffers, before the warm-up."""
    if not {"ort", "jax"} & calls.keys():
        return
    import peers
    out, weights = calls["attnpy"]()
    if "ort" in calls:
        got = calls["ort"]()
        peers.check_agrees("ONNX Runtime", row.label, row.dtype, got[0], out)
        if row.need_weights:
            peers.check_agrees("ONNX Runtime", row.label, row.dtype, got[1], weights,
                               "weights")
    if "jax" in calls:
        got = np.asarray(calls["jax"]()).transpose(0, 2, 1, 3)
        peers.check_agrees("JAX", row.label, row.dtype, got, out)


# ---------------------------------------------------------------------------
# measuring


def _status_kib(field_name):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return None


def _malloc_trim():
    """Give the C heap's free memory back to the OS (glibc), so that a call's
    allocations show up as new pages rather than reuse what earlier calls freed."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_extra_mib(fn):
    """Peak RSS growth during one call: the heap is trimmed and the high-water
    mark reset first (/proc/self/clear_refs), so this is what the call itself
    needed, outputs included. None where the kernel does not allow the reset."""
    gc.collect()
    _malloc_trim()
    time.sleep(SETTLE)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    before = _status_kib("VmRSS")
    result = fn()
    peak = _status_kib("VmHWM")
    del result
    gc.collect()
    return (peak - before) / 1024.0


SETTLE = 0.15  # seconds: other libraries' thread pools stop spinning (OpenBLAS needs ~0.1 s);
               # 0 in --quick mode, which only checks that the script runs


def time_row(row, calls, budget):
    """Rounds of blocks: each round runs a block of calls of each library in
    turn. Before a block the script sleeps SETTLE seconds and makes one
    untimed call: thread pools (attnpy's, torch's OpenMP, OpenBLAS, ORT's,
    XLA's) keep spinning after a call, and on a small machine one NumPy call halves the
    speed of whatever runs in the next few tens of milliseconds.
    Returns ({name: median seconds}, timed calls per library)."""
    for fn in calls.values():   # warm up: first-touch, thread pools, caches
        fn()
    t0 = time.perf_counter()
    calls["attnpy"]()
    first = time.perf_counter() - t0
    per_lib = row.reps or max(3, min(40, int(budget / max(first, 1e-6) / len(calls))))
    rounds = 3 if per_lib >= 6 else 1
    block = max(1, per_lib // rounds)
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            time.sleep(SETTLE)
            fn()
            for _ in range(block):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}, rounds * block


def cpu_identity():
    """(model name, family/model/stepping string or None) of this CPU."""
    cpu, fields = platform.processor() or platform.machine() or "?", {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model", "stepping", "CPU part") \
                        and key not in fields:
                    fields[key] = value.strip()
                if not line.strip() and fields:
                    break                               # the first CPU is enough
    except OSError:
        pass
    cpu = fields.get("model name", cpu)
    ident = None
    if "cpu family" in fields and "model" in fields:
        ident = f"family {fields['cpu family']}, model {fields['model']}" + (
            f", stepping {fields['stepping']}" if "stepping" in fields else "")
    elif "CPU part" in fields:                          # ARM: the part number
        ident = f"part {fields['CPU part']}"
    return cpu, ident


def cpu_slug(kernel=None):
    """A file name for this CPU: bench/results/<slug>.md keeps every machine's run.

    The family, model and stepping name the part (one "Intel Xeon Processor"
    name covers parts whose peaks differ by 1.6x), and the attnpy kernel the
    ISA it ran (the same part with AVX-512 hidden by its hypervisor runs
    another kernel), so neither overwrites the other's record.
    """
    import re
    cpu, ident = cpu_identity()
    if ident is not None:
        cpu += " " + re.sub(r"(family|model|stepping|part) ", r"\1", ident)
    if kernel:
        cpu += " " + kernel
    text = re.sub(r"\((R|TM)\)", "", cpu, flags=re.I)
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown-cpu"


def tuner_summary(attnpy):
    """The tuner's choices (attnpy.tuning()): each kernel with the cells it runs, and
    the cells where the widest candidate did not win, with both candidates' times."""
    table = attnpy.tuning()
    by_kernel = {}
    for cell, row in table.items():
        by_kernel.setdefault(f"{row['kernel']} ({row['source']})", []).append(cell)
    text = "; ".join(f"{k}: {len(v)} cells" for k, v in by_kernel.items())
    narrower = [f"{cell} " + " / ".join(f"{k} {t * 1e6:.0f} us" for k, t in row["seconds"].items())
                for cell, row in table.items()
                if row["source"] == "measured" and row["kernel"] != next(iter(row["seconds"]))]
    return text + (f"; chosen over the widest: {', '.join(narrower)}" if narrower else
                   "; the widest candidate won every measured cell")


def machine_description(np, torch, attnpy, peak, threads, extra=None):
    cpu, ident = cpu_identity()
    if ident:
        cpu = f"{cpu} ({ident})"
    blas = "?"
    try:
        from threadpoolctl import threadpool_info
        for info in threadpool_info():
            if info.get("user_api") == "blas":
                blas = f"{info.get('internal_api')} {info.get('version')} ({info.get('architecture')})"
    except ImportError:
        pass
    extra = extra or ExtraPeers(threads, skipped={"ort": "not loaded", "jax": "not loaded"})
    threads_for = "attnpy, torch, NumPy's BLAS"
    versions = (f"Python {platform.python_version()}, NumPy {np.__version__}, "
                f"torch {torch.__version__}")
    peers = []
    if extra.ort is not None:
        threads_for += ", ONNX Runtime (intra-op threads; 1 inter-op)"
        versions += f", onnxruntime {extra.ort.__version__} (onnx {extra.onnx.__version__})"
        peers.append("ORT: one opset-23 Attention node, CPUExecutionProvider, default graph "
                     "optimisation, SDPA forward rows")
    else:
        peers.append(f"ORT: skipped, {extra.skipped.get('ort')}")
    if extra.jax is not None:
        if extra.jax_unpinned:
            threads_for += f", JAX (not pinned: {extra.jax_unpinned})"
        else:
            threads_for += ", JAX (XLA's CPU pool, PJRT_NPROC)"
        versions += f", jax {extra.jax.__version__} (jaxlib {extra.jaxlib_version})"
        peers.append("JAX: jit(jax.nn.dot_product_attention) on the CPU, float32 SDPA rows "
                     "without weights")
    else:
        peers.append(f"JAX: skipped, {extra.skipped.get('jax')}")
    return {
        "CPU": f"{cpu}, {os.cpu_count()} logical CPUs",
        "attnpy kernel": f"{attnpy.get_kernel()} (supported: {', '.join(attnpy.supported_kernels())})",
        "tuner": tuner_summary(attnpy),
        "threads": f"{threads} for {threads_for}",
        "measured fp32 FMA peak": f"{peak:.0f} GFLOP/s on {threads} threads "
                                  f"({attnpy.get_kernel()} vectors)",
        "versions": versions,
        "NumPy BLAS": blas,
        "peers": "; ".join(peers),
    }


# ---------------------------------------------------------------------------
# reporting


def fmt_time(s):
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def geomean(rows, peer):
    """(geometric-mean speed-up over `peer`, rows it ran on, (smallest
    speed-up, its row's label)), or None where the peer ran on no row."""
    ratios = [(r.results["times"][peer] / r.results["times"]["attnpy"], r.label) for r in rows
              if peer in r.results["times"]]
    if not ratios:
        return None
    geo = math.exp(sum(math.log(x) for x, _ in ratios) / len(ratios))
    return geo, len(ratios), min(ratios)


def write_outputs(rows, machine, peak, out, quick):
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# attnpy benchmark", ""]
    if quick:
        lines += ["**Quick mode** (tiny rows, a check that the script runs; not results).", ""]
    lines += [f"- {k}: {v}" for k, v in machine.items()]
    lines += ["", "Times are medians over rounds of blocks of calls, each block after a "
              "pause that lets the other libraries' thread pools go idle. Speed-up = peer time / attnpy "
              "time (> 1: attnpy faster). GFLOP/s count the two products, 4·B·H·L·S·D, "
              "the lower triangle only for causal rows; multi-head rows add the four "
              "projections; backward (bwd) rows count 2.5 times the forward's (five products). Peak % is attnpy's GFLOP/s over the measured FMA peak. Memory "
              "is the peak RSS growth of one call, outputs included. GB/s (+w rows) is "
              "the weights map written per second. ORT is ONNX Runtime running the "
              "opset-23 Attention operator (a one-node model; its qk_matmul_output, mode 3, "
              "gives the weights on +w rows); JAX is jit(jax.nn.dot_product_attention), "
              "float32 rows without weights only; both run the SDPA forward rows, their "
              "outputs checked against attnpy's before timing. — : the peer did not run "
              "that row.", ""]
    names = [PEER_NAMES[p] for p in TABLE_PEERS]
    header = ("| row | attnpy | " + " | ".join(names) + " | "
              + " | ".join(f"vs {n}" for n in names)
              + " | GFLOP/s | peak % | GB/s map | attnpy MiB | torch MiB |")
    lines += [header, "|---|" + "---:|" * (2 * len(names) + 6)]
    for r in rows:
        res = r.results
        t = res["times"]
        a = t["attnpy"]
        def cell(name):
            return fmt_time(t[name]) if name in t else "—"
        def speedup(name):
            return f"{t[name] / a:.2f}x" if name in t else "—"
        gflops = r.flops / a / 1e9
        gbs = "—"
        if r.need_weights:
            if r.kind in ("sdpa", "sdpa_bwd"):
                B, H, L, D = r.shape
                nbytes = B * H * L * L * (8 if r.dtype == "float64" else 4)
            else:
                N, E, H, L = r.shape
                nbytes = N * H * L * L * 4
            gbs = f"{nbytes / a / 1e9:.1f}"
        mem = res.get("memory", {})
        mib = lambda name: f"{mem[name]:.1f}" if mem.get(name) is not None else "—"
        lines.append(f"| {r.label} | {cell('attnpy')} | "
                     + " | ".join(cell(p) for p in TABLE_PEERS) + " | "
                     + " | ".join(speedup(p) for p in TABLE_PEERS)
                     + f" | {gflops:.1f} | {100 * gflops / peak:.0f}% | {gbs} | "
                     f"{mib('attnpy')} | {mib('torch')} |")
    geos = {p: geomean(rows, p) for p in ("torch", "ort", "jax")}
    geo, n, (low, low_row) = geos["torch"]
    lines += ["", f"Geometric-mean speed-up over torch: **{geo:.2f}x** over {n} rows; "
              f"smallest: {low:.2f}x ({low_row})."]
    for p in ("ort", "jax"):        # the same, over the rows each peer ran
        if geos[p] is None:
            lines.append(f"Geometric-mean speed-up over {LONG_NAMES[p]}: not measured "
                         f"(the peer did not run).")
        else:
            g, n, (low, low_row) = geos[p]
            lines.append(f"Geometric-mean speed-up over {LONG_NAMES[p]}: **{g:.2f}x** over {n} "
                         f"rows; smallest: {low:.2f}x ({low_row}).")
    mem_rows = [r for r in rows if r.label.endswith(" mem")]
    for r in mem_rows:
        B, H, L, D = r.shape
        out_mib = B * H * L * D * 4 / 2**20
        m = r.results.get("memory", {}).get("attnpy")
        if m is not None:
            lines.append(f"Memory row {r.label}: attnpy's call grew RSS by {m:.1f} MiB; the output "
                         f"is {out_mib:.1f} MiB, so the extra is {m - out_mib:.1f} MiB "
                         f"(target: at most 64 MiB).")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    if not quick:   # every machine measured keeps its own file
        (out / "results").mkdir(exist_ok=True)
        slug = cpu_slug(machine["attnpy kernel"].split()[0])
        (out / "results" / f"{slug}.md").write_text("\n".join(lines) + "\n")
    import json
    (out / "results.json").write_text(json.dumps(
        {"machine": machine, "fma_peak_gflops": peak, "geomean_vs_torch": geo,
         "geomean_vs_ort": geos["ort"] and geos["ort"][0],
         "geomean_vs_jax": geos["jax"] and geos["jax"][0],
         "rows": [dict(label=r.label, kind=r.kind, shape=list(r.shape), causal=r.causal,
                       need_weights=r.need_weights, dtype=r.dtype, flops=r.flops,
                       seconds=r.results["times"], timed_calls=r.results["reps"],
                       peak_rss_growth_mib=r.results["memory"]) for r in rows]}, indent=1))
    _plot(rows, out / "results.png", geo)
    return {p: g and g[0] for p, g in geos.items()}


def _plot(rows, path, geo):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    labels = [r.label for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.32 * len(rows) + 1.5), constrained_layout=True)
    y = range(len(rows))
    colors = {"torch": "#d62728", "numpy": "#1f77b4", "ort": "#2ca02c", "jax": "#9467bd"}
    shown = [p for p in TABLE_PEERS if any(p in r.results["times"] for r in rows)]
    height = 0.8 / len(shown)
    for j, peer in enumerate(shown):
        off = (j - (len(shown) - 1) / 2) * height
        vals = [r.results["times"][peer] / r.results["times"]["attnpy"]
                if peer in r.results["times"] else 0 for r in rows]
        ax.barh([i + off for i in y], vals, height=height * 0.95, color=colors[peer],
                label=f"vs {LONG_NAMES[peer]}")
    ax.axvline(1.0, color="black", lw=1)
    ax.set_xscale("log")
    from matplotlib.ticker import FixedLocator, NullLocator
    top = max(max(r.results["times"][p] / r.results["times"]["attnpy"]
                  for p in shown if p in r.results["times"]) for r in rows)
    ticks = [t for t in (0.5, 1, 1.5, 2, 3, 5, 8, 12, 20, 50, 100, 200) if t <= top * 1.2]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([f"{t:g}x" for t in ticks])
    ax.set_yticks(list(y), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("attnpy speed-up (peer time / attnpy time), log scale")
    who = ", ".join(LONG_NAMES[p] for p in shown[:-1]) + f" and {LONG_NAMES[shown[-1]]}"
    ax.set_title(f"attnpy vs {who} on the CPU (geometric mean vs torch {geo:.2f}x)")
    ax.legend(loc="lower right")
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny rows, to check the script runs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--budget", type=float, default=None, help="seconds of timing per row")
    args = ap.parse_args(argv)

    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ["OPENBLAS_NUM_THREADS"] = str(args.threads)
    import numpy as np
    import torch

    import attnpy
    torch.set_num_threads(args.threads)
    attnpy.set_num_threads(args.threads)
    extra = load_extra_peers(args.threads)      # ORT and JAX, where installed
    budget = args.budget or (0.05 if args.quick else 1.5)
    global SETTLE
    if args.quick:
        SETTLE = 0.0

    iters = 2_000_000 if args.quick else 50_000_000
    peak = max(attnpy._core.fma_peak(args.threads, iters) for _ in range(3))
    machine = machine_description(np, torch, attnpy, peak, args.threads, extra)
    for k, v in machine.items():
        print(f"{k}: {v}")
    print()
    rows = matrix(args.quick)
    names = [PEER_NAMES[p] for p in TABLE_PEERS]
    print(f"{'row':42s} {'attnpy':>10s} " + " ".join(f"{n:>10s}" for n in names) + " "
          + " ".join(f"{'vs ' + n:>9s}" for n in names)
          + f" {'GFLOP/s':>8s} {'peak%':>6s} {'MiB':>7s}")
    for row in rows:
        calls = make_calls(row, np, torch, attnpy, extra)
        check_peers(row, calls, np)
        times, reps = time_row(row, calls, budget)
        memory = {name: peak_extra_mib(fn) for name, fn in calls.items()
                  if name in ("attnpy", "torch")}
        row.results = {"times": times, "reps": reps, "memory": memory}
        a = times["attnpy"]
        g = row.flops / a / 1e9
        sp = lambda n: f"{times[n] / a:8.2f}x" if n in times else f"{'—':>9s}"
        tm = lambda n: f"{fmt_time(times[n]):>10s}" if n in times else f"{'—':>10s}"
        mem = memory.get("attnpy")
        print(f"{row.label:42s} {tm('attnpy')} " + " ".join(tm(p) for p in TABLE_PEERS) + " "
              + " ".join(sp(p) for p in TABLE_PEERS) + f" {g:8.1f} {100 * g / peak:5.0f}% "
              f"{(f'{mem:7.1f}' if mem is not None else '      —')}", flush=True)
        del calls
        gc.collect()
    geos = write_outputs(rows, machine, peak, args.out, args.quick)
    print()
    for p in ("torch", "ort", "jax"):
        print(f"geometric-mean speed-up over {LONG_NAMES[p]}: "
              + (f"{geos[p]:.2f}x" if geos[p] is not None else "not measured"))
    print(f"wrote {args.out / 'results.md'} and {args.out / 'results.png'}")
    return 0


if __name__ == "__main__":
    _reexec_without_openblas_overrides()
    sys.exit(main())

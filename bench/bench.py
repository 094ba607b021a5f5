"""attnpy against PyTorch and NumPy on the CPU, side by side in one run.

    python bench/bench.py [--quick] [--threads N] [--out DIR]

Every row times attnpy and its peers with the same thread count, in rounds
of blocks (a few attnpy calls, a few torch calls, a few NumPy calls, again),
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
                      alone, on both sides)
"""
from __future__ import annotations

import argparse
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


def matrix(quick):
    shapes = [(1, 1, 8, 4), (1, 12, 32, 32), (8, 8, 128, 64), (4, 8, 512, 64), (1, 8, 2048, 64)]
    if quick:
        shapes = [(1, 1, 8, 4), (1, 4, 64, 16)]
    rows = []
    for shape in shapes:
        for causal in (False, True):
            for nw in (False, True):
                rows.append(Row(_label(shape, causal, nw), "sdpa", shape, causal, nw))
    big = (1, 16, 4096, 64) if not quick else (1, 2, 256, 32)
    for causal in (False, True):
        rows.append(Row(_label(big, causal, False), "sdpa", big, causal, False))
    f64 = (4, 8, 512, 64) if not quick else (1, 2, 64, 16)
    for nw in (False, True):
        rows.append(Row(_label(f64, False, nw) + " f64", "sdpa", f64, False, nw, "float64"))
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
    mem = (1, 16, 8192, 64) if not quick else (1, 2, 512, 32)
    rows.append(Row(_label(mem, False, False) + " mem", "sdpa", mem, False, False,
                    peers=("torch",), reps=3 if not quick else 1))
    return rows


def _label(shape, causal, nw):
    B, H, L, D = shape
    return f"B={B} H={H} L={L} D={D}{' causal' if causal else ''}{' +w' if nw else ''}"


# ---------------------------------------------------------------------------
# the contestants


def make_calls(row, np, torch, attnpy):
    """{name: zero-argument callable} for attnpy and the row's peers."""
    dt = np.dtype(row.dtype)
    rng = np.random.default_rng(0)
    calls = {}
    if row.kind == "sdpa_bwd":
        B, H, L, D = row.shape
        q, k, v, dout = (rng.standard_normal((B, H, L, D), dtype=dt) for _ in range(4))
        tq, tk, tv = (torch.from_numpy(x).requires_grad_(True) for x in (q, k, v))
        t_out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=row.causal)
        tdout = torch.from_numpy(dout)
        calls["attnpy"] = lambda: attnpy.scaled_dot_product_attention_backward(
            dout, q, k, v, is_causal=row.causal)
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
    untimed call: thread pools (attnpy's, torch's OpenMP, OpenBLAS) keep
    spinning after a call, and on a small machine one NumPy call halves the
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


def cpu_slug():
    """A file name for this CPU: bench/results/<slug>.md keeps every machine's run."""
    import re
    cpu, ident = cpu_identity()
    if ident is not None:
        cpu += " " + ident.split(", stepping")[0].replace("family ", "family").replace(
            "model ", "model").replace("part ", "part")
    text = re.sub(r"\((R|TM)\)", "", cpu, flags=re.I)
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown-cpu"


def machine_description(np, torch, attnpy, peak, threads):
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
    return {
        "CPU": f"{cpu}, {os.cpu_count()} logical CPUs",
        "attnpy kernel": f"{attnpy.get_kernel()} (supported: {', '.join(attnpy.supported_kernels())})",
        "threads": f"{threads} for attnpy, torch and NumPy's BLAS",
        "measured fp32 FMA peak": f"{peak:.0f} GFLOP/s on {threads} threads "
                                  f"({attnpy.get_kernel()} vectors)",
        "versions": f"Python {platform.python_version()}, NumPy {np.__version__}, "
                    f"torch {torch.__version__}",
        "NumPy BLAS": blas,
    }


# ---------------------------------------------------------------------------
# reporting


def fmt_time(s):
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


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
              "the weights map written per second.", ""]
    header = ("| row | attnpy | torch | NumPy | vs torch | vs NumPy | GFLOP/s | peak % | "
              "GB/s map | attnpy MiB | torch MiB |")
    lines += [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
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
        lines.append(f"| {r.label} | {cell('attnpy')} | {cell('torch')} | {cell('numpy')} | "
                     f"{speedup('torch')} | {speedup('numpy')} | {gflops:.1f} | "
                     f"{100 * gflops / peak:.0f}% | {gbs} | {mib('attnpy')} | {mib('torch')} |")
    vs_torch = [r.results["times"]["torch"] / r.results["times"]["attnpy"] for r in rows
                if "torch" in r.results["times"]]
    geo = math.exp(sum(math.log(x) for x in vs_torch) / len(vs_torch))
    slowest = min(zip(vs_torch, [r.label for r in rows if "torch" in r.results["times"]]))
    lines += ["", f"Geometric-mean speed-up over torch: **{geo:.2f}x** over {len(vs_torch)} rows; "
              f"smallest: {slowest[0]:.2f}x ({slowest[1]})."]
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
        (out / "results" / f"{cpu_slug()}.md").write_text("\n".join(lines) + "\n")
    import json
    (out / "results.json").write_text(json.dumps(
        {"machine": machine, "fma_peak_gflops": peak, "geomean_vs_torch": geo,
         "rows": [dict(label=r.label, kind=r.kind, shape=list(r.shape), causal=r.causal,
                       need_weights=r.need_weights, dtype=r.dtype, flops=r.flops,
                       seconds=r.results["times"], timed_calls=r.results["reps"],
                       peak_rss_growth_mib=r.results["memory"]) for r in rows]}, indent=1))
    _plot(rows, out / "results.png", geo)
    return geo


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
    for off, peer, color in ((-0.2, "torch", "#d62728"), (0.2, "numpy", "#1f77b4")):
        vals = [r.results["times"][peer] / r.results["times"]["attnpy"]
                if peer in r.results["times"] else 0 for r in rows]
        ax.barh([i + off for i in y], vals, height=0.38, color=color, label=f"vs {peer}")
    ax.axvline(1.0, color="black", lw=1)
    ax.set_xscale("log")
    from matplotlib.ticker import FixedLocator, NullLocator
    top = max(max(r.results["times"][p] / r.results["times"]["attnpy"]
                  for p in ("torch", "numpy") if p in r.results["times"]) for r in rows)
    ticks = [t for t in (0.5, 1, 1.5, 2, 3, 5, 8, 12, 20) if t <= top * 1.2]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([f"{t:g}x" for t in ticks])
    ax.set_yticks(list(y), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("attnpy speed-up (peer time / attnpy time), log scale")
    ax.set_title(f"attnpy vs torch and NumPy on the CPU (geometric mean vs torch {geo:.2f}x)")
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
    budget = args.budget or (0.05 if args.quick else 1.5)
    global SETTLE
    if args.quick:
        SETTLE = 0.0

    iters = 2_000_000 if args.quick else 50_000_000
    peak = max(attnpy._core.fma_peak(args.threads, iters) for _ in range(3))
    machine = machine_description(np, torch, attnpy, peak, args.threads)
    for k, v in machine.items():
        print(f"{k}: {v}")
    print()
    rows = matrix(args.quick)
    print(f"{'row':42s} {'attnpy':>10s} {'torch':>10s} {'NumPy':>10s} {'vs torch':>9s} "
          f"{'vs NumPy':>9s} {'GFLOP/s':>8s} {'peak%':>6s} {'MiB':>7s}")
    for row in rows:
        calls = make_calls(row, np, torch, attnpy)
        times, reps = time_row(row, calls, budget)
        memory = {name: peak_extra_mib(fn) for name, fn in calls.items()
                  if name in ("attnpy", "torch")}
        row.results = {"times": times, "reps": reps, "memory": memory}
        a = times["attnpy"]
        g = row.flops / a / 1e9
        sp = lambda n: f"{times[n] / a:8.2f}x" if n in times else f"{'—':>9s}"
        tm = lambda n: f"{fmt_time(times[n]):>10s}" if n in times else f"{'—':>10s}"
        mem = memory.get("attnpy")
        print(f"{row.label:42s} {tm('attnpy')} {tm('torch')} {tm('numpy')} {sp('torch')} "
              f"{sp('numpy')} {g:8.1f} {100 * g / peak:5.0f}% "
              f"{(f'{mem:7.1f}' if mem is not None else '      —')}", flush=True)
        del calls
        gc.collect()
    geo = write_outputs(rows, machine, peak, args.out, args.quick)
    print(f"\ngeometric-mean speed-up over torch: {geo:.2f}x")
    print(f"wrote {args.out / 'results.md'} and {args.out / 'results.png'}")
    return 0


if __name__ == "__main__":
    _reexec_without_openblas_overrides()
    sys.exit(main())

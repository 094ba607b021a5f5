"""Does the tuner pick the fastest kernel? Each cell's candidates timed on
bench-sized calls, beside the tuner's own pick, in one interleaved run.

    bash dev.sh bench-tuner [--quick] [--threads 2]

For each cap the tuner is given ("auto": every tiled kernel this CPU runs;
"avx2": as an AVX2-only CPU would choose, on x86-64 CPUs with AVX-512; on
ARM64 "neon" is the only cap), the tuner measures its cells (one head,
one thread, a few milliseconds per cell), then for one bench-sized call
per cell (2 threads, B*H heads) this script times every candidate forced
with use_kernel and the tuner's choice (use_kernel("auto")), with bench.py's
timing (rounds of blocks, medians). It prints, per cell and cap, what the
tuner chose, each candidate's median, and the chosen kernel's time over the
fastest candidate's (1.00: the tuner picked the fastest one). Writes
bench/results/tuner-<cpu>.md unless --quick.
"""
import argparse
import os
import sys
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))


def cell_calls(np, attnpy, cell, quick):
    """(label, fn) of one bench-sized call of `cell`."""
    rng = np.random.default_rng(0)
    op, dt, *width = cell.split("_")
    dtype = np.float32 if dt == "f32" else np.float64
    if op == "linear":
        N, M, K = (1, 16, 32) if quick else (2, 512, 768)
        x, w = rng.standard_normal((N, M, K)).astype(dtype), rng.standard_normal((K, K)).astype(dtype)
        return f"x ({N},{M},{K}) @ W ({K},{K}).T", lambda: attnpy._core.linear(x, w)
    E = {"e32": 32, "e64": 64, "e128": 128}[width[0]]
    B, H, L = (1, 2, 16) if quick else (4, 8, 512) if dt == "f32" else (2, 8, 512)
    q, k, v = (rng.standard_normal((B, H, L, E)).astype(dtype) for _ in range(3))
    label = f"({B},{H},{L},{E})"
    if op == "sdpa":
        return label, lambda: attnpy.scaled_dot_product_attention(q, k, v, need_weights=False)
    res = attnpy.scaled_dot_product_attention(q, k, v, need_weights=False, return_lse=True)
    dout = np.ones_like(q)
    return label + " backward", lambda: attnpy.scaled_dot_product_attention_backward(
        dout, q, k, v, output=res.output, lse=res.lse)


def forced(attnpy, kernel, fn):
    def call():
        with attnpy.use_kernel(kernel):
            return fn()
    return call


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny calls, to check the script runs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    import numpy as np

    import attnpy
    import bench
    if args.quick:
        bench.SETTLE = 0.0
    attnpy.set_num_threads(args.threads)
    tiled = [k for k in attnpy.supported_kernels() if k != "reference"]
    caps = ["auto"] + (["avx2"] if "avx512" in tiled else [])
    cpu, ident = bench.cpu_identity()
    head = [f"# Tuner check: {cpu}" + (f" ({ident})" if ident else ""), "",
            f"- threads: {args.threads}; kernels: {', '.join(tiled)}; "
            f"{'quick mode (tiny calls: not results)' if args.quick else 'one interleaved run'}",
            "- per cell and cap: the tuner's choice from its own measurement (one head, one "
            "thread), then every candidate and the choice timed on a bench-sized call (medians); "
            "choice / fastest = 1.00 when the tuner picked the fastest candidate.", "",
            "| cap | cell | call | tuner's choice (its own µs) | " + "candidates' medians"
            " | choice / fastest |", "|---|---|---|---|---|---|"]
    lines, worst = [], 1.0
    print("\n".join(head[:3]))
    for cap in caps:
        attnpy.set_tuning("measure", cap=cap)
        table = attnpy.tuning()
        for cell, row in table.items():
            label, fn = cell_calls(np, attnpy, cell, args.quick)
            calls = {"attnpy": forced(attnpy, "auto", fn)}
            calls.update({k: forced(attnpy, k, fn) for k in row["seconds"]})
            times, _ = bench.time_row(SimpleNamespace(reps=3 if args.quick else None), calls,
                                      0.05 if args.quick else 0.6)
            fastest = min(times[k] for k in row["seconds"])
            ratio = times[row["kernel"]] / fastest
            worst = max(worst, ratio)
            own = " / ".join(f"{k} {s * 1e6:.0f}" for k, s in row["seconds"].items() if s)
            cands = ", ".join(f"{k} {bench.fmt_time(times[k])}" for k in row["seconds"])
            line = (f"| {cap} | {cell} | {label} | {row['kernel']} ({row['source']}"
                    f"{': ' + own if own else ''}) | {cands} | {ratio:.2f} |")
            lines.append(line)
            print(line, flush=True)
    attnpy.set_tuning("measure")
    tail = ["", f"Largest choice / fastest: {worst:.2f}. This CPU's choices as ATTNPY_TUNE "
            f"pins (no cap): `{attnpy.tuning_spec()}`"]
    print("\n".join(tail))
    if not args.quick:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"tuner-{bench.cpu_slug(attnpy.get_kernel())}.md"
        path.write_text("\n".join(head + lines + tail) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark of issue 15's rows: sliding windows, ALiBi and attn_bias, and
a decoding step with a KV cache, each against torch measured side by side
in the same run (bench.py's timing: rounds of blocks, medians).

    bash dev.sh bench-positions [--quick] [--threads 2]

Rows (float32, no weights unless said):
- window: L = 16384, H = 8, D = 64, window (255, 0) causal, against torch
  SDPA given the same window as a bool mask, and against attnpy's own dense
  causal call (what the window saves).
- ALiBi / bias: L = 2048, H = 8, D = 64, causal, attnpy with alibi_slopes or
  an (H, L, L) attn_bias against attnpy's plain causal call (the overhead)
  and torch with the same float mask.
- decode: one new token against a cache of 4096 (Llama-like: H = 32, Hkv =
  8, D = 128, GQA; GPT-2-like: H = 12, D = 64), attnpy bottom-right causal
  (query_offset = 4095) against torch SDPA on the same cached tensors.
Prints each median, the ratios, the extra peak memory of attnpy and torch,
and the CPU they come from.
"""
import argparse
import gc
import os
import sys
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))


def rows(np, torch, attnpy, quick):
    """(label, {name: callable}, (attnpy's result, torch's)) for each row."""
    rng = np.random.default_rng(0)
    out = []
    f32 = lambda *shape: rng.standard_normal(shape, dtype=np.float32)

    out += window_rows(np, torch, attnpy, f32, quick)
    out += bias_rows(np, torch, attnpy, f32, quick)
    out += decode_rows(np, torch, attnpy, f32, quick)
    return out


def window_rows(np, torch, attnpy, f32, quick):
    F = torch.nn.functional
    H, L, D, left = (8, 16384, 64, 255) if not quick else (2, 1024, 32, 63)
    q, k, v = f32(1, H, L, D), f32(1, H, L, D), f32(1, H, L, D)
    i, j = np.arange(L)[:, None], np.arange(L)[None]
    keep = torch.from_numpy((j <= i) & (j >= i - left))        # bool: True = attend
    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
    return [(f"window ({left}, 0) causal H={H} L={L} D={D}", {
        "attnpy": lambda: attnpy.scaled_dot_product_attention(
            q, k, v, is_causal=True, window=(left, 0), need_weights=False).output,
        "torch": lambda: F.scaled_dot_product_attention(tq, tk, tv, attn_mask=keep),
        "attnpy dense causal": lambda: attnpy.scaled_dot_product_attention(
            q, k, v, is_causal=True, need_weights=False).output})]


def bias_rows(np, torch, attnpy, f32, quick):
    F = torch.nn.functional
    H, L, D = (8, 2048, 64) if not quick else (2, 256, 32)
    q, k, v = f32(1, H, L, D), f32(1, H, L, D), f32(1, H, L, D)
    slopes = attnpy.alibi_slopes(H)
    i, j = np.arange(L)[:, None], np.arange(L)[None]
    alibi = (-slopes[:, None, None] * np.abs(i - j)).astype(np.float32)       # (H, L, L)
    causal_alibi = torch.from_numpy(np.where(j <= i, alibi, -np.inf).astype(np.float32))
    bias = (0.1 * f32(H, L, L))
    causal_bias = torch.from_numpy(np.where(j <= i, bias, -np.inf).astype(np.float32))
    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
    plain = lambda: attnpy.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                        need_weights=False).output
    return [(f"ALiBi causal H={H} L={L} D={D}", {
        "attnpy": lambda: attnpy.scaled_dot_product_attention(
            q, k, v, is_causal=True, alibi_slopes=slopes, need_weights=False).output,
        "torch": lambda: F.scaled_dot_product_attention(tq, tk, tv, attn_mask=causal_alibi),
        "attnpy plain causal": plain}),
            (f"attn_bias (H, L, L) causal H={H} L={L} D={D}", {
        "attnpy": lambda: attnpy.scaled_dot_product_attention(
            q, k, v, is_causal=True, attn_bias=bias, need_weights=False).output,
        "torch": lambda: F.scaled_dot_product_attention(tq, tk, tv, attn_mask=causal_bias),
        "attnpy plain causal": plain})]


def decode_rows(np, torch, attnpy, f32, quick):
    F = torch.nn.functional
    out = []
    S = 4096 if not quick else 256
    for name, H, Hkv, D in (("Llama-like", 32, 8, 128), ("GPT-2-like", 12, 12, 64)):
        cache = attnpy.KVCache(1, Hkv, S, D)
        cache.append(f32(1, Hkv, S - 1, D), f32(1, Hkv, S - 1, D))
        keys, values = cache.append(f32(1, Hkv, 1, D), f32(1, Hkv, 1, D))
        qn = f32(1, H, 1, D)
        tq, tk, tv = (torch.from_numpy(x) for x in (qn, keys, values))
        gqa = Hkv != H
        out.append((f"decode 1 token, cache {S}, {name} H={H} Hkv={Hkv} D={D}", {
            "attnpy": lambda qn=qn, keys=keys, values=values, gqa=gqa:
                attnpy.scaled_dot_product_attention(
                    qn, keys, values, is_causal=True, query_offset=S - 1, enable_gqa=gqa,
                    need_weights=False).output,
            "torch": lambda tq=tq, tk=tk, tv=tv, gqa=gqa: F.scaled_dot_product_attention(
                tq, tk, tv, enable_gqa=gqa)}))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small rows, to check the script runs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget", type=float, default=None, help="seconds of timing per row")
    args = ap.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import numpy as np
    import torch

    import attnpy
    import bench
    torch.set_num_threads(args.threads)
    attnpy.set_num_threads(args.threads)
    if args.quick:
        bench.SETTLE = 0.0
    budget = args.budget or (0.05 if args.quick else 2.0)
    cpu, ident = bench.cpu_identity()
    print(f"cpu: {cpu}{f' ({ident})' if ident else ''}; threads {args.threads}; "
          f"torch {torch.__version__}; attnpy kernel {attnpy._core.get_kernel()}")
    print(f"{'row':58s} {'attnpy':>9s} {'torch':>9s} {'vs torch':>9s}  {'own other':>10s} "
          f"{'ratio':>7s}  {'MiB attnpy':>10s} {'MiB torch':>9s}")
    for label, calls in rows(np, torch, attnpy, args.quick):
        a, t = calls["attnpy"](), calls["torch"]()
        err = float(np.max(np.abs(a - t.numpy()))) if a.size else 0.0
        if not err < 1e-4:
            raise SystemExit(f"{label}: attnpy and torch differ by {err}")
        times, _ = bench.time_row(SimpleNamespace(reps=0), calls, budget)
        memory = {n: bench.peak_extra_mib(calls[n]) for n in ("attnpy", "torch")}
        other = next((n for n in calls if n not in ("attnpy", "torch")), None)
        own = (f"{bench.fmt_time(times[other]):>10s} {times[other] / times['attnpy']:6.2f}x"
               if other else f"{'':>10s} {'':>7s}")
        print(f"{label:58s} {bench.fmt_time(times['attnpy']):>9s} "
              f"{bench.fmt_time(times['torch']):>9s} {times['torch'] / times['attnpy']:8.2f}x  "
              f"{own}  {memory['attnpy']:10.1f} {memory['torch']:9.1f}"
              + (f"   ({other})" if other else ""), flush=True)
        del calls
        gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Two builds of attnpy timed side by side, interleaved, in one run.

    python bench/compare.py BEFORE_DIR AFTER_DIR [--quick] [--out FILE]
                            [--control] [--processes] [--threads N]
                            [--minutes M] [--budget S] [--rows REGEX]
                            [--plan] [--json FILE]

BEFORE_DIR and AFTER_DIR are source trees, each with an ``attnpy`` package
whose extension is built in place (``python setup.py build_ext --inplace``).
The rows are bench/bench.py's (the bench.py next to this file), attnpy's
calls only, through the public API; no torch.

How it measures. Each build's package is copied into a temporary directory
under its own name (attnpy_before, attnpy_after, with --control also
attnpy_control, a second copy of BEFORE) and imported into this one process,
so each has its own extension file, code and thread pool. Both use the same
thread count (--threads, default 2) and get the same inputs (seeded NumPy
arrays; multi-head parameters loaded with load_state_dict). A row is timed in
rounds: each round runs a block of calls of each build in turn, the order
rotating from round to round (A B, B A, ...). Before a block: a pause (so
the other build's pool has stopped spinning; its workers spin 1 ms after a
job) and, for calls under 20 ms, one untimed call (the warm-up; slower
calls need none). Every call is timed on
its own, with the garbage collector off; a build's time is the median over
all its calls.

How long. A first pass times one call of every row (of BEFORE); from that,
each build gets about 1 s of timed calls per row (--budget), 6 to 400 calls,
in at most 12 rounds. If that would take longer than --minutes (default 5),
each build's time on a row is capped, the same cap for every row, the
largest that fits: rows of slow calls get fewer calls (down to 3), rows of
fast ones keep theirs, and a slow or busy machine gets wider intervals, not
an unbounded run.
--plan prints the plan and its estimated duration after the first pass and
stops.

The noise estimate. Rounds are paired (the blocks of one round ran next to
each other), so the ratio's 95% interval comes from resampling rounds with
replacement (bootstrap, 1000 resamples) and taking the ratio of the medians
each time. The per-round ratios (median of the round's after block over its
before block) are shown too, as min-max. A row is "within noise" when its
interval contains 1.00. --control adds an A/A control, a third contestant
that is a second copy of BEFORE, and a column with its ratio over BEFORE:
what "no change" looks like on this machine in this run.

--processes runs each build in a worker process of its own (importing it
as plain ``attnpy``), driven block by block over a pipe, for builds that
cannot be loaded under another package name (one that imports ``attnpy`` by
its absolute name; in-process loading stops with a message saying so).

--quick: bench.py's tiny rows, short budgets; runs in seconds, to check the
script, not to measure.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import importlib
import math
import os
import pickle
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

SMALL_CALL = 0.02   # seconds: below this, one untimed call before each block
MIN_CALLS = 6       # timed calls per build and row, at least
FEWEST_CALLS = 3    # and at the least under a time limit
MAX_CALLS = 400     # and at most


def _bench_rows(quick):
    """bench.py's rows (its matrix), from the bench.py beside this file."""
    sys.path.insert(0, str(HERE))
    try:
        import bench
    finally:
        sys.path.remove(str(HERE))
    return bench.matrix(quick)


# ---------------------------------------------------------------------------
# one build's side of a row (the same code in-process and in a worker)


def _row_spec(row):
    return dict(label=row.label, kind=row.kind, shape=tuple(row.shape), causal=row.causal,
                need_weights=row.need_weights, dtype=row.dtype)


def _inputs(spec, np):
    """The row's inputs, the same for every build (seeded)."""
    rng = np.random.default_rng(0)
    if spec["kind"] in ("sdpa", "sdpa_bwd"):
        dt = np.dtype(spec["dtype"])
        n = 3 if spec["kind"] == "sdpa" else 4
        return {"arrays": [rng.standard_normal(spec["shape"], dtype=dt) for _ in range(n)]}
    N, E, H, L = spec["shape"]
    x = rng.standard_normal((N, L, E), dtype=np.float32)
    dout = rng.standard_normal((N, L, E), dtype=np.float32)
    # the parameters under torch's names, drawn here so that both builds get
    # the same ones whatever their own initialisation does
    prng = np.random.default_rng(1)
    bound_in, bound_out = math.sqrt(6.0 / (4 * E)), 1.0 / math.sqrt(E)
    state = {"in_proj_weight": prng.uniform(-bound_in, bound_in, (3 * E, E)),
             "in_proj_bias": prng.uniform(-0.1, 0.1, (3 * E,)),
             "out_proj.weight": prng.uniform(-bound_out, bound_out, (E, E)),
             "out_proj.bias": prng.uniform(-0.1, 0.1, (E,))}
    return {"x": x, "dout": dout,
            "state": {k: v.astype(np.float32) for k, v in state.items()}}


class Runner:
    """Calls one build's public API on one row at a time."""

    def __init__(self, api, np, threads):
        self.api, self.np = api, np
        api.set_num_threads(threads)
        if api.get_num_threads() != threads:
            raise RuntimeError(f"set_num_threads({threads}) gave {api.get_num_threads()} threads")
        self.fn = None

    def info(self):
        return {"kernel": self.api.get_kernel(), "threads": self.api.get_num_threads(),
                "version": getattr(self.api, "__version__", "?")}

    def setup(self, spec, inputs=None):
        api, np = self.api, self.np
        inp = inputs if inputs is not None else _inputs(spec, np)
        kind, causal, nw = spec["kind"], spec["causal"], spec["need_weights"]
        if kind == "sdpa":
            q, k, v = inp["arrays"]
            self.fn = lambda: api.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                               need_weights=nw)
        elif kind == "sdpa_bwd":
            q, k, v, dout = inp["arrays"]
            self.fn = lambda: api.scaled_dot_product_attention_backward(dout, q, k, v,
                                                                        is_causal=causal)
        else:
            N, E, H, L = spec["shape"]
            m = api.MultiheadAttention(E, H)
            m.load_state_dict(inp["state"])
            m.eval()
            x, dout = inp["x"], inp["dout"]
            if kind == "mha":
                self.fn = lambda: m(x, need_weights=nw)
            else:
                res = m(x, trace=True)
                self.fn = lambda: m.backward(res, dout)

    def first_time(self):
        t0 = time.perf_counter()
        self.fn()
        return time.perf_counter() - t0

    def block(self, n, settle, precall, keep=False):
        """A pause, maybe one untimed call, then n calls timed one by one, the
        garbage collector off (it collects once per row, in release). With
        keep, also the last call's arrays (the check of the results)."""
        fn = self.fn
        time.sleep(settle)
        if precall:
            fn()
        times = []
        gc.disable()
        try:
            for _ in range(n - 1 if keep else n):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            if keep:
                t0 = time.perf_counter()
                res = fn()
                times.append(time.perf_counter() - t0)
        finally:
            gc.enable()
        return (times, list(_arrays(res, self.np))) if keep else times

    def release(self):
        self.fn = None
        gc.collect()


def _arrays(obj, np):
    """The arrays in a result: ndarrays, tuples, dicts, dataclasses (public fields)."""
    if isinstance(obj, np.ndarray):
        yield obj
    elif dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            if not f.name.startswith("_"):
                yield from _arrays(getattr(obj, f.name), np)
    elif isinstance(obj, dict):
        for k in sorted(obj):
            yield from _arrays(obj[k], np)
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            yield from _arrays(x, np)


# ---------------------------------------------------------------------------
# the builds


def _package_dir(src):
    pkg = Path(src).resolve() / "attnpy"
    if not (pkg / "__init__.py").is_file():
        sys.exit(f"compare.py: {src} has no attnpy package (attnpy/__init__.py)")
    exts = sorted(pkg.glob("*.so"))
    if not exts:
        sys.exit(f"compare.py: {pkg} has no built extension; build it in place:\n"
                 f"  cd {Path(src).resolve()} && python setup.py build_ext --inplace")
    return pkg, exts


def describe_build(src):
    """Where a build comes from: its commit, uncommitted changes, extension hash."""
    src = Path(src).resolve()
    pkg, exts = _package_dir(src)
    d = {"dir": str(src)}
    try:
        head = subprocess.run(["git", "-C", str(src), "log", "-1", "--format=%h"],
                              capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10)
        if head.returncode == 0:
            d["commit"] = head.stdout.strip()
            d["uncommitted changes"] = "yes" if dirty.stdout.strip() else "no"
    except (OSError, subprocess.SubprocessError):
        pass
    h = hashlib.sha256()
    for e in exts:
        h.update(e.read_bytes())
    d["extension"] = f"{', '.join(e.name for e in exts)} (sha256 {h.hexdigest()[:12]})"
    built = min(e.stat().st_mtime for e in exts)
    sources = [p for p in (src / "csrc").glob("*") if p.is_file()] if (src / "csrc").is_dir() else []
    newer = [p.name for p in sources if p.stat().st_mtime > built]
    if newer:
        d["WARNING"] = f"sources newer than the extension ({', '.join(sorted(newer)[:4])}): rebuild?"
    return d


class _NoPlainAttnpy:
    """In-process mode: a build must not import 'attnpy' by its absolute name
    (it would get neither build, or the wrong one). Fail loudly instead."""

    def find_spec(self, name, path=None, target=None):
        if name == "attnpy" or name.startswith("attnpy."):
            raise ImportError(f"a build imported {name!r} by its absolute name, which "
                              "in-process loading cannot serve; rerun with --processes")
        return None


class LocalBuild:
    """A build imported into this process under its own package name."""

    def __init__(self, name, src, tmp, np, threads):
        pkg, _ = _package_dir(src)
        shutil.copytree(pkg, tmp / name, ignore=shutil.ignore_patterns("__pycache__"))
        importlib.invalidate_caches()
        try:
            self.module = importlib.import_module(name)
        except ImportError as e:
            sys.exit(f"compare.py: cannot load {src} as {name}: {e}")
        self.runner = Runner(self.module, np, threads)
        self.name = name

    def info(self):
        return self.runner.info()

    def setup(self, spec, inputs):
        self.runner.setup(spec, inputs)

    def first_time(self):
        return self.runner.first_time()

    def block(self, n, settle, precall, keep=False):
        return self.runner.block(n, settle, precall, keep)

    def release(self):
        self.runner.fn = None        # main collects once for all the in-process builds

    def close(self):
        pass


class WorkerBuild:
    """A build in a worker process (python compare.py --worker DIR), one
    request at a time over its stdin/stdout (pickles)."""

    def __init__(self, name, src, tmp, np, threads):
        pkg, _ = _package_dir(src)
        root = tmp / name
        root.mkdir()
        shutil.copytree(pkg, root / "attnpy", ignore=shutil.ignore_patterns("__pycache__"))
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker",
                                      str(root), "--threads", str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self.name = name
        self._info = self._ask("info")

    def _ask(self, *request):
        pickle.dump(request, self.proc.stdin)
        self.proc.stdin.flush()
        try:
            ok, value = pickle.load(self.proc.stdout)
        except EOFError:
            raise RuntimeError(f"the worker for {self.name} died (see its stderr above)")
        if not ok:
            raise RuntimeError(f"the worker for {self.name} failed:\n{value}")
        return value

    def info(self):
        return self._info

    def setup(self, spec, inputs):
        self._ask("setup", spec)   # the worker draws the same seeded inputs itself

    def first_time(self):
        return self._ask("first_time")

    def block(self, n, settle, precall, keep=False):
        return self._ask("block", n, settle, precall, keep)

    def release(self):
        self._ask("release")

    def close(self):
        try:
            pickle.dump(("quit",), self.proc.stdin)
            self.proc.stdin.close()
        except OSError:
            pass
        self.proc.wait(timeout=30)


def worker_main(root, threads):
    """The worker's loop: requests on stdin, (ok, value) on stdout."""
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    sys.stdout = sys.stderr          # nothing else may write into the pipe
    inp = sys.stdin.buffer
    sys.path.insert(0, root)
    import traceback

    import numpy as np
    import attnpy
    if not attnpy.__file__.startswith(root):
        raise RuntimeError(f"the worker imported {attnpy.__file__}, not the copy in {root}")
    runner = Runner(attnpy, np, threads)
    while True:
        try:
            request = pickle.load(inp)
        except EOFError:
            return 0
        if request[0] == "quit":
            return 0
        try:
            if request[0] == "setup":
                value = runner.setup(request[1])
            else:
                value = getattr(runner, request[0])(*request[1:])
            reply = (True, value)
        except Exception:
            reply = (False, traceback.format_exc())
        pickle.dump(reply, out)
        out.flush()


# ---------------------------------------------------------------------------
# timing and statistics


def row_costs(builds, rows, np):
    """The plan's first step: seconds per call of each row, from the first
    build (one call after a warm-up one for calls under SMALL_CALL)."""
    costs = []
    for row in rows:
        b = builds[0]
        b.setup(_row_spec(row), _inputs(_row_spec(row), np))
        c = b.first_time()
        if c < SMALL_CALL:
            c = b.first_time()
        b.release()
        gc.collect()
        costs.append(c)
    return costs


def _row_plan(c, budget, cap, rounds_max):
    """Calls of one build on a row whose calls take c seconds: budget / c,
    6 to 400; with a cap (seconds per build and row, the time limit's share)
    no more than cap / c unless that is under 3."""
    n = max(MIN_CALLS, min(MAX_CALLS, int(budget / max(c, 1e-7))))
    if cap is not None:
        n = min(n, max(FEWEST_CALLS, int(cap / max(c, 1e-7))))
    rounds = min(n, rounds_max)
    return {"rounds": rounds, "block": max(1, round(n / rounds)), "precall": c < SMALL_CALL}


def _row_seconds(c, kind, plan, n_builds, settle):
    """What a row will take: MHA backward's traced forward (about one call
    per build), the timed blocks with their untimed calls and pauses."""
    setup = n_builds if kind == "mha_bwd" else 0
    per_block = (plan["block"] + plan["precall"]) * c + settle
    return setup * c + n_builds * plan["rounds"] * per_block


def make_plan(rows, costs, n_builds, budget, rounds_max, settle, minutes):
    """Per-row rounds and block sizes. With a time limit (minutes > 0) that
    the plan would pass, the time of each build on a row is capped (the same
    cap for every row, the largest that fits): rows of slow calls get fewer
    calls (down to 3), rows of fast calls keep theirs. Returns (plans, cap,
    seconds); cap is None when nothing had to give."""
    def total(cap):
        plans = [_row_plan(c, budget, cap, rounds_max) for c in costs]
        return plans, sum(_row_seconds(c, r.kind, p, n_builds, settle)
                          for c, r, p in zip(costs, rows, plans))
    plans, secs = total(None)
    if minutes <= 0 or secs <= 60 * minutes:
        return plans, None, secs
    lo, hi = 0.0, max(max(MIN_CALLS * c, budget) for c in costs)
    for _ in range(40):                       # bisection on the cap
        mid = (lo + hi) / 2
        if total(mid)[1] <= 60 * minutes:
            lo = mid
        else:
            hi = mid
    plans, secs = total(lo)
    return plans, lo, secs


def time_row(builds, plan, settle, np):
    """({build name: [[seconds per call] per round]}, agreement) for the row
    set up in every build. The first round's blocks of the two compared
    builds keep their last call's arrays, which are compared and dropped."""
    times = {b.name: [] for b in builds}
    agree = None
    for r in range(plan["rounds"]):
        order = builds[r % len(builds):] + builds[:r % len(builds)]
        kept = {}
        for b in order:
            if r == 0 and b in builds[:2]:
                ts, kept[b.name] = b.block(plan["block"], settle, plan["precall"], keep=True)
                if len(kept) == 2:
                    agree = agreement(kept[builds[0].name], kept[builds[1].name], np)
                    kept.clear()
            else:
                ts = b.block(plan["block"], settle, plan["precall"])
            times[b.name].append(ts)
    return times, agree


def _median(xs):
    return statistics.median(xs)


def ratio_stats(base, other, np, resamples=1000, seed=0):
    """Ratio of medians (other / base) with a 95% interval from resampling
    rounds with replacement (paired), and the per-round ratios' range."""
    a, b = np.asarray(base), np.asarray(other)          # (rounds, block)
    ratio = float(np.median(b) / np.median(a))
    rng = np.random.default_rng(seed)
    R = a.shape[0]
    idx = rng.integers(0, R, size=(resamples, R))
    ra = np.median(a[idx].reshape(resamples, -1), axis=1)
    rb = np.median(b[idx].reshape(resamples, -1), axis=1)
    lo, hi = np.percentile(rb / ra, [2.5, 97.5])
    per_round = np.median(b, axis=1) / np.median(a, axis=1)
    return {"ratio": ratio, "ci": (float(lo), float(hi)),
            "rounds": (float(per_round.min()), float(per_round.max()))}


def agreement(ref, arrs, np):
    """Largest |difference| over largest |reference| among a result's arrays
    (0.0: bit for bit); None when the results do not line up."""
    if len(ref) != len(arrs):
        return None
    worst = 0.0
    for x, y in zip(ref, arrs):
        if x.shape != y.shape:
            return None
        if x.size == 0 or np.array_equal(x, y, equal_nan=True):
            continue
        scale = float(np.nanmax(np.abs(x))) or 1.0
        worst = max(worst, float(np.nanmax(np.abs(x.astype(np.float64) - y))) / scale)
    return worst


# ---------------------------------------------------------------------------
# reporting


def fmt_time(s):
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def cpu_description():
    info = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            k, _, v = line.partition(":")
            if k.strip() in ("Model name", "CPU family", "Model", "Stepping", "CPU(s)"):
                info[k.strip()] = v.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    if "Model name" not in info:
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    info["Model name"] = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    s = info.get("Model name", platform.processor() or "?")
    if "CPU family" in info:
        s += f" (family {info['CPU family']}, model {info.get('Model', '?')}, " \
             f"stepping {info.get('Stepping', '?')})"
    return s + f", {info.get('CPU(s)', os.cpu_count())} logical CPUs"


def verdict(st):
    lo, hi = st["ci"]
    if lo <= 1.0 <= hi:
        return "within noise"
    pct = 100 * (st["ratio"] - 1)
    return f"slower {pct:+.1f}%" if pct > 0 else f"faster {pct:+.1f}%"


def _ci(st):
    return f"{st['ci'][0]:.3f}–{st['ci'][1]:.3f}"


def markdown(results, header, control):
    lines = ["# attnpy: two builds compared", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    lines += ["", "Times are medians over all timed calls of a build; after/before is the "
              "ratio of the medians (< 1: after is faster). The 95% interval resamples the "
              "paired rounds (bootstrap); per-round is the range of the rounds' own ratios. "
              "A row is within noise when its interval contains 1.00"
              + ("; A/A is a second copy of BEFORE over BEFORE, timed in the same rounds"
                 if control else "") + ".", ""]
    head = "| row | before | after | after/before | 95% interval | per-round | "
    rule = "|---|---:|---:|---:|---:|---:|"
    if control:
        head += "A/A | A/A 95% interval | "
        rule += "---:|---:|"
    lines += [head + "verdict |", rule + "---|"]
    for r in results:
        st = r["after"]
        line = (f"| {r['label']} | {fmt_time(r['median']['before'])} | "
                f"{fmt_time(r['median']['after'])} | {st['ratio']:.3f} | {_ci(st)} | "
                f"{st['rounds'][0]:.2f}–{st['rounds'][1]:.2f} | ")
        if control:
            line += f"{r['control']['ratio']:.3f} | {_ci(r['control'])} | "
        lines.append(line + verdict(st) + " |")
    lines += [""] + summary(results, control)
    return "\n".join(lines) + "\n"


def summary(results, control):
    def geo(key):
        return math.exp(sum(math.log(r[key]["ratio"]) for r in results) / len(results))

    def half_width(key):
        return statistics.median((r[key]["ci"][1] - r[key]["ci"][0]) / 2 for r in results)

    out = []
    inside = sum(1 for r in results if verdict(r["after"]) == "within noise")
    worst = max(results, key=lambda r: abs(math.log(r["after"]["ratio"])))
    out.append(f"Geometric mean of after/before: **{geo('after'):.3f}** over {len(results)} rows; "
               f"{inside} of {len(results)} rows within noise (by chance alone about 1 row in 20 "
               f"falls outside a 95% interval); the median interval half-width is "
               f"±{100 * half_width('after'):.1f}%; the largest departure is "
               f"{worst['after']['ratio']:.3f} ({worst['label']}).")
    if control:
        c_inside = sum(1 for r in results if r["control"]["ci"][0] <= 1 <= r["control"]["ci"][1])
        c_worst = max(results, key=lambda r: abs(math.log(r["control"]["ratio"])))
        out.append(f"A/A control: geometric mean **{geo('control'):.3f}**, {c_inside} of "
                   f"{len(results)} intervals contain 1.00, median half-width "
                   f"±{100 * half_width('control'):.1f}%, largest departure "
                   f"{c_worst['control']['ratio']:.3f} ({c_worst['label']}).")
    diffs = [r for r in results if r["agree"] != 0.0]
    if not diffs:
        out.append("The builds' results agree bit for bit on every row.")
    else:
        bad = [r["label"] for r in diffs if r["agree"] is None]
        num = [r for r in diffs if r["agree"] is not None]
        if num:
            w = max(num, key=lambda r: r["agree"])
            out.append(f"The builds' results differ on {len(num)} rows; the largest difference "
                       f"is {w['agree']:.2e} of the largest value ({w['label']}).")
        if bad:
            out.append(f"The builds' results do not line up (shapes or count) on: "
                       f"{', '.join(bad)}.")
    return out


# ---------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before", type=Path, help="the tree with the 'before' build")
    ap.add_argument("after", type=Path, help="the tree with the 'after' build")
    ap.add_argument("--quick", action="store_true", help="tiny rows: checks the script, seconds")
    ap.add_argument("--out", type=Path, help="write the markdown here too")
    ap.add_argument("--json", type=Path, help="write every timing here (JSON)")
    ap.add_argument("--control", action="store_true",
                    help="add an A/A control: a second copy of BEFORE")
    ap.add_argument("--processes", action="store_true",
                    help="one worker process per build instead of one process")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds of timed calls per build and row (default 1.0; quick 0.02)")
    ap.add_argument("--minutes", type=float, default=5.0,
                    help="fit the timing in about this long: fewer calls on slow rows or a busy "
                         "machine (0: no limit; default 5)")
    ap.add_argument("--plan", action="store_true",
                    help="time one call per row, print the plan and its duration, and stop")
    ap.add_argument("--rows", default=None, help="only the rows whose label matches this regex")
    args = ap.parse_args(argv)

    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ["OPENBLAS_NUM_THREADS"] = str(args.threads)
    import numpy as np

    budget = args.budget or (0.02 if args.quick else 1.0)
    rounds_max = 6 if args.quick else 12
    settle = 0.002 if args.quick else 0.02
    rows = _bench_rows(args.quick)
    if args.rows:
        rows = [r for r in rows if re.search(args.rows, r.label)]
        if not rows:
            sys.exit(f"compare.py: no row matches {args.rows!r}")

    names = [("before", args.before), ("after", args.after)]
    if args.control:
        names.append(("control", args.before))
    descriptions = {n: describe_build(src) for n, src in names}
    start, load0 = time.time(), os.getloadavg()

    tmp = Path(tempfile.mkdtemp(prefix="attnpy-compare-"))
    builds = []
    try:
        if args.processes:
            builds = [WorkerBuild(n, src, tmp, np, args.threads) for n, src in names]
        else:
            # two extensions with the same C symbols: each must bind to its own
            if sys.getdlopenflags() & os.RTLD_GLOBAL:
                sys.exit("compare.py: sys.getdlopenflags() has RTLD_GLOBAL; use --processes")
            sys.meta_path.insert(0, _NoPlainAttnpy())
            sys.path.insert(0, str(tmp))
            builds = [LocalBuild("attnpy_" + n, src, tmp, np, args.threads) for n, src in names]
        by_role = dict(zip([n for n, _ in names], builds))
        infos = {n: b.info() for n, b in by_role.items()}
        if len({i["kernel"] for i in infos.values()}) > 1:
            print("WARNING: the builds chose different kernels: "
                  + ", ".join(f"{n} {i['kernel']}" for n, i in infos.items()), file=sys.stderr)

        t_plan = time.time()
        costs = row_costs(builds, rows, np)
        plans, cap, planned = make_plan(rows, costs, len(builds), budget, rounds_max, settle,
                                        args.minutes)
        t_plan = time.time() - t_plan
        if args.minutes > 0 and planned > 60 * args.minutes:
            print(f"WARNING: even at {FEWEST_CALLS} calls a row this run needs about "
                  f"{planned / 60:.1f} min (limit {args.minutes:g}); the machine is slow or "
                  f"busy. Fewer rows (--rows) or no --control shorten it.", file=sys.stderr)
        if args.plan:
            print(f"one call per row: {t_plan:.1f} s; planned timing {planned:.0f} s"
                  + (f" (each build's time on a row capped at {cap:.2g} s)"
                     if cap is not None else ""))
            for row, c, p in zip(rows, costs, plans):
                print(f"  {row.label:42s} {fmt_time(c):>10s}  {p['rounds']:2d} rounds x "
                      f"{p['block']:3d} calls{'  (+1 untimed)' if p['precall'] else ''}  "
                      f"~{_row_seconds(c, row.kind, p, len(builds), settle):.1f} s")
            return 0
        header = {
            "CPU": cpu_description(),
            "threads": f"{args.threads} for every build (set_num_threads)",
            "mode": ("one worker process per build" if args.processes else
                     "both builds in one process, under their own package names")
                    + ("; quick (tiny rows, a check that the script runs; not results)"
                       if args.quick else "; full"),
            "timing": f"{budget:g} s of timed calls per build and row ({MIN_CALLS}–{MAX_CALLS} "
                      f"calls), at most {rounds_max} rounds, {1000 * settle:g} ms pause before "
                      f"each block" + (f"; to fit {args.minutes:g} min, each build's time on a "
                                       f"row capped at {cap:.2g} s (at least {FEWEST_CALLS} calls)"
                                       if cap is not None else "")
                      + f"; planned {planned:.0f} s after a {t_plan:.0f} s pass of one call per row",
            "versions": f"Python {platform.python_version()}, NumPy {np.__version__}",
        }
        for n, d in descriptions.items():
            label = "BEFORE (A/A control copy)" if n == "control" else n.upper()
            header[label] = "; ".join(f"{k} {v}" if k != "dir" else v for k, v in d.items()) \
                + f"; kernel {infos[n]['kernel']}"

        print("\n".join(f"{k}: {v}" for k, v in header.items()) + "\n", flush=True)
        print(f"{'row':42s} {'before':>10s} {'after':>10s} {'ratio':>7s} {'95% interval':>13s}"
              + (f" {'A/A':>7s}" if args.control else ""), flush=True)
        results = []
        for row, plan in zip(rows, plans):
            spec = _row_spec(row)
            inputs = _inputs(spec, np)
            for b in builds:
                b.setup(spec, inputs)
            times, agree = time_row(builds, plan, settle, np)
            for b in builds:
                b.release()
            del inputs
            gc.collect()
            by = {n: times[b.name] for n, b in by_role.items()}
            res = {"label": row.label, "agree": agree,
                   "median": {n: _median([t for blk in ts for t in blk]) for n, ts in by.items()},
                   "after": ratio_stats(by["before"], by["after"], np), "times": by}
            if args.control:
                res["control"] = ratio_stats(by["before"], by["control"], np)
            res["calls"] = plan["rounds"] * plan["block"]
            results.append(res)
            st = res["after"]
            print(f"{row.label:42s} {fmt_time(res['median']['before']):>10s} "
                  f"{fmt_time(res['median']['after']):>10s} {st['ratio']:7.3f} {_ci(st):>13s}"
                  + (f" {res['control']['ratio']:7.3f}" if args.control else ""), flush=True)
    finally:
        for b in builds:
            b.close()
        shutil.rmtree(tmp, ignore_errors=True)

    elapsed = time.time() - start
    header["run"] = (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(start))}, "
                     f"{elapsed:.0f} s; load average {load0[0]:.2f} at the start, "
                     f"{os.getloadavg()[0]:.2f} at the end")
    md = markdown(results, header, args.control)
    print("\n" + md)
    if args.out:
        args.out.write_text(md)
        print(f"wrote {args.out}")
    if args.json:
        import json
        args.json.write_text(json.dumps({"header": header, "rows": results}, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--worker":
        wp = argparse.ArgumentParser()
        wp.add_argument("--worker", required=True)
        wp.add_argument("--threads", type=int, default=2)
        wa = wp.parse_args()
        sys.exit(worker_main(wa.worker, wa.threads))
    sys.exit(main())

#!/usr/bin/env bash
# The platforms attnpy supports that this machine is not, checked from here
# (issue 13): each step builds the core (or the extension) with another
# compiler or for another machine and runs its tests there.
#   arm64-c     the core and its C tests, aarch64-linux-gnu-gcc, run under qemu-aarch64
#               (every kernel of that machine: reference, baseline, neon; both dtypes)
#   arm64-py    the extension cross-built for aarch64 against an arm64 Python (Debian's,
#               unpacked by mmdebstrap) and NumPy (PyPI's aarch64 wheel), and a part of
#               the pytest suite run by that Python under qemu (tests/platforms/README.md)
#   windows-c   the core and its C tests, MinGW-w64 (Win32 threads), run under wine
#   msvc-path   what an MSVC build compiles: the core without vector extensions
#               (-DATTN_HAVE_FAST=0), strict C11 (-pedantic-errors, no VLAs), its C tests
#   clang       the C tests and the extension built by clang with -Werror; get_kernel()
#               as GCC's build; the tests against that build; bench rows clang / GCC
# Usage: bash tests/platforms/run.sh [STEP...]   (default: every step)
# PYTHON: the project's venv python (dev.sh's). Missing Debian tools are
# installed with apt-get when run as root; otherwise a step without its tools
# fails and says what to install.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
case "$PYTHON" in */*) [ "${PYTHON#/}" != "$PYTHON" ] || PYTHON="$PWD/$PYTHON" ;; esac  # absolute
OUT=build/platforms
mkdir -p "$OUT"
C_SOURCES="csrc/attn_core.c csrc/attn_fast.c csrc/attn_parallel.c csrc/attn_plan.c"
C_FLAGS="-std=c11 -O2 -ffp-contract=fast -Wall -Wextra -Werror -Icsrc"

# need TOOL DEBIAN_PACKAGE...: the tool, installed if missing and possible
source tests/platforms/need.sh

step() { echo; echo "== platforms: $1 ($(date -u +%H:%M:%S))"; }

arm64_c() {
    step "arm64-c: aarch64-linux-gnu-gcc, C tests under qemu-aarch64"
    need aarch64-linux-gnu-gcc gcc-aarch64-linux-gnu
    need qemu-aarch64 qemu-user
    aarch64-linux-gnu-gcc $C_FLAGS -pthread $C_SOURCES tests/c/test_core.c -lm -o "$OUT/test_core_arm64"
    qemu-aarch64 -L /usr/aarch64-linux-gnu "$OUT/test_core_arm64"
}

windows_c() {
    step "windows-c: x86_64-w64-mingw32-gcc, C tests under wine"
    need x86_64-w64-mingw32-gcc gcc-mingw-w64-x86-64
    need wine wine wine64
    x86_64-w64-mingw32-gcc $C_FLAGS $C_SOURCES tests/c/test_core.c -o "$OUT/test_core.exe"
    # a prefix of its own, made on first use (wine's start-up messages go to stderr)
    # (no Mono or Gecko prompt when the prefix is made)
    export WINEPREFIX="$PWD/$OUT/wine" WINEDEBUG=-all WINEDLLOVERRIDES="mscoree,mshtml="
    wine "$OUT/test_core.exe"
}

msvc_path() {
    step "msvc-path: no vector extensions, strict C11, C tests"
    ${CC:-cc} $C_FLAGS -pedantic-errors -Werror=vla -DATTN_HAVE_FAST=0 -pthread $C_SOURCES \
        tests/c/test_core.c -lm -o "$OUT/test_core_nofast"
    "$OUT/test_core_nofast"
}

clang_build() {
    step "clang: C tests and the extension with -Werror, tests, bench rows against GCC"
    local cc
    cc=$(command -v clang || command -v clang-14 || true)
    [ -n "$cc" ] || { need clang-14 clang-14; cc=$(command -v clang-14); }
    "$cc" $C_FLAGS -pthread $C_SOURCES tests/c/test_core.c -lm -o "$OUT/test_core_clang"
    "$OUT/test_core_clang"
    # the extension, built by clang into a tree of its own beside the package
    rm -rf "$OUT/clang"
    mkdir -p "$OUT/clang"
    CC="$cc" ATTNPY_STRICT=1 "$PYTHON" setup.py -q build_ext --build-lib "$OUT/clang" \
        --build-temp "$OUT/clang-tmp" >/dev/null
    cp attnpy/*.py attnpy/*.js attnpy/*.pyi attnpy/py.typed "$OUT/clang/attnpy/"
    readelf -p .comment "$OUT"/clang/attnpy/_core*.so | grep -q clang ||
        { echo "platforms: the clang build was not compiled by clang" >&2; exit 1; }
    local gcc_kernel clang_kernel
    gcc_kernel=$("$PYTHON" -c "import attnpy; print(attnpy.get_kernel(), attnpy.supported_kernels())")
    clang_kernel=$(cd "$OUT/clang" && "$PYTHON" -c \
        "import attnpy; assert 'platforms/clang' in attnpy.__file__; print(attnpy.get_kernel(), attnpy.supported_kernels())")
    echo "kernel: GCC $gcc_kernel, clang $clang_kernel"
    [ "$gcc_kernel" = "$clang_kernel" ] || { echo "platforms: clang's kernels differ" >&2; exit 1; }
    # parity with the float64 reference and torch, every kernel, errors, memory
    # (PYTHONPATH: the tests' subprocesses import this build too; CC: the
    # builds tests make themselves, test_memory's fault-injection one, are clang's)
    (cd "$OUT/clang" && CC="$cc" PYTHONPATH="$PWD" "$PYTHON" -m pytest -q -p no:cacheprovider -m "not browser" \
        ../../../tests/test_sdpa.py ../../../tests/test_kernels.py ../../../tests/test_mha.py \
        ../../../tests/test_overflow.py ../../../tests/test_errors.py ../../../tests/test_memory.py \
        ../../../tests/test_backward.py)
    # bench rows: clang's build over GCC's, side by side, with an A/A control
    # (a second copy of GCC's) that says how much a row moves by itself here;
    # rows whose control's interval leaves +-5% are shown, not judged
    "$PYTHON" bench/compare.py . "$OUT/clang" --minutes 3 --budget 0.4 --control \
        --rows "${CLANG_BENCH_ROWS:-L=(8|128|512|2048)\\b}" --json "$OUT/clang-bench.json" \
        --out "$OUT/clang-bench.md" >/dev/null
    "$PYTHON" - "$OUT/clang-bench.json" <<'EOF'
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
bad, unsteady = [], []
for r in rows:
    ratio, aa = r["after"]["ratio"], r["control"]["ratio"]
    # the row is measurable on this machine now: its A/A control's whole 95%
    # interval within 5% (a bimodal row's point can land near 1 by chance)
    steady = all(abs(x - 1) <= 0.05 for x in r["control"]["ci"])
    print(f"  {r['label']:42s} clang/GCC {ratio:.3f}   A/A {aa:.3f}"
          + ("" if steady else "   (unsteady here: not judged)"))
    (unsteady if not steady else bad if abs(ratio - 1) > 0.10 else []).append(r["label"])
judged = [r["after"]["ratio"] for r in rows if r["label"] not in unsteady]
# a busy machine is not a slow compiler: with few steady rows the step says so
# and passes, since a wall-clock verdict on noise would fail CI at random
if len(judged) < len(rows) / 2:
    print(f"clang/GCC: only {len(judged)} of {len(rows)} rows steady: this machine is "
          "too busy to judge the compilers' speed now; not judged")
    sys.exit(f"platforms: clang is more than 10% from GCC on {bad}" if bad else 0)
print(f"clang/GCC: {len(judged)} rows judged, ratios {min(judged):.3f} to {max(judged):.3f}; "
      f"{len(unsteady)} unsteady (A/A interval beyond 5%)")
if bad:
    sys.exit(f"platforms: clang is more than 10% from GCC on {bad}")
EOF
}

steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(arm64-c arm64-py windows-c msvc-path clang)
for s in "${steps[@]}"; do
    case "$s" in
        arm64-c) arm64_c ;;
        arm64-py) bash tests/platforms/arm64_python.sh ;;
        windows-c) windows_c ;;
        msvc-path) msvc_path ;;
        clang) clang_build ;;
        *) echo "unknown step $s (arm64-c arm64-py windows-c msvc-path clang)" >&2; exit 2 ;;
    esac
done
echo "platforms: ${steps[*]}: passed"

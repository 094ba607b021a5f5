#!/usr/bin/env bash
# Run the fuzzer: bash fuzz/run.sh [libFuzzer flags and corpus dirs...]
#   bash fuzz/run.sh -max_total_time=600 fuzz/corpus
# ATTNPY_FUZZ_MODE=asan (default): the extension with coverage + ASan + UBSan,
#   ASan and libFuzzer preloaded; plain: coverage + UBSan, atheris's libFuzzer;
#   python: no clang at hand, the installed extension, Python-level coverage only.
# FUZZ_NO_BUILD=1 reuses the last build; FUZZ_BUILD: its directory (build/fuzz-asan or
# build/fuzz). PYTHON: the venv's python.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHON=${PYTHON:-.venv/bin/python}
mode=${ATTNPY_FUZZ_MODE:-asan}
case "$mode" in
    asan) build=${FUZZ_BUILD:-build/fuzz-asan} ;;
    plain) build=${FUZZ_BUILD:-build/fuzz} ;;
    python) build= ;;  # no clang: the installed extension, Python-level coverage only
    *) echo "ATTNPY_FUZZ_MODE must be asan, plain or python" >&2; exit 2 ;;
esac
if [ "$mode" = python ]; then
    :
elif [ "${FUZZ_NO_BUILD:-0}" != 1 ] || [ ! -d "$build/attnpy" ]; then
    if [ "$mode" = asan ]; then
        ATTNPY_FUZZ_ASAN=1 FUZZ_BUILD=$build bash fuzz/build.sh
    else
        FUZZ_BUILD=$build bash fuzz/build.sh
    fi
fi
# defaults, each overridable by the caller's flags (later flags win): a slow
# input (30 s) or 3 GiB resident is a finding; one allocation of any size is
# not (a request beyond memory must fail as MemoryError, so it is let through
# to ASan's allocator, which returns NULL above 1 TiB:
# allocator_may_return_null=1); reports go to fuzz/artifacts
mkdir -p fuzz/artifacts
defaults=(-timeout=30 -rss_limit_mb=3072 -malloc_limit_mb=1048576
          -artifact_prefix=fuzz/artifacts/ -print_final_stats=1)
if [ "$mode" = python ]; then
    exec "$PYTHON" fuzz/fuzz_binding.py "${defaults[@]}" "$@"
fi
export ATTNPY_FUZZ_BUILD=$build
if [ "$mode" = asan ]; then
    cxx=$(${CC:-cc} -print-file-name=libstdc++.so.6)
    # libstdc++ after ASan: atheris (pybind11) throws C++ exceptions, and
    # ASan's __cxa_throw interceptor must find the real one at start-up
    export LD_PRELOAD="$PWD/$build/asan_with_fuzzer.so $cxx"
    export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:allocator_may_return_null=1:abort_on_error=0}
    exec "$PYTHON" fuzz/fuzz_binding.py "${defaults[@]}" "$@"
else
    export ATTNPY_FUZZ_GLOBAL_LIBFUZZER=1
    exec "$PYTHON" fuzz/fuzz_binding.py "${defaults[@]}" "$@"
fi

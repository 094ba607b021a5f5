#!/usr/bin/env bash
# Build the fuzzer's copy of the extension into build/fuzz (never the in-place
# one the tests use): clang, -fsanitize=fuzzer-no-link so libFuzzer sees the
# C-level coverage of the binding and the core, UBSan in trap mode.
# ATTNPY_FUZZ_ASAN=1 adds AddressSanitizer (then run with fuzz/asan_preload.sh).
#   usage: bash fuzz/build.sh  [PYTHON=.venv/bin/python] [CLANG=clang-14]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
if [ -z "${CLANG:-}" ]; then
    for c in clang clang-19 clang-18 clang-17 clang-16 clang-15 clang-14; do
        if command -v "$c" >/dev/null; then CLANG=$c; break; fi
    done
fi
if [ -z "${CLANG:-}" ]; then
    echo "fuzz/build.sh: clang not found (Debian: apt-get install clang-14)" >&2
    exit 2
fi
out=${FUZZ_BUILD:-build/fuzz}
rm -rf "$out" "$out-tmp"
CC="$CLANG" LDSHARED="$CLANG -shared" ATTNPY_STRICT=1 ATTNPY_FUZZ=1 \
    "$PYTHON" setup.py -q build_ext --build-lib "$out" --build-temp "$out-tmp" >/dev/null
cp attnpy/*.py "$out/attnpy/"
# the coverage hooks must be in the module, or the fuzzer would run blind
nm -D "$out"/attnpy/_core*.so | grep -q __sanitizer_cov_8bit_counters_init
echo "built $(ls "$out"/attnpy/_core*.so) with $CLANG"

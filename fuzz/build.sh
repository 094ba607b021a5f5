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
nm -D "$out"/attnpy/_core*.so | grep __sanitizer_cov_8bit_counters_init >/dev/null
echo "built $(ls "$out"/attnpy/_core*.so) with $CLANG"

if [ "${ATTNPY_FUZZ_ASAN:-0}" = 1 ]; then
    # ASan's runtime and libFuzzer in one shared object, preloaded (python is
    # not instrumented). One object, because ASan's weak no-op coverage hooks
    # would otherwise win over libFuzzer's. asan_preinit is left out: a
    # .preinit_array cannot live in a shared object.
    rt="$("$CLANG" -print-resource-dir)/lib/linux"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    mkdir "$tmp/asan" "$tmp/fuzzer"
    (cd "$tmp/asan" && ar x "$rt/libclang_rt.asan-x86_64.a" && rm -f asan_preinit*.o)
    (cd "$tmp/fuzzer" && ar x "$rt/libclang_rt.fuzzer_no_main-x86_64.a")
    "$CLANG" -shared -fPIC -o "$out/asan_with_fuzzer.so" "$tmp"/asan/*.o "$tmp"/fuzzer/*.o \
        -lstdc++ -ldl -lpthread -lrt -lm
    echo "built $out/asan_with_fuzzer.so (ASan + libFuzzer, to preload)"
fi

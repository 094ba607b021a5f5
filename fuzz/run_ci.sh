#!/usr/bin/env bash
# CI's bounded fuzz run: the seeds, then FUZZ_SECONDS (default 150) of fuzzing
# with ASan + UBSan + coverage. Exits non-zero on any crash, sanitizer report,
# timeout, out-of-memory, or finding of the harness (an exception other than
# TypeError/ValueError/MemoryError, a written input, a wrong result).
# Assumes the project's venv is set up (bash dev.sh's setup); PYTHON defaults
# to .venv/bin/python. clang (Debian's clang-14 and libclang-rt-14-dev) is
# installed when missing and apt-get is at hand; without clang the run falls
# back to the plain extension with Python-level coverage, and says so.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHON=${PYTHON:-.venv/bin/python}
seconds=${FUZZ_SECONDS:-150}
"$PYTHON" -m pip install -q -r fuzz/requirements.txt

have_clang() {
    for c in clang clang-19 clang-18 clang-17 clang-16 clang-15 clang-14; do
        command -v "$c" >/dev/null && [ -d "$("$c" -print-resource-dir)/lib/linux" ] && return 0
    done
    return 1
}
if ! have_clang && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "fuzz: installing clang-14 and its runtimes (apt-get)"
    for _ in $(seq 60); do  # another apt-get may hold the lock
        fuser /var/lib/dpkg/lock-frontend >/dev/null 2>&1 || break
        sleep 5
    done
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q clang-14 libclang-rt-14-dev >/dev/null ||
        { apt-get update -q >/dev/null &&
          DEBIAN_FRONTEND=noninteractive apt-get install -y -q clang-14 libclang-rt-14-dev >/dev/null; } ||
        echo "fuzz: apt-get could not install clang"
fi
if have_clang; then
    export ATTNPY_FUZZ_MODE=asan
else
    echo "fuzz: WARNING: no clang; fuzzing the plain extension with Python-level coverage only"
    export ATTNPY_FUZZ_MODE=python
fi

corpus=$(mktemp -d)
trap 'rm -rf "$corpus"' EXIT
status=0
mkdir -p fuzz/artifacts
bash fuzz/run.sh -max_total_time="$seconds" -artifact_prefix=fuzz/artifacts/ \
    "$corpus" fuzz/seeds > fuzz/artifacts/ci.log 2>&1 || status=$?
grep -E "^#[0-9]+[[:space:]]+(INITED|pulse|DONE)" fuzz/artifacts/ci.log | tail -2 || true
grep -E "^stat::" fuzz/artifacts/ci.log || true
if [ "$status" != 0 ]; then
    echo "fuzz: FAILED (exit $status); the report (replay the Base64 input with"
    echo "      ATTNPY_FUZZ_VERBOSE=1 bash fuzz/run.sh FILE to see the call):"
    # without the native stack, which would push the report itself out of view
    grep -v -E "^#[0-9]+ |NEW_FUNC|^ +#[0-9]+ 0x" fuzz/artifacts/ci.log | tail -60
    exit 1
fi
echo "fuzz: $seconds s, no crash, no finding ($ATTNPY_FUZZ_MODE mode)"

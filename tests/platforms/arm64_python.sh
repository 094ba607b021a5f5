#!/usr/bin/env bash
# arm64-py (tests/platforms/run.sh): the extension built for aarch64 and a
# part of the pytest suite run by an arm64 Python under qemu-aarch64.
#   - an arm64 userland with Python 3.11: Debian's packages, unpacked (not
#     installed: nothing runs at unpack time, so no binfmt_misc is needed)
#     by mmdebstrap --variant=extract into build/platforms/arm64/root;
#   - NumPy, pytest and hypothesis: PyPI's aarch64 wheels for Python 3.11, the versions
#     of the project's venv, unzipped into build/platforms/arm64/site;
#   - the extension: cross-compiled by aarch64-linux-gnu-gcc with setup.py's
#     flags against that Python's and that NumPy's headers;
#   - qemu-aarch64 -L root runs root's python3.11; the tests that need torch
#     or a browser are left out (no arm64 torch here), the rest of ARM_TESTS
#     runs: parity with the float64 reference on every kernel (neon among
#     them), the overflow and NaN rules, zero-length and boundary cases,
#     errors, memory (zero copies), threads, gradients.
# Root and site are kept between runs (rm -rf build/platforms/arm64 to redo).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
case "$PYTHON" in */*) [ "${PYTHON#/}" != "$PYTHON" ] || PYTHON="$PWD/$PYTHON" ;; esac  # absolute
DIR=build/platforms/arm64
ROOT=$DIR/root
SITE=$DIR/site
PKG=$DIR/pkg
ARM_TESTS=${ARM_TESTS:-"tests/test_overflow.py tests/test_zero_length.py tests/test_errors.py
    tests/test_memory.py tests/test_backward.py tests/test_boundary.py tests/test_threads.py
    tests/test_kernels.py tests/test_sdpa.py tests/test_properties.py"}

echo; echo "== platforms: arm64-py: the extension for aarch64, pytest under qemu ($(date -u +%H:%M:%S))"
source tests/platforms/need.sh
need aarch64-linux-gnu-gcc gcc-aarch64-linux-gnu
need qemu-aarch64 qemu-user
need mmdebstrap mmdebstrap

if [ ! -x "$ROOT/usr/bin/python3.11" ]; then
    rm -rf "$ROOT"
    mkdir -p "$DIR"
    mmdebstrap --quiet --variant=extract --architectures=arm64 \
        --include=python3.11,python3.11-minimal,libpython3.11-stdlib,libpython3.11-dev,libstdc++6 \
        bookworm "$ROOT" http://deb.debian.org/debian
fi
versions=$("$PYTHON" -c "import numpy, pytest, hypothesis as h
print(f'numpy=={numpy.__version__} pytest=={pytest.__version__} hypothesis=={h.__version__}')")
if [ "$(cat "$SITE/.versions" 2>/dev/null)" != "$versions" ]; then
    rm -rf "$SITE" "$DIR/wheels"
    mkdir -p "$SITE"
    # shellcheck disable=SC2086
    "$PYTHON" -m pip download -q --only-binary=:all: --implementation cp --python-version 3.11 \
        --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 \
        $versions -d "$DIR/wheels"
    for w in "$DIR"/wheels/*.whl; do "$PYTHON" -m zipfile -e "$w" "$SITE"; done
    echo "$versions" > "$SITE/.versions"
fi

# the extension, with setup.py's flags; the arm64 headers after the cross
# compiler's own (-idirafter), as system headers
rm -rf "$PKG"
mkdir -p "$PKG/attnpy"
cp attnpy/*.py attnpy/*.js attnpy/*.pyi attnpy/py.typed "$PKG/attnpy/"
aarch64-linux-gnu-gcc -std=c11 -O3 -pthread -ffp-contract=fast -Wall -Wextra -Werror -fPIC -shared \
    -DNPY_NO_DEPRECATED_API=NPY_2_0_API_VERSION -Icsrc \
    -isystem "$ROOT/usr/include/python3.11" -idirafter "$ROOT/usr/include" \
    -isystem "$SITE/numpy/_core/include" \
    csrc/attnpy_module.c csrc/attn_core.c csrc/attn_fast.c csrc/attn_parallel.c csrc/attn_plan.c \
    -lm -o "$PKG/attnpy/_core.cpython-311-aarch64-linux-gnu.so"

# python3.11 under qemu as one executable (no binfmt_misc here): qemu's -0
# makes the wrapper sys.executable, so the tests' subprocesses run it too;
# they run in the package's directory, whose attnpy is the arm64 build
mkdir -p "$DIR/bin"
printf '#!/bin/sh\nexec qemu-aarch64 -L "%s" -0 "$0" "%s/usr/bin/python3.11" "$@"\n' \
    "$PWD/$ROOT" "$PWD/$ROOT" > "$DIR/bin/python3.11"
chmod +x "$DIR/bin/python3.11"
export PYTHONHOME="$PWD/$ROOT/usr" PYTHONPATH="$PWD/$PKG:$PWD/$SITE"
ARM_PYTHON="$PWD/$DIR/bin/python3.11"
tests=()
for t in $ARM_TESTS; do tests+=("$PWD/$t"); done
cd "$PKG"
"$ARM_PYTHON" -c "import platform, attnpy, numpy
assert platform.machine() == 'aarch64' and '$PKG' in attnpy.__file__, attnpy.__file__
print('arm64:', platform.python_version(), 'NumPy', numpy.__version__,
      'kernels', attnpy.supported_kernels(), 'chosen', attnpy.get_kernel())"
start=$(date +%s)
# every test of these files but those needing torch or a browser; a skip fails
ATTNPY_REQUIRE_ALL=1 "$ARM_PYTHON" -m pytest -q -p no:cacheprovider \
    -m "not slow and not browser and not torch" "${tests[@]}"
echo "arm64-py: the tests took $(( $(date +%s) - start )) s under qemu"

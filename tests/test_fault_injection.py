"""An allocation failure anywhere becomes MemoryError: never a crash, a leak or a wrong result.

The checks are in fault_injection_cases.py. They need the debug hook
``_core._fail_alloc``, which only a build with ATTNPY_FAULT_INJECTION=1 (or
ATTNPY_SANITIZE=1) has:

- in the sanitizer pass of the test command the extension under test is
  build/asan, which has it: the checks run here, under ASan+UBSan;
- in the normal pass the extension has no hook (a release build must not):
  the test builds one with the hook into a temporary folder (about 10 s)
  and runs the checks in a subprocess against it.

Either way the checks run; the test never skips.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from attnpy import _core

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent


def _print_report(report, where):
    print(f"\nallocation failures injected ({where}):")
    for name, c in report.items():
        print(f"  {name:42s} {c['failure_points']:3d} failure points: "
              f"{c['memory_errors']:3d} MemoryError, {c['recovered']:3d} recovered by a fallback")
    print(f"  total {sum(c['failure_points'] for c in report.values())} failure points")


def _check(report):
    import fault_injection_cases as cases
    expected = [name for name, _, _ in cases._cases()]
    assert list(report) == expected
    for name, c in report.items():
        assert c["memory_errors"] >= 1 and \
            c["failure_points"] == c["memory_errors"] + c["recovered"], name


@pytest.fixture(scope="module")
def fault_build(tmp_path_factory):
    """attnpy with a fault-injection _core, built into a temporary folder."""
    if hasattr(_core, "_fail_alloc"):
        return None
    tmp = tmp_path_factory.mktemp("fault_build")
    env = dict(os.environ, ATTNPY_FAULT_INJECTION="1", ATTNPY_STRICT="1")
    env.pop("ATTNPY_SANITIZE", None)
    done = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp / "lib"),
         "--build-temp", str(tmp / "obj")],
        cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    for py in (ROOT / "attnpy").glob("*.py"):
        shutil.copy(py, tmp / "lib" / "attnpy")
    return tmp / "lib"


def test_every_allocation_failure_is_a_memory_error(fault_build):
    sys.path.insert(0, str(HERE))
    try:
        if fault_build is None:  # this build has the hook (the sanitizer pass)
            import fault_injection_cases as cases
            report = cases.run_all()
            where = f"in process, {Path(_core.__file__).parent}"
        else:
            code = ("import sys, json; sys.path[:0] = [%r, %r]; import attnpy; "
                    "assert attnpy.__file__.startswith(%r), attnpy.__file__; "
                    "import fault_injection_cases as c; print(json.dumps(c.run_all()))"
                    % (str(fault_build), str(HERE), str(fault_build)))
            done = subprocess.run([sys.executable, "-c", code], cwd=fault_build,
                                  capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, done.stdout + done.stderr
            report = json.loads(done.stdout.strip().splitlines()[-1])
            where = f"subprocess, {fault_build}"
        _check(report)
    finally:
        sys.path.remove(str(HERE))
    _print_report(report, where)


def test_release_build_has_no_hook():
    """The hook only exists where it was asked for: never in the normal build."""
    in_debug_build = os.environ.get("ATTNPY_SANITIZE") == "1" or "build/asan" in _core.__file__
    assert hasattr(_core, "_fail_alloc") == in_debug_build


"""Markers and optional dependencies of the test suite.

Markers (registered in pyproject.toml):
  torch    needs PyTorch: skipped when torch is not installed
  browser  needs chromium, chromedriver and selenium: skipped when one is missing
  slow     takes more than about 5 s: `bash dev.sh quick` leaves these out

Files that mix torch tests with others import torch from optional_torch.py
(None without PyTorch). Files that need other optional packages
(transformers and the MiniLM model, nbformat / nbclient / ipykernel,
matplotlib, onnx / onnxruntime) skip themselves with pytest.importorskip. So `pytest -m "not slow and not browser"` runs with
numpy, pytest, hypothesis and matplotlib alone (requirements-quick.txt).

With ATTNPY_REQUIRE_ALL=1 (`bash dev.sh test`, the CI gate) nothing may be
missing and nothing may be skipped: a skip fails the run, so the gate
covers every test whatever its markers.
"""
import importlib.util
import os
import shutil

import pytest

REQUIRE_ALL = os.environ.get("ATTNPY_REQUIRE_ALL") == "1"


def pytest_sessionstart(session):
    # `bash dev.sh wheel`: the tests must run against the installed wheel
    if os.environ.get("ATTNPY_TEST_INSTALLED") == "1":
        import attnpy
        if "site-packages" not in attnpy.__file__:
            raise pytest.UsageError(f"ATTNPY_TEST_INSTALLED=1 but attnpy is {attnpy.__file__}")


def _missing_modules(*names):
    return [n for n in names if importlib.util.find_spec(n) is None]


def _missing_browser():
    missing = _missing_modules("selenium")
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        missing.append("chromium")
    if not shutil.which("chromedriver"):
        missing.append("chromedriver")
    return missing


NEEDS = {"torch": lambda: _missing_modules("torch"), "browser": _missing_browser}


def pytest_collection_modifyitems(config, items):
    missing = {}
    for item in items:
        for marker, find_missing in NEEDS.items():
            if item.get_closest_marker(marker) is None:
                continue
            if marker not in missing:
                missing[marker] = find_missing()
            if missing[marker]:
                item.add_marker(pytest.mark.skip(
                    reason=f"marked {marker}: needs {', '.join(missing[marker])}"))


def _fail_a_skip(report, what):
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
    report.outcome = "failed"
    report.longrepr = f"ATTNPY_REQUIRE_ALL=1 but {what} was skipped: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if REQUIRE_ALL and report.skipped:
        _fail_a_skip(report, item.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    # a module that skips itself (pytest.importorskip) is a failure there too
    report = (yield).get_result()
    if REQUIRE_ALL and report.skipped:
        _fail_a_skip(report, collector.nodeid)

"""bench/compare.py runs (quick mode, a few tiny rows) in both of its modes.

Not a performance test: times are never asserted. The build under test is
compared with itself (an A/A run), which also checks that two copies of one
build load side by side and agree bit for bit.
"""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
try:                        # the build under test (the sanitizer pass has its own)
    import attnpy
    BUILD = Path(attnpy.__file__).resolve().parent.parent
except ImportError:
    BUILD = ROOT


@pytest.mark.parametrize("mode", [[], ["--processes"]])
def test_quick_compare_writes_table(tmp_path, mode):
    out = tmp_path / "compare.md"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "compare.py"), str(BUILD),
                           str(BUILD), "--quick", "--control", "--rows", "L=8 D=4|MHA",
                           "--out", str(out)] + mode,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = out.read_text()
    assert "| row | before | after | after/before | 95% interval |" in table
    for label in ("B=1 H=1 L=8 D=4 |", "causal +w", "MHA N=", "bwd B=1 H=1 L=8 D=4", "bwd MHA"):
        assert label in table, label
    assert "agree bit for bit on every row" in table
    assert "A/A control: geometric mean" in table
    assert "CPU:" in table and "family" in table


def test_compare_refuses_an_unbuilt_tree(tmp_path):
    (tmp_path / "attnpy").mkdir()
    (tmp_path / "attnpy" / "__init__.py").write_text("")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "compare.py"), str(BUILD),
                           str(tmp_path), "--quick"], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "build_ext --inplace" in proc.stderr

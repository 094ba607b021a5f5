"""The benchmark script runs (quick mode: tiny rows) and writes its table.

Not a performance test: times are never asserted. It keeps bench/bench.py
from rotting as the API changes.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.torch      # the table compares with torch
def test_quick_benchmark_writes_results(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench.py"), "--quick",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (tmp_path / "results.md").read_text()
    assert "measured fp32 FMA peak" in table
    assert "Geometric-mean speed-up over torch" in table
    # the ONNX Runtime and JAX columns are there, with dashes where a peer did not run
    assert "| ORT | JAX |" in table and "| vs ORT | vs JAX |" in table
    for peer in ("ONNX Runtime", "JAX"):
        assert f"Geometric-mean speed-up over {peer}" in table, peer
    results = json.loads((tmp_path / "results.json").read_text())
    assert {"geomean_vs_torch", "geomean_vs_ort", "geomean_vs_jax"} <= results.keys()
    for label in ("B=1 H=1 L=8 D=4", "causal", "+w", "f64", "MHA", "mem", "bwd B=", "bwd MHA"):
        assert label in table, label
    assert (tmp_path / "results.png").stat().st_size > 10_000


@pytest.mark.slow
@pytest.mark.torch
def test_quick_positions_benchmark_prints_every_row():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "positions.py"), "--quick"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("cpu: ")
    for label in ("window (", "ALiBi causal", "attn_bias (H, L, L)", "Llama-like", "GPT-2-like"):
        assert label in proc.stdout, label


def test_quick_tuner_check_prints_every_cell():
    import attnpy
    from attnpy import _core
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "tuner.py"), "--quick"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    caps = 2 if "avx512" in attnpy.supported_kernels() else 1
    for cell in _core.TUNE_CELLS:
        assert proc.stdout.count(f" | {cell} | ") == caps, cell
    assert "Largest choice / fastest: " in proc.stdout

"""The README's first command runs `python -m attnpy demo OUTDIR`: check what it
prints and writes, against a float64 NumPy reference of the same inputs."""
import subprocess
import sys

import numpy as np
import pytest

from attnpy import demo
from reference import sdpa_reference


@pytest.mark.slow
def test_demo_prints_checks_and_writes_its_pictures(tmp_path):
    out = tmp_path / "pictures"
    run = subprocess.run([sys.executable, "-m", "attnpy", "demo", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "max |difference|" in run.stdout                  # checked against torch
    diff = float(run.stdout.split("max |difference| = ")[1].split()[0])
    assert diff < 1e-5

    tokens = demo.SENTENCE.split()
    q, k, v, mask = demo.build_inputs(tokens)
    _, expected = sdpa_reference(q, k, v, attn_mask=mask[:, 0], scale=1.0)
    weights = np.load(out / "weights.npy")
    assert weights.shape == (4, len(tokens), len(tokens))
    np.testing.assert_allclose(weights, expected, atol=1e-6)
    # the hand-built heads do what their names say
    assert (weights[1, 1:].argmax(-1) == np.arange(len(tokens) - 1)).all()   # previous token
    np.testing.assert_allclose(weights[2, 4, :5], 1 / 5, atol=1e-6)         # causal average

    for name in ["heads.png", "head_0.png", "head_1.png", "head_2.png", "head_3.png"]:
        data = (out / name).read_bytes()
        assert data[:4] == b"\x89PNG" and len(data) > 5000, name
        assert name in run.stdout
    page = (out / "head_view.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "attnpy-view" in page
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in page


# `python -m attnpy demo --help` wrote the demo into a folder named --help/
# (issue 12, item 11).
def test_demo_help_prints_usage_and_writes_nothing(tmp_path):
    for args in (["demo", "--help"], ["--help"]):
        r = subprocess.run([sys.executable, "-m", "attnpy", *args], cwd=tmp_path,
                           capture_output=True, text=True)
        assert r.returncode == 0 and "usage: python -m attnpy" in r.stdout
    assert list(tmp_path.iterdir()) == []
    r = subprocess.run([sys.executable, "-m", "attnpy", "demo", "a", "b"], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "unrecognized arguments: b" in r.stderr
    assert list(tmp_path.iterdir()) == []

"""Notebook 09's claims hold for more than the seed it was committed with.

The notebook's code cells run here in one namespace, as a student would run
them, with ``SEED = 0`` replaced by other seeds and figures drawn off screen;
every "...: True" line it prints must come out True. Seed 0 is the notebook
itself, run by tests/test_notebooks.py.
"""
import contextlib
import io
import re
from pathlib import Path

import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
nbformat = pytest.importorskip("nbformat")

import matplotlib.pyplot as plt  # noqa: E402

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "09_induction_heads.ipynb"
CLAIM = re.compile(r"^(.*): (True|False)$", re.M)


def run_with_seed(seed):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    source = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert source.count("SEED = 0") == 1
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(source.replace("SEED = 0", f"SEED = {seed}"), str(NOTEBOOK), "exec"), {})
    plt.close("all")
    return out.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_the_circuit_forms_with_other_seeds(seed):
    text = run_with_seed(seed)
    print(text)
    claims = CLAIM.findall(text)
    assert len(claims) == 5, text
    assert all(value == "True" for _, value in claims), text

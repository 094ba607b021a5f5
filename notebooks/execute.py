"""Run notebooks top to bottom and keep their outputs (what `bash dev.sh
notebooks` does before the notebooks are committed).

    python notebooks/execute.py                 # every notebook, in place
    python notebooks/execute.py 03_masks.ipynb  # some of them

Timing metadata is dropped so that a re-run changes only what the cells
print and draw. The tests run the same function on copies (tests/test_notebooks.py).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
TIMEOUT = 300          # seconds per cell; every notebook takes well under a minute


def notebooks():
    return sorted(HERE.glob("*.ipynb"))


def execute(nb, cwd):
    """Execute a notebook object in place (cwd: the kernel's working directory)."""
    client = NotebookClient(nb, timeout=TIMEOUT, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd)}})
    client.execute()
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
    return nb


def main(names):
    paths = [HERE / n for n in names] if names else notebooks()
    for path in paths:
        start = time.perf_counter()
        nb = nbformat.read(path, as_version=4)
        execute(nb, HERE)
        nbformat.write(nb, path)
        print(f"{path.name}: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main(sys.argv[1:])

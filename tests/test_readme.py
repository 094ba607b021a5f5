"""The README's quick start runs and says what it shows."""
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_quick_start_runs_and_shapes_match_the_comments():
    text = README.read_text()
    block = text.split("## Quick start", 1)[1]
    code = re.search(r"```python\n(.*?)```", block, re.S).group(1)
    ns = {}
    exec(compile(code, "README quick start", "exec"), ns)
    assert ns["out"].shape == (2, 4, 10, 8)
    assert ns["weights"].shape == (2, 4, 10, 12)
    assert ns["res"].output.shape == (2, 1, 10, 16)
    assert ns["res"].weights is None


def test_trace_table_lists_exactly_the_trace_fields():
    import dataclasses

    import attnpy

    table = README.read_text().split("### The trace", 1)[1].split("\n## ", 1)[0]
    documented = re.findall(r"^\| `(\w+)` \|", table, re.M)
    assert documented == [f.name for f in dataclasses.fields(attnpy.Trace)]


def test_pictures_and_links_exist():
    text = README.read_text()
    targets = re.findall(r"\]\(((?:docs|notebooks|bench)/[^)#]+)\)", text)
    pictures = [t for t in targets if t.endswith(".png")]
    assert len(pictures) >= 3                      # the README shows its pictures
    for target in targets:
        path = README.parent / target
        assert path.is_file(), target
        if target.endswith(".png"):
            assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 10_000, target

"""What a wheel carries besides code: the licence, the type information, and
metadata setuptools accepts without a deprecation warning (issue 12, item 13)."""
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_license_file_and_spdx_expression():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT"            # a string: PEP 639, not a table
    assert project["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


def test_type_information_is_shipped():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert {"py.typed", "*.pyi"} <= set(config["package-data"]["attnpy"])
    assert (ROOT / "attnpy" / "py.typed").exists()
    stub = (ROOT / "attnpy" / "_core.pyi").read_text()
    import attnpy._core as core
    public = [n for n in dir(core) if not n.startswith("_")]
    missing = [n for n in public if f"def {n}(" not in stub and f"{n}:" not in stub]
    assert not missing, f"_core.pyi lacks {missing}"


def test_metadata_builds_without_deprecation_warnings():
    r = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 0 and r.stdout.strip().endswith("attnpy"), r.stderr
    assert "Deprecat" not in r.stderr, r.stderr

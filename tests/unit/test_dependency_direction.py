"""DESIGN.md: hashing and memory know nothing of model/train/analysis/cli; the core import is light."""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2] / "engram"
FORBIDDEN = {"hashing": {"model", "train", "analysis", "cli", "memory", "distributed"},
             "memory": {"model", "train", "analysis", "cli", "distributed"},
             "model": {"train", "analysis", "cli", "distributed"},
             "train": {"cli"}, "distributed": {"cli", "analysis"}}


def imported_engram_packages(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level >= 2 and node.module:
            yield node.module.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("engram."):
            yield node.module.split(".")[1]


def test_lower_layers_do_not_import_upper_layers():
    for package, forbidden in FORBIDDEN.items():
        for path in (ROOT / package).glob("*.py"):
            bad = set(imported_engram_packages(path)) & forbidden
            assert not bad, f"{path.name} in engram/{package} imports {bad}"


def test_core_import_is_light():
    code = "import sys, engram; print(sorted(m for m in ('transformers', 'matplotlib', 'sympy', 'tokenizers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

"""DESIGN.md's dependency direction (lower layers never import upper ones, imports inside functions
included; no cycles between train and analysis), and a light core import."""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2] / "engram"
UPPER = {"cli", "experiments", "lifecycle"}  # lifecycle: run-level memory edits
FORBIDDEN = {"hashing": UPPER | {"model", "train", "analysis", "memory", "distributed", "hf", "compat"},
             "memory": UPPER | {"model", "train", "analysis", "distributed", "hf"},
             "model": UPPER | {"train", "analysis", "distributed", "hf"},
             "train": UPPER | {"analysis", "hf"},
             "analysis": UPPER | {"distributed", "hf"},
             "distributed": UPPER | {"analysis", "hf"},
             "hf": UPPER | {"analysis"},
             "compat": UPPER | {"train", "analysis", "distributed", "hf"},
             "lifecycle": UPPER | {"analysis", "distributed", "hf"},
             "experiments": {"cli"}}


def imported_engram_packages(source: str):
    """The engram subpackages a module imports, at any depth (imports inside functions count)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level >= 2 and node.module:
            yield node.module.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("engram."):
            yield node.module.split(".")[1]
        elif isinstance(node, ast.Import):
            yield from (a.name.split(".")[1] for a in node.names if a.name.startswith("engram."))


def test_the_check_sees_imports_inside_functions_and_plain_imports():
    source = ("def f():\n    from ..train.loop import evaluate\n"
              "def g():\n    import engram.cli.main\n"
              "class C:\n    def h(self):\n        from engram.hf import add_engram\n")
    assert set(imported_engram_packages(source)) == {"train", "cli", "hf"}


def test_lower_layers_do_not_import_upper_layers():
    for package, forbidden in FORBIDDEN.items():
        for path in (ROOT / package).glob("*.py"):
            bad = set(imported_engram_packages(path.read_text())) & forbidden
            assert not bad, f"{path.name} in engram/{package} imports {bad}"


def test_core_import_is_light():
    code = "import sys, engram; print(sorted(m for m in ('transformers', 'matplotlib', 'sympy', 'tokenizers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

"""The import drawing: no circle between modules, and no import from a lower layer to a higher
one (imports inside functions, `from .. import x` and plain `import engram.x` all count), and
a light core import."""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2] / "engram"

# Lowest first. A module may import its own layer and the layers below it, never above.
LAYERS = [
    {"config", "presets", "precision", "durable", "device"},
    {"hashing"},
    {"memory"},
    {"model", "data"},
    {"runs", "eval"},
    {"distributed"},
    {"train"},
    {"analysis", "lifecycle", "hf", "compat", "vllm_plugin"},
    {"experiments"},
    {"cli", "__main__"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}
# Same-layer neighbours that must stay apart (analysis reads models; it never edits or wraps them).
APART = {("analysis", "hf"), ("hf", "analysis"), ("analysis", "lifecycle"), ("lifecycle", "analysis"),
         ("lifecycle", "hf"), ("compat", "analysis"), ("compat", "hf"), ("compat", "lifecycle"),
         ("compat", "train"), ("vllm_plugin", "analysis"), ("vllm_plugin", "lifecycle"),
         ("vllm_plugin", "compat"), ("hf", "vllm_plugin")}


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, name: str, is_package: bool, known: set[str]):
    """The engram modules a module imports, at any depth. `from P import x` imports P.x when
    that is a module (else P itself); relative imports are resolved against the package."""
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "engram":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield sub if sub in known else target
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.split(".")[0] == "engram")


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        targets = set()
        for t in imported_modules(path.read_text(), name, path.name == "__init__.py", set(paths)):
            while t not in paths and "." in t:  # an attribute of a module: the module
                t = t.rpartition(".")[0]
            if t != name:
                targets.add(t)
        graph[name] = targets
    return graph


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "engram"


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_check_sees_every_import_form():
    known = {"engram.train", "engram.train.loop", "engram.cli", "engram.cli.main", "engram.hf", "engram.presets",
             "engram.memory", "engram.memory.table"}
    source = ("def f():\n    from ..train.loop import evaluate\n"
              "def g():\n    import engram.cli.main\n"
              "class C:\n    def h(self):\n        from engram.hf import add_engram\n"
              "from .. import presets\n"
              "from . import table\n")
    found = set(imported_modules(source, "engram.memory.engram", False, known))
    assert found == {"engram.train.loop", "engram.cli.main", "engram.hf", "engram.presets", "engram.memory.table"}


def test_the_cycle_check_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_package_has_a_layer():
    packages = {layer_of(module_name(p)) for p in ROOT.rglob("*.py")} - {"engram"}
    assert packages <= set(RANK), f"give {sorted(packages - set(RANK))} a layer in LAYERS"


def test_no_import_runs_up_a_layer():
    bad = []
    for module, targets in import_graph().items():
        a = layer_of(module)
        if a == "engram":  # the package root re-exports the public API
            continue
        for t in targets:
            b = layer_of(t)
            if b != a and b != "engram" and (RANK[b] > RANK[a] or (a, b) in APART):
                bad.append(f"{module} -> {t}")
            if b == "engram" and RANK[a] < RANK["experiments"]:  # the root imports every layer
                bad.append(f"{module} -> {t} (import the module, not the package root)")
    assert not bad, "imports against the layer order:\n" + "\n".join(sorted(bad))


def test_train_and_distributed_do_not_import_each_other_both_ways():
    graph = import_graph()
    up = any(layer_of(t) == "train" for m, ts in graph.items() if layer_of(m) == "distributed" for t in ts)
    assert not up, "engram.distributed imports engram.train"


def test_no_circle_anywhere():
    found = cycles(import_graph())
    assert not found, "import circles: " + "; ".join(" -> ".join(c) for c in found)


DRAWING = ROOT.parent / "docs" / "architecture.md"


def drawing() -> str:
    """The package-level import drawing as a Mermaid graph: layers bottom to top, one arrow
    per pair of packages where one imports the other."""
    edges = sorted({(layer_of(m), layer_of(t)) for m, ts in import_graph().items() for t in ts
                    if layer_of(m) not in (layer_of(t), "engram", "__main__") and layer_of(t) != "engram"})
    lines = ["```mermaid", "graph BT"]
    for i, layer in enumerate(LAYERS):
        members = sorted(n for n in layer if n != "__main__")
        lines.append(f"  subgraph L{i}[layer {i}]")
        lines += [f"    {n}" for n in members]
        lines.append("  end")
    lines += [f"  {a} --> {b}" for a, b in edges]
    return "\n".join(lines + ["```"])


def test_the_drawing_in_the_docs_is_current():
    """docs/architecture.md shows the imports as they are (regenerate: python -m tests.unit.test_dependency_direction)."""
    text = DRAWING.read_text()
    start, end = text.index("```mermaid"), text.index("```", text.index("```mermaid") + 3) + 3
    assert text[start:end] == drawing(), "the import drawing is stale: python -m tests.unit.test_dependency_direction"


def test_core_import_is_light():
    code = "import sys, engram; print(sorted(m for m in ('transformers', 'matplotlib', 'sympy', 'tokenizers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


if __name__ == "__main__":  # redraw docs/architecture.md's import drawing
    text = DRAWING.read_text()
    start, end = text.index("```mermaid"), text.index("```", text.index("```mermaid") + 3) + 3
    DRAWING.write_text(text[:start] + drawing() + text[end:])
    print(f"redrew {DRAWING}")

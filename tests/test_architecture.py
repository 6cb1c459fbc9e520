"""The shape of the source tree: the import graph has no cycles, files and functions stay readable,
and the data path's packages depend on each other in one direction.

The graph counts every import of an ldmkit module anywhere in a file (module level or inside a
function: a function-level import is still a dependency), edges between modules as written (`from
ldmkit.a import b` -> ldmkit.a.b when that is a module, else ldmkit.a).
"""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "ldmkit"
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80
LONG_REASON = "# long:"  # a comment line right above a longer function says why it is long


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")
                base = ".".join(up[: len(up) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for t in targets:
            while t and t not in modules:  # `import ldmkit.a.b.c` of a name inside a module
                t = t.rpartition(".")[0]
            if t.startswith("ldmkit") and t != name and t != "ldmkit":
                found.add(t)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, name, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
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

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_has_no_cycles():
    cycles = _cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_a_cycle():  # the check above must be able to fail
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_lower_layers_do_not_import_higher_ones():
    """nn <- denoisers / autoencoder <- diffusion (no networks at all) ... <- training / pipelines <- cli:
    the data path reads one way. diffusion/ is pure tensor math: it imports no other ldmkit package."""
    graph = import_graph()
    rules = {  # package -> packages it must not import
        "ldmkit.diffusion": ("ldmkit.nn", "ldmkit.denoisers", "ldmkit.autoencoder", "ldmkit.conditioning",
                             "ldmkit.training", "ldmkit.pipelines", "ldmkit.io", "ldmkit.data", "ldmkit.metrics"),
        "ldmkit.nn": ("ldmkit.denoisers", "ldmkit.autoencoder", "ldmkit.training", "ldmkit.pipelines"),
        "ldmkit.data": ("ldmkit.training", "ldmkit.pipelines", "ldmkit.cli"),
        "ldmkit.pipelines": ("ldmkit.training", "ldmkit.cli"),
        "ldmkit.io": ("ldmkit.training", "ldmkit.pipelines", "ldmkit.cli"),
    }
    bad = [f"{m} -> {t}" for m, targets in graph.items() for pkg, banned in rules.items()
           if m.startswith(pkg + ".") or m == pkg for t in targets if t.startswith(banned)]
    bad += [f"{m} -> ldmkit.cli" for m, targets in graph.items() if "ldmkit.cli" in targets]
    assert not bad, bad


def test_no_demo_recipe_code_in_the_library():
    """The shapes demo's recipe lives in examples/shapes; the library holds no trace of its tricks."""
    words = ("stage1_latents", "stage1_steps", "word_drop", "drop_words", "ldmkit.demo")
    hits = [f"{p.relative_to(SRC)}: {w}" for p in PACKAGE.rglob("*.py") for w in words
            if w in p.read_text(encoding="utf-8")]
    assert not hits, hits


def test_files_and_functions_stay_readable():
    """No file over 600 lines unless its first comment says why; no function over 80 lines unless the
    comment line above it (`# long: ...`) says why."""
    long_files, long_functions = [], []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        if len(lines) > MAX_FILE_LINES and "long:" not in "\n".join(lines[:15]):
            long_files.append(f"{path.relative_to(SRC)} ({len(lines)} lines)")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                size = node.end_lineno - node.lineno + 1
                reason = first >= 2 and lines[first - 2].strip().startswith(LONG_REASON)
                if size > MAX_FUNCTION_LINES and not reason:
                    long_functions.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({size} lines)")
    assert not long_files, long_files
    assert not long_functions, long_functions

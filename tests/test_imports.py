"""The import graph of sdlora_ds (every import statement, those inside functions included): no
circles, and nothing from launch/ or bench/ (the package is the bottom; scripts sit on top of it).

`python tests/test_imports.py` prints the graph's size, its layers and any circle."""
import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "sdlora_ds"


def modules(root: str = ROOT, package: str = PACKAGE) -> dict[str, str]:
    """Dotted module name -> file, for every .py under the package (a package is its __init__)."""
    out = {}
    for folder, dirs, files in os.walk(os.path.join(root, package)):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
        for f in sorted(files):
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), root)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel)] = os.path.join(folder, f)
    return out


def imported_names(path: str, name: str, is_package: bool) -> list[tuple[list[str], int]]:
    """(candidates, line) for everything a file imports, anywhere in it: the candidates of
    `from X import y` are [X.y, X] (the first that is a module of the package is what it imports)."""
    tree = ast.parse(open(path).read(), path)
    base = name if is_package else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [([a.name], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                mod = ".".join(parts + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out += [([f"{mod}.{a.name}", mod], node.lineno) for a in node.names]
    return out


def import_graph(root: str = ROOT, package: str = PACKAGE) -> tuple[dict[str, set], list[str]]:
    """(module -> the package's modules it imports, foreign imports: 'module:line imports X' for X
    a script of launch/ or bench/)."""
    mods = modules(root, package)
    scripts = {f[:-3] for d in ("launch", "bench") if os.path.isdir(os.path.join(root, d))
               for f in os.listdir(os.path.join(root, d)) if f.endswith(".py")}
    graph: dict[str, set] = {m: set() for m in mods}
    upward = []
    for m, path in mods.items():
        for candidates, line in imported_names(path, m, path.endswith("__init__.py")):
            target = candidates[-1]
            top = target.split(".")[0]
            if top in ("launch", "bench") or (top in scripts and top not in sys.builtin_module_names
                                               and not target.startswith(package)):
                upward.append(f"{m}:{line} imports {target}")
            found = next((c for c in candidates if c in mods), None)
            if found is not None and found != m:
                graph[m].add(found)
    return graph, upward


def cycles(graph: dict[str, set]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, on, stack, out = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def layers(graph: dict[str, set]) -> dict[str, int]:
    """Layer of each module: 0 imports nothing of the package, else 1 + the highest layer it imports
    (a package's __init__ re-exporting its submodules sits above them). Acyclic graphs only."""
    depth: dict[str, int] = {}

    def d(v):
        if v not in depth:
            depth[v] = 1 + max((d(w) for w in graph[v]), default=-1)
        return depth[v]

    for v in graph:
        d(v)
    return depth


def test_no_import_circles():
    graph, _ = import_graph()
    assert len(graph) > 20  # the walk found the package
    found = cycles(graph)
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_package_imports_nothing_from_launch_or_bench():
    _, upward = import_graph()
    assert not upward, "imports from the scripts' folders: " + "; ".join(upward)


def test_every_converter_the_index_hints_at_exists():
    """data/index.py names converters from a table (it does not look for shards/ on disk)."""
    from sdlora_ds.data.index import _CONVERTERS
    for module, *_ in _CONVERTERS.values():
        assert os.path.isfile(os.path.join(ROOT, "shards", module + ".py")), module


def test_the_checker_finds_a_circle(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .b import g  # inside a function: counted\n")
    (pkg / "b.py").write_text("from pkg import a\n")
    (pkg / "c.py").write_text("import runtime\n")
    (tmp_path / "launch").mkdir()
    (tmp_path / "launch" / "runtime.py").write_text("")
    graph, upward = import_graph(str(tmp_path), "pkg")
    assert cycles(graph) == [["pkg.a", "pkg.b"]]
    assert upward == ["pkg.c:1 imports runtime"]


if __name__ == "__main__":
    g, up = import_graph()
    found = cycles(g)
    print(f"{len(g)} modules, {sum(map(len, g.values()))} edges, {len(found)} circles")
    for c in found:
        print("  circle:", " <-> ".join(c))
    for u in up:
        print("  upward:", u)
    if not found:
        lay = layers(g)
        print(f"{max(lay.values()) + 1} layers")
        for k in range(max(lay.values()) + 1):
            print(f"  {k}: " + " ".join(sorted(m for m in lay if lay[m] == k)))

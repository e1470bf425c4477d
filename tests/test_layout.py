"""The package's import graph: acyclic (counting imports inside functions too), and the method modules (network,
objective, sampler, conversion, perceptual terms) import nothing from ``pmf.train``, ``pmf.eval`` or the CLI, so a
reader can lift the method out alone and training or evaluation can change without touching it."""

import ast
from pathlib import Path

import pmf

PKG = Path(pmf.__file__).parent
METHOD = {"pmf.model", "pmf.attention", "pmf.objective", "pmf.objective_lean", "pmf.sampler", "pmf.convert",
          "pmf.perceptual", "pmf.images", "pmf.export", "pmf.atomic", "pmf.hub"}


def module_name(path: Path) -> str:
    parts = ["pmf", *path.relative_to(PKG).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PKG.rglob("*.py")}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every pmf module ``path`` imports anywhere in its body (``from pmf.x import y`` counts ``pmf.x.y`` when that
    is a module, else ``pmf.x``); a package's ``__init__`` is not counted as a dependency of its submodules."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("pmf."))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("pmf"):
            for a in node.names:
                full = f"{node.module}.{a.name}"
                out.add(full if full in known else node.module)
    return {m for m in out if m in known and m != "pmf"}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(path, set(mods)) - {name} for name, path in mods.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_import_graph_is_acyclic():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle inside pmf: " + " -> ".join(cycle)


def test_method_modules_do_not_import_infrastructure():
    g = graph()
    bad = {m: sorted(d for d in g[m] if d.startswith(("pmf.train", "pmf.eval", "pmf.cli")))
           for m in METHOD if m in g}
    assert not any(bad.values()), f"method modules importing training/evaluation code: {bad}"


def test_model_needs_only_torch_and_attention():
    assert graph()["pmf.model"] <= {"pmf.attention"}

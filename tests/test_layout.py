"""The package's import graph (every import, inside functions too): acyclic, and each folder imports only the
folders below it (``LAYERS``): ``method/`` nothing else of pmf, so the method can be lifted out alone; ``data/``,
``parallel/`` and ``io/`` the method; ``train/`` and ``eval/`` those; ``studies/`` and ``cli`` on top; nothing imports
``cli``. Also: the public API of ``pmf`` resolves, and no module imports the package root."""

import ast
from pathlib import Path

import pytest

import pmf

PKG = Path(pmf.__file__).parent
LOWER = {"errors", "util"}
LAYERS = {  # package -> the pmf packages its modules may import, besides its own
    "errors": set(),
    "util": {"errors"},
    "method": LOWER,
    "data": LOWER | {"method"},
    "parallel": LOWER | {"method"},
    "io": LOWER | {"data", "method"},
    "train": LOWER | {"data", "io", "method", "parallel"},
    "eval": LOWER | {"data", "io", "method", "parallel"},
    "studies": LOWER | {"data", "eval", "io", "method", "parallel", "train"},
    "cli": LOWER | {"data", "eval", "io", "method", "parallel", "studies", "train"},
    "__main__": {"cli"},
    "pmf": LOWER | {"data", "eval", "io", "method", "parallel", "studies", "train"},
}


def module_name(path: Path) -> str:
    parts = ["pmf", *path.relative_to(PKG).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(module: str) -> str:
    """'pmf.train.loop' -> 'train'; 'pmf.cli' -> 'cli'; 'pmf' -> 'pmf'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "pmf"


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every pmf module ``path`` imports anywhere in its body (``from pmf.x import y`` counts ``pmf.x.y`` when that
    is a module, else ``pmf.x``); the root ``pmf`` counts when a name is taken from it."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name == "pmf" or a.name.startswith("pmf."))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and (
                node.module == "pmf" or node.module.startswith("pmf.")):
            for a in node.names:
                full = f"{node.module}.{a.name}"
                out.add(full if full in known else node.module)
    return {m for m in out if m in known}


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


def layer_violations(g: dict[str, set[str]]) -> list[str]:
    bad = []
    for m, deps in sorted(g.items()):
        own = package_of(m)
        for d in sorted(deps):
            other = package_of(d)
            if d == "pmf" or (other != own and other not in LAYERS.get(own, set())):
                bad.append(f"{m} -> {d}")
    return bad


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_layer_check_catches_an_upward_import():
    g = {"pmf.method.model": {"pmf.train.loop"}, "pmf.train.loop": {"pmf.method.model"}, "pmf.cli": set(),
         "pmf.eval.stats": {"pmf.cli"}, "pmf.data.images": {"pmf"}}
    assert layer_violations(g) == ["pmf.data.images -> pmf", "pmf.eval.stats -> pmf.cli",
                                   "pmf.method.model -> pmf.train.loop"]


def test_every_package_has_a_rule():
    assert {package_of(m) for m in modules()} <= set(LAYERS)


def test_import_graph_is_acyclic():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle inside pmf: " + " -> ".join(cycle)


def test_imports_run_downward():
    bad = layer_violations(graph())
    assert not bad, "imports against the layer rule (tests/test_layout.py LAYERS): " + "; ".join(bad)


def test_model_needs_only_attention_and_its_layout():
    """PMFDiT imports only attention and the network's on-disk layout (its save_pretrained / from_pretrained)."""
    assert graph()["pmf.method.model"] <= {"pmf.method.attention", "pmf.method.pretrained"}


def test_nothing_imports_the_cli():
    g = graph()
    assert [m for m, deps in g.items() if "pmf.cli" in deps and m != "pmf.__main__"] == []


@pytest.mark.parametrize("name", sorted(set(pmf.__all__) - {"__version__"}))
def test_public_api_resolves(name):
    obj = getattr(pmf, name)
    assert getattr(obj, "__module__", "pmf").startswith("pmf"), (name, obj)

"""The building rules of issue 18, checked over the source tree (read with ``ast``, not
imported) and in fresh interpreters:

* no import cycle among fxcapture modules, counting imports inside functions;
* packages in one order, ``_util < core < dataset < interventions < inspect < compat <
  cli``: a module never imports from a package to its right (so ``core`` imports nothing
  from ``dataset``, ``inspect`` or ``cli``), nor the top-level ``fxcapture``;
* no import inside a function, except of an optional dependency (:data:`OPTIONAL`);
* no module over :data:`MAX_LINES` lines;
* ``import fxcapture`` loads none of networkx, matplotlib, tqdm, transformers (nor the
  other optional dependencies) beyond what ``import torch, torchvision`` already loads;
* ``python -m fxcapture --help`` works and every name of ``fxcapture.__all__`` imports.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fxcapture"

# Left to right; a package may import itself and the packages to its left.
ORDER = ["_util", "core", "dataset", "interventions", "inspect", "compat", "cli"]
# Top-level modules: ``_version`` may be imported by all; ``fxcapture`` (the package's
# ``__init__``) and ``__main__`` sit above every package and are imported by none.
RANKS = {"fxcapture._version": -1, "fxcapture": len(ORDER), "fxcapture.__main__": len(ORDER)}

# Imported only inside the functions that need them, so that ``import fxcapture`` stays
# light and a missing one fails only the feature using it: plotting (matplotlib),
# model zoos (transformers, timm, torchvision: also heavy to import), Parquet output
# (pyarrow) and the progress bar (tqdm).
OPTIONAL = {"matplotlib", "transformers", "timm", "pyarrow", "tqdm", "torchvision"}
# What ``import fxcapture`` must not add to ``import torch, torchvision``.
NOT_AT_IMPORT = {"networkx", "matplotlib", "tqdm", "transformers", "timm", "pyarrow"}

MAX_LINES = 450

# Imports inside functions on purpose: the package's public names resolve on first use,
# and the command line's entry point imports the parser (and so torch) inside its
# Ctrl-C handler.
LAZY = {"fxcapture", "fxcapture.cli"}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the module it loads (for ``from X import a``: ``X.a`` if a module, else ``X``)
    line: int
    in_function: bool


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(source: str, is_package: bool, node: ast.ImportFrom, modules: set[str]) -> list[str]:
    """The modules ``from X import a, b`` loads: ``X.a`` where it is a module, else ``X``."""
    if node.level:
        base = source.split(".") if is_package else source.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        package = ".".join(base + ([node.module] if node.module else []))
    else:
        package = node.module or ""
    targets = [f"{package}.{a.name}" for a in node.names if f"{package}.{a.name}" in modules]
    if len(targets) < len(node.names):
        targets.append(package)
    return targets


def imports_of(source: str, path: Path, modules: set[str]) -> list[Import]:
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            targets = _resolve(source, is_package, node, modules)
        else:
            targets = []
            in_function = in_function or isinstance(
                node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
            )
        for target in targets:
            found.append(Import(source, target, node.lineno, in_function))
        for child in ast.iter_child_nodes(node):
            visit(child, in_function)

    visit(tree, False)
    return found


@pytest.fixture(scope="module")
def graph() -> list[Import]:
    files = source_files()
    modules = set(files)
    return [i for name, path in files.items() for i in imports_of(name, path, modules)]


def rank(module: str) -> int:
    if module in RANKS:
        return RANKS[module]
    return ORDER.index(module.split(".")[1])


def where(i: Import) -> str:
    return f"{source_files()[i.source].relative_to(ROOT)}:{i.line}"


# -- the checker checks -------------------------------------------------------------------------
def test_imports_are_resolved_like_python_does(tmp_path):
    tree = {
        "fxcapture/__init__.py": "from .core.api import capture\n",
        "fxcapture/core/__init__.py": "from . import spec\n",
        "fxcapture/core/spec.py": "",
        "fxcapture/core/api.py": (
            "from .spec import Spec\nfrom ..dataset import run, Thing\nimport torch.nn\n"
            "def f():\n    import tqdm.auto\n    from .. import _version\n"
        ),
        "fxcapture/dataset/__init__.py": "",
        "fxcapture/dataset/run.py": "",
    }
    for rel, text in tree.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    modules = {"fxcapture", "fxcapture.core", "fxcapture.core.spec", "fxcapture.core.api",
               "fxcapture.dataset", "fxcapture.dataset.run"}  # fmt: skip
    api = imports_of("fxcapture.core.api", tmp_path / "fxcapture/core/api.py", modules)
    assert [(i.target, i.in_function) for i in api] == [
        ("fxcapture.core.spec", False), ("fxcapture.dataset.run", False),
        ("fxcapture.dataset", False), ("torch.nn", False), ("tqdm.auto", True),
        ("fxcapture", True),
    ]  # fmt: skip
    init = imports_of("fxcapture.core", tmp_path / "fxcapture/core/__init__.py", modules)
    assert [i.target for i in init] == ["fxcapture.core.spec"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"a"}, "b": set()}) == [["a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with a cycle (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in edges.get(v, ()):
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return sorted(found)


# -- the rules ------------------------------------------------------------------------------------
def test_no_import_cycle_counting_imports_inside_functions(graph):
    edges: dict[str, set[str]] = {}
    for i in graph:
        if i.target.startswith("fxcapture"):
            edges.setdefault(i.source, set()).add(i.target)
    found = cycles(edges)
    assert not found, "import cycles:\n" + "\n".join(
        " -> ".join(c) + "\n    " + ", ".join(
            f"{where(i)} imports {i.target}" for i in graph
            if i.source in c and i.target in c
        )
        for c in found
    )  # fmt: skip


def test_packages_import_only_packages_to_their_left(graph):
    wrong = [
        f"{where(i)}: {i.source} imports {i.target}"
        for i in graph
        if i.target.startswith("fxcapture") and rank(i.target) > rank(i.source)
    ]
    assert not wrong, f"order {' < '.join(ORDER)} broken:\n" + "\n".join(wrong)


def test_every_module_belongs_to_a_package_of_the_order():
    stray = [m for m in source_files() if m not in RANKS and m.split(".")[1] not in ORDER]
    assert not stray, f"modules outside the packages {ORDER}: {stray}"


def test_imports_inside_functions_are_optional_dependencies_only(graph):
    wrong = [
        f"{where(i)}: import of {i.target} inside a function"
        for i in graph
        if i.in_function and i.target.split(".")[0] not in OPTIONAL and i.source not in LAZY
    ]
    assert not wrong, f"move these to the top of the module (allowed inside: {sorted(OPTIONAL)}):\n" + "\n".join(wrong)


def test_no_module_is_longer_than_the_limit():
    long = {
        str(p.relative_to(ROOT)): n
        for p in source_files().values()
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"


# -- in fresh interpreters -------------------------------------------------------------------------
def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)  # fmt: skip


LOADED = "import sys, json; print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"


def test_import_fxcapture_loads_no_optional_dependency():
    baseline = python("import torch, torchvision\n" + LOADED)
    # every public name resolved: the package's own imports are lazy (PEP 562)
    loaded = python("import fxcapture\n[getattr(fxcapture, n) for n in fxcapture.__all__]\n" + LOADED)
    assert baseline.returncode == 0, baseline.stderr[-3000:]
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    added = set(json.loads(loaded.stdout)) - set(json.loads(baseline.stdout))
    assert "fxcapture" in added  # the comparison sees what the import adds
    assert not added & NOT_AT_IMPORT, f"import fxcapture loads {sorted(added & NOT_AT_IMPORT)}"


def test_python_m_fxcapture_help_and_every_public_name_imports():
    proc = subprocess.run([sys.executable, "-m", "fxcapture", "--help"], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("usage: fxcapture")
    for command in COMMANDS:
        assert command in proc.stdout
    code = (
        "import fxcapture\n"
        "missing = [n for n in fxcapture.__all__ if not hasattr(fxcapture, n)]\n"
        "exec('from fxcapture import ' + ', '.join(fxcapture.__all__))\n"
        "print(len(fxcapture.__all__), missing)"
    )
    proc = python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    count, missing = proc.stdout.split(" ", 1)
    assert int(count) >= 10 and missing.strip() == "[]"


COMMANDS = sorted(p.stem for p in (PACKAGE / "cli").glob("*.py") if p.stem not in ("__init__", "app", "models"))


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_module_is_a_command_with_help(command, capsys):
    from fxcapture.cli import build_parser

    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([command, "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: fxcapture {command}")


# -- the documentation of the layout ------------------------------------------------------------
def test_each_package_docstring_says_what_it_may_import():
    for package in ORDER:
        doc = ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text()))
        assert doc, f"fxcapture/{package}/__init__.py has no docstring"
        assert "import" in doc, f"fxcapture/{package}'s docstring does not say what it may import"


def test_the_readme_table_names_every_package_and_module():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## How it is built"):]
    section = section[: section.find("\n## ", 3)] if "\n## " in section[3:] else section
    for package in ORDER:
        assert f"`{package}/`" in section, f"README 'How it is built' lacks the package {package}/"
    missing = [
        name for name in source_files()
        if name.count(".") == 2  # fxcapture.<package>.<module>
        and f"`{name.rsplit('.', 1)[1]}`" not in section
        and not any(f"`{prefix}*`" in section for prefix in _prefixes(name.rsplit(".", 1)[1]))
    ]
    assert not missing, f"README 'How it is built' does not name the modules {missing}"


def _prefixes(module: str) -> list[str]:
    """``monitor_store`` -> ``monitor_``: a table may name a family as ``monitor_*``."""
    return [module[: i + 1] for i, c in enumerate(module) if c == "_"]


def core_floors() -> dict[str, int]:
    """``{module: row}`` of the README's table of the stages inside ``core``."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("Inside `core`, the stages"):]
    rows = [line for line in section.split("\n\n", 2)[1].splitlines() if line.startswith("| `")]
    return {
        f"fxcapture.core.{name}": floor
        for floor, row in enumerate(rows)
        for name in re.findall(r"`(\w+)`", row.split("|")[1])
    }


def test_the_readme_order_inside_core_matches_the_imports(graph):
    floors = core_floors()
    core = [m for m in source_files() if m.startswith("fxcapture.core.")]
    assert sorted(floors) == sorted(core), "README's core table must name each core module once"
    upward = [
        f"{where(i)}: {i.source} (row {floors[i.source]}) imports {i.target} (row {floors[i.target]})"
        for i in graph
        if i.source in floors and i.target in floors and floors[i.target] > floors[i.source]
    ]
    assert not upward, "a core module imports a later stage:\n" + "\n".join(upward)


def cyclomatic_complexity(function: ast.AST) -> int:
    """McCabe's count, strictly: one plus each branch (``if``, loop, ``except``,
    conditional expression, comprehension filter) and each extra operand of ``and``/``or``."""
    count = 1
    for node in ast.walk(function):
        if isinstance(node, (ast.If, ast.For, ast.AsyncFor, ast.While, ast.ExceptHandler, ast.IfExp)):
            count += 1
        elif isinstance(node, ast.BoolOp):
            count += len(node.values) - 1
        elif isinstance(node, ast.comprehension):
            count += len(node.ifs)
    return count


@pytest.mark.parametrize("module, name", [("core/build.py", "choose_trace"), ("core/policy.py", "decide")])
def test_the_tracer_choice_stays_simple(module, name):
    """The tracer choice reads as a table (``policy.decide``) and one driver (issue 23: below 15)."""
    tree = ast.parse((PACKAGE / module).read_text())
    function = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name)
    assert cyclomatic_complexity(function) < 15, (module, name, cyclomatic_complexity(function))

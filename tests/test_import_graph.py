"""The import graph of the toolkit's own modules: no cycles (imports inside functions count, since
they only hide a cycle until the function runs) and one direction (data never imports training)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("data_pipelines", "pretrain")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The toolkit modules that ``name`` imports anywhere in its file (function bodies included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                # "from pkg import sub" imports the submodule when there is one, else a name of pkg
                sub = f"{base}.{alias.name}"
                targets.add(sub if sub in modules else base)
    deps = set()
    for target in targets:
        # a dotted import names the deepest toolkit module it reaches
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name:
            deps.add(target)
    return deps


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def _parent_package_edges(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Without a package's own __init__ importing its submodules (a package re-exporting what its
    modules define is not a cycle unless a module imports the package back)."""
    return {name: {d for d in deps if not d.startswith(name + ".")} for name, deps in graph.items()}


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    source = "def f():\n    from pretrain.runtime import trainer\n"
    (tmp_path / "m.py").write_text(source)
    assert _imports("pretrain.x", tmp_path / "m.py", {"pretrain.runtime.trainer": Path(), "pretrain.x": Path()}) == {
        "pretrain.runtime.trainer"
    }


def test_no_import_cycles_in_the_toolkit():
    graph = _parent_package_edges(_graph())
    assert len(graph) > 60, "the walk found the modules"
    assert _cycles(graph) == [], "import cycles (function-level imports included)"


def test_data_pipelines_never_import_training_code():
    graph = _graph()
    wrong = {
        name: sorted(d for d in deps if d.startswith("pretrain"))
        for name, deps in graph.items()
        if name.startswith("data_pipelines")
    }
    assert {k: v for k, v in wrong.items() if v} == {}


def test_models_and_run_assembly_never_import_the_loop_or_the_commands():
    graph = _graph()
    for name, deps in graph.items():
        if name.startswith(("pretrain.models", "pretrain.run", "pretrain.parallel", "pretrain.finetune")):
            bad = sorted(
                d for d in deps if d.startswith(("pretrain.runtime.trainer", "pretrain.cli", "pretrain.train"))
            )
            assert not bad, f"{name} imports {bad}"


def test_every_third_party_package_imported_is_declared():
    """A package the toolkit imports but pyproject.toml does not name works only where something else
    happened to install it."""
    import re
    import sys

    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {
        re.split(r"[<>=!\[ ;]", d, maxsplit=1)[0].lower().replace("-", "_")
        for d in [*project["dependencies"], *(d for ds in project["optional-dependencies"].values() for d in ds)]
    }
    # import names that are not their distribution's name (MLflow's tracking client ships as mlflow-skinny)
    distribution = {"PIL": "pillow", "yaml": "pyyaml", "mlflow": "mlflow_skinny"}
    imported = set()
    for path in _modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m not in PACKAGES}
    missing = sorted(m for m in third_party if distribution.get(m, m).lower() not in declared)
    assert missing == [], f"imported but not declared in pyproject.toml: {missing}"


def test_no_module_is_over_600_lines():
    """A module past 600 lines holds more than one stage; split it by stage (issue 21)."""
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > 600}
    assert long == {}

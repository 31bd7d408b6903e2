"""The direction of imports, read from the sources with `ast`: models/ knows nothing of the search, the engine
nothing of Optuna or the study, `best` and `report` nothing of the objective, and no module imports itself back."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("models", "search")


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path = ROOT) -> list[tuple[str, int]]:
    """Every module this file imports (at any depth, inside functions too), with its line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import submodule` imports the submodule; `from module import name`, the module
            submodules = [f"{node.module}.{a.name}" for a in node.names
                          if (root / Path(*f"{node.module}.{a.name}".split("."))).with_suffix(".py").exists()]
            found += [(m, node.lineno) for m in submodules] or [(node.module, node.lineno)]
    return found


def project_graph(root: Path = ROOT) -> dict[str, dict[str, int]]:
    files = [root / "cli.py"] + [p for pkg in PACKAGES for p in sorted((root / pkg).rglob("*.py"))]
    modules = {module_name(p, root): p for p in files}
    graph = {}
    for name, path in modules.items():
        edges = {}
        for target, line in imports_of(path, root):
            if target in modules and target != name:
                edges.setdefault(target, line)
        graph[name] = edges
    return graph


def forbidden(sources: str, banned: tuple[str, ...], external: tuple[str, ...] = (), root: Path = ROOT) -> list[str]:
    """Imports from modules under `sources` of project modules under `banned`, or of `external` packages."""
    found = []
    files = [root / "cli.py"] + [p for pkg in PACKAGES for p in sorted((root / pkg).rglob("*.py"))]
    for path in files:
        name = module_name(path, root)
        if not (name == sources or name.startswith(sources + ".")):
            continue
        for target, line in imports_of(path, root):
            top = target.split(".")[0]
            if any(target == b or target.startswith(b + ".") for b in banned) or top in external:
                found.append(f"{path.relative_to(root)}:{line} imports {target}")
    return sorted(set(found))


def test_models_import_nothing_from_search():
    assert forbidden("models", ("search", "cli"), ("optuna",)) == []


def test_engine_imports_nothing_of_optuna_or_the_study():
    banned = ("search.study", "search.objective", "search.storage", "search.record", "search.pruning",
              "search.space", "search.retrain", "search.report", "search.workers", "search.tally", "search.setup",
              "search.provenance", "search.commands", "search.run", "search.cli_options", "search.option_table",
              "cli")
    assert forbidden("search.engine", banned, ("optuna",)) == []


def test_best_and_report_do_not_load_the_search_machinery():
    for module in ("search.retrain", "search.report", "search.report_data", "search.report_figures",
                   "search.report_optuna",
                   "search.record", "search.storage", "search.certificate", "search.checkpoint", "search.choose",
                   "search.certified_files", "search.workers", "search.tally", "search.setup", "search.provenance"):
        assert forbidden(module, ("search.objective", "search.study", "search.space",
                                                   "search.pruning")) == [], module


def test_the_cli_s_command_modules_are_the_only_ones_that_know_typer():
    """Command logic lives in search/ and is callable from Python: only cli.py and the option declarations it reads
    (search/cli_options.py) import typer."""
    knows_typer = [name for name, path in ((module_name(p), p) for p in [ROOT / "cli.py", *sorted(
        p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))]) if any(t.split(".")[0] == "typer"
                                                                            for t, _ in imports_of(path))]
    assert knows_typer == ["cli", "search.cli_options"]


def test_no_import_cycles_among_the_projects_modules():
    graph = project_graph()
    cycles = []

    def visit(node, stack):
        for target in graph[node]:
            if target in stack:
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in done:
                visit(target, stack + [target])
        done.add(node)

    done: set[str] = set()
    for start in graph:
        if start not in done:
            visit(start, [start])
    assert cycles == []


def test_the_checker_finds_a_forbidden_import(tmp_path):
    """The rule fails, naming the import, when a module breaks it: in a copy of the sources, not in models/ itself."""
    import shutil

    copy = tmp_path / "tree"
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, copy / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "cli.py", copy / "cli.py")
    assert forbidden("models", ("search",), root=copy) == []
    (copy / "models" / "_layering_probe.py").write_text("from search.study import run_search\n")
    assert forbidden("models", ("search",), root=copy) == [
        "models/_layering_probe.py:1 imports search.study"]

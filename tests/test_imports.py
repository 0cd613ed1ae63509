"""The shape of the code's imports: the core (cpt_bench/) has no import cycle, counting every import statement
wherever it stands (a function-level import that hides a cycle is a cycle); its sub-packages are layers, and a
lower one never imports a higher one (cpt_bench/__init__.py lists them); plugins (methods/, baselines/) import
only the core, never each other; the core never imports a plugin."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]
PLUGIN_FOLDERS = {"methods": "cpt_bench.methods", "baselines": "cpt_bench.baselines"}


def module_files() -> dict[str, Path]:
    """Every module of the installed package by its dotted name (the plugin folders install under cpt_bench)."""
    modules = {}
    for path in (ROOT / "cpt_bench").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for folder, package in PLUGIN_FOLDERS.items():
        for path in (ROOT / folder).glob("*.py"):
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return modules


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `name` imports anywhere in its file (top level, functions, TYPE_CHECKING),
    with the parent packages that importing a submodule runs first."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package upwards
                parents = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parents, base] if base else parents)
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names)  # `from package import module`
    found = set()
    for target in targets:
        parts = target.split(".")
        found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in known)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imported_modules(name, path, set(modules)) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for child in sorted(graph.get(node, ())):
            if state.get(child) == "open":
                return [*stack[stack.index(child):], child]
            if child not in state and (cycle := visit(child)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle_hidden_in_a_function():
    graph = import_graph()
    # as a function-level import would
    graph["cpt_bench.common.errors"] = graph["cpt_bench.common.errors"] | {"cpt_bench.running.runner"}
    assert find_cycle(graph) is not None


def test_imports_inside_functions_are_seen(tmp_path):
    module = tmp_path / "late.py"
    module.write_text("def f():\n    from cpt_bench.running.runner import execute\n    return execute\n")
    assert imported_modules("cpt_bench.late", module, {"cpt_bench", "cpt_bench.running.runner"}) == \
        {"cpt_bench", "cpt_bench.running.runner"}


def test_plugins_import_only_the_core():
    graph = import_graph()
    plugins = {name for name in graph if name.startswith(tuple(PLUGIN_FOLDERS.values()))}
    for name in sorted(plugins):
        other_plugins = {m for m in graph[name] if m in plugins}
        assert not other_plugins, f"{name} imports {sorted(other_plugins)}: move what they share into cpt_bench/"


def test_the_core_never_imports_a_plugin():
    graph = import_graph()
    plugins = {name for name in graph if name.startswith(tuple(PLUGIN_FOLDERS.values()))}
    for name in sorted(set(graph) - plugins):
        assert not graph[name] & plugins, f"{name} imports {sorted(graph[name] & plugins)} (the registry loads them)"


def layer_of(module: str) -> int | None:
    """The layer of a core module (its sub-package's place in cpt_bench.LAYERS); None outside the layers."""
    from cpt_bench import LAYERS

    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[0] == "cpt_bench" and parts[1] in LAYERS else None


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for module, imported in sorted(graph.items()):
        mine = layer_of(module)
        found += [f"{module} imports {other}" for other in sorted(imported)
                  if mine is not None and (theirs := layer_of(other)) is not None and theirs > mine]
    return found


def test_every_core_module_sits_in_a_layer():
    from cpt_bench import LAYERS

    loose = [name for name in import_graph() if name.startswith("cpt_bench.") and layer_of(name) is None
             and name.split(".")[1] not in ("methods", "baselines", "tasks", "__main__")]
    assert not loose, f"modules outside the sub-packages {LAYERS}: {loose}"


def test_a_lower_layer_never_imports_a_higher_one():
    violations = layering_violations(import_graph())
    assert not violations, "; ".join(violations)


def test_the_layering_check_finds_an_upward_import():
    graph = import_graph()
    graph["cpt_bench.data.texts"] = graph["cpt_bench.data.texts"] | {"cpt_bench.report.table"}
    assert layering_violations(graph) == ["cpt_bench.data.texts imports cpt_bench.report.table"]


def test_a_module_of_the_flat_layout_is_the_moved_module_with_a_deprecation_warning():
    """Plugins written against the flat layout (`from cpt_bench.plugin import Method`) keep working for one
    release: the old name is the same module object, so registries and monkeypatches are shared."""
    import importlib
    import sys
    import warnings

    import cpt_bench.training.plugin as moved

    sys.modules.pop("cpt_bench.plugin", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = importlib.import_module("cpt_bench.plugin")
        from cpt_bench.models import lm_loss  # a name of the old module `cpt_bench.models`
    assert old is moved
    from cpt_bench.models.loading import lm_loss as moved_loss

    assert lm_loss is moved_loss
    messages = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    assert any("cpt_bench.plugin moved to cpt_bench.training.plugin" in m for m in messages), messages
    assert any("cpt_bench.models.lm_loss moved to cpt_bench.models.loading.lm_loss" in m for m in messages)


def test_the_encoder_era_names_still_work_and_say_their_new_names():
    import types
    import warnings

    from cpt_bench.data import batches
    from cpt_bench.models import loading

    model = types.SimpleNamespace(base_model=object())  # what lm_body reads of a transformers model
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert loading.encoder(model) is loading.lm_body(model)
        assert batches.masked_loader.__wrapped__ is batches.lm_loader
    assert [str(w.message) for w in caught] == ["encoder is now lm_body; the old name goes in the next release"]

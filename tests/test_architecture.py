"""The package's shape, as docs/architecture.md states it: no import cycle, the teacher signals and the helpers never
import the methods (not even for typing), no compatibility shims, every option group typed and checked."""

from __future__ import annotations

import ast
import dataclasses
import typing
from pathlib import Path

import pytest

from lightning_distill import options

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_distill"
#: the only modules that may import lightning_distill.modules: the methods themselves and what runs them
USERS_OF_METHODS = {"lightning_distill", "lightning_distill.cli", "lightning_distill.demo"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, typing_too: bool = True) -> set[str]:
    """The package modules ``path`` imports at module level (``from pkg import submodule`` counts as the
    submodule), with those under ``if TYPE_CHECKING:`` when ``typing_too``."""
    found: set[str] = set()
    body = list(ast.parse(path.read_text(encoding="utf-8")).body)
    nodes = [*body, *(n for node in body if isinstance(node, ast.If) and typing_too for n in node.body)]
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("lightning_distill")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lightning_distill"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
    return {name for name in found if name in MODULES}


def test_there_is_no_import_cycle():
    """At run time (an ``if TYPE_CHECKING:`` import inside modules/ names the class a function there is given)."""
    graph = {name: imports(path, typing_too=False) - {name} for name, path in MODULES.items()}
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1 and not name.startswith(dep + "."):  # a package's own __init__ is not a cycle
                pytest.fail("import cycle: " + " -> ".join([*path[path.index(dep):], dep]))
            if dep not in state:
                visit(dep, [*path, dep])
        state[name] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_signals_and_helpers_never_import_the_methods():
    offenders = {name: sorted(dep for dep in imports(path) if dep.startswith("lightning_distill.modules"))
                 for name, path in MODULES.items()
                 if not name.startswith("lightning_distill.modules") and name not in USERS_OF_METHODS}
    assert {name: deps for name, deps in offenders.items() if deps} == {}


def test_no_compatibility_shims():
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        assert not any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in tree.body), name
        assert "re-exported" not in path.read_text(encoding="utf-8"), name


OPTION_GROUPS = [options.Optimization, options.Performance, options.Validation, options.OnPolicy, options.Features,
                 options.Served, options.Generation, options.Schedule, options.Teachers]


@pytest.mark.parametrize("group", OPTION_GROUPS, ids=lambda g: g.__name__)
def test_option_groups_are_frozen_documented_and_typed(group):
    assert dataclasses.is_dataclass(group) and group.__dataclass_params__.frozen
    hints = typing.get_type_hints(group, vars(options))
    for field in dataclasses.fields(group):
        assert field.name in hints
        assert f"{field.name}:" in group.__doc__, f"{group.__name__}.{field.name} is not documented"
    if all(f.default is not dataclasses.MISSING for f in dataclasses.fields(group)):
        group()  # the defaults pass the checks


@pytest.mark.parametrize("method", ["SoftDistill", "HardDistill", "CoDistill"])
def test_methods_take_at_most_15_top_level_arguments(method):
    """Options are grouped (lightning_distill.options), so a method's signature stays readable."""
    import inspect

    import lightning_distill

    assert len(inspect.signature(getattr(lightning_distill, method)).parameters) <= 15

"""The package's layers only point down and its modules form no import cycle, counting
every import statement (those inside functions too), read with ``ast``."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mergelab"

# lowest first; a module may import its own layer and those below it
LAYERS = [
    ("rules", ("mergelab.merging", "mergelab.errors")),
    ("engine", ("mergelab.engine",)),
    ("io", ("mergelab.io",)),
    ("models and tasks", ("mergelab.models", "mergelab.tasks")),
    ("methods", ("mergelab.methods",)),
    ("lightning adapters", ("mergelab.lightning",)),
    (
        "applications",
        (
            "mergelab.checkpoint_merge",
            "mergelab.cli",
            "mergelab.console",
            "mergelab.sweep",
            "mergelab.embedded",
            "mergelab.quiet",
            "mergelab.registry",
            "mergelab.usage",
        ),
    ),
    ("public api", ("mergelab",)),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(name: str, path: Path) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its file."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}".rstrip(".")
            # `from package import module` imports the module; otherwise the names live in base
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                for alias in node.names
            ]
        else:
            continue
        found |= {t for t in targets if t in MODULES and t != name}
    return found


GRAPH = {name: imported(name, path) for name, path in MODULES.items()}


def layer_of(name: str) -> int:
    matches = [
        (len(prefix), index)
        for index, (_, prefixes) in enumerate(LAYERS)
        for prefix in prefixes
        if name == prefix or name.startswith(prefix + ".")
    ]
    assert matches, f"{name} belongs to no layer: add it to LAYERS"
    return max(matches)[1]  # the longest prefix decides


def test_the_graph_sees_imports_inside_functions():
    # cli imports the console-less parts at module level; console imports them in main()
    assert "mergelab.cli" in GRAPH["mergelab.console"]
    assert "mergelab.embedded.build" in GRAPH["mergelab.embedded"]


def test_no_import_cycle():
    state: dict[str, str] = {}  # "open" while on the DFS stack, "done" after

    def visit(name: str, stack: list[str]) -> None:
        state[name] = "open"
        for target in sorted(GRAPH[name]):
            if state.get(target) == "open":
                cycle = [*stack[stack.index(target) :], target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*stack, target])
        state[name] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])


def test_layers_only_point_down():
    upward = [
        f"{name} ({LAYERS[layer_of(name)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
        for name, targets in GRAPH.items()
        for target in targets
        if layer_of(target) > layer_of(name)
    ]
    assert not upward, "\n".join(upward)


def test_no_mock_in_the_package():
    users = [name for name, targets in GRAPH.items() if "unittest" in MODULES[name].read_text()]
    assert not users


def test_files_stay_small():
    scripts = Path(__file__).resolve().parents[1] / "scripts"
    sizes = {p: len(p.read_text().splitlines()) for p in [*MODULES.values(), *scripts.glob("*.py")]}
    large = {str(p): n for p, n in sizes.items() if n > 420}
    assert not large, large


def test_help_imports_neither_torch_nor_lightning():
    """``mergelab --help`` prints from mergelab.usage: no heavy import (under a second)."""
    import subprocess
    import sys

    code = (
        "import sys; sys.argv = ['mergelab', '--help']; from mergelab.console import main; "
        "main(); print(sorted(m for m in ('torch', 'lightning') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert (
        "usage: mergelab {fit,validate,test,embedded,sweep,merge,compress,retrieve}" in out.stdout
    )
    assert out.stdout.strip().splitlines()[-1] == "[]"

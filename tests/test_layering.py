"""Lower layers never import upper ones (the folder layout is the architecture)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kryptvault"
BASE = {"errors", "durable"}
ALLOWED: dict[str, set[str]] = {
    "crypto": BASE,
    "container": BASE | {"crypto"},
    "fs": BASE | {"crypto", "container"},
    "fuseadapter": BASE | {"crypto", "container", "fs"},
    "token": BASE | {"crypto"},
    "watcher": BASE | {"crypto", "token"},
    "session": BASE | {"crypto", "container", "fs", "fuseadapter", "token", "watcher"},
    "backup": BASE | {"crypto", "container", "token", "session"},
    "cli": BASE | {"crypto", "container", "fs", "fuseadapter", "token", "watcher", "session", "backup"},
}


def _imported_layers(path: Path) -> set[str]:
    layers = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "kryptvault" and len(parts) > 1:
                layers.add(parts[1])
    return layers


def test_each_layer_imports_only_the_layers_below_it() -> None:
    violations = []
    for layer, allowed in ALLOWED.items():
        for path in (PACKAGE / layer).rglob("*.py"):
            for imported in _imported_layers(path) - allowed - {layer, "__init__"}:
                violations.append(f"{path.relative_to(PACKAGE)} imports kryptvault.{imported}")
    assert violations == []


def test_every_package_folder_is_a_known_layer() -> None:
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and not p.name.startswith("__")}
    assert folders <= set(ALLOWED)

"""Every command module (`kryptvault/cli/*_commands.py`), imported once so its commands
attach to the `cli` group."""

import importlib
import pkgutil

import kryptvault.cli as _package
from kryptvault.cli.app import cli

for _module in sorted(m.name for m in pkgutil.iter_modules(_package.__path__)):
    if _module.endswith("_commands"):
        importlib.import_module(f"kryptvault.cli.{_module}")

__all__ = ["cli"]

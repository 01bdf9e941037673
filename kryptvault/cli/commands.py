"""Every command module, imported once so its commands attach to the `cli` group."""

from kryptvault.cli import vault_commands  # noqa: F401
from kryptvault.cli.app import cli

__all__ = ["cli"]

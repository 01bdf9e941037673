"""The command-line interface (the top layer)."""


def register_commands() -> None:
    """Import every command module so its commands attach to the group."""
    from kryptvault.cli import commands  # noqa: F401

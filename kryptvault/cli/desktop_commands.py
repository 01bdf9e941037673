"""Desktop set-up: `kryptvault setup CONTAINER` writes the vault's settings to config.toml."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from kryptvault.cli.app import cli
from kryptvault.cli.options import container_argument
from kryptvault.cli.output import say
from kryptvault.cli.unit_files import (
    USER_UNITS,
    data_home,
    default_units_dir,
    desktop_files,
    install_desktop_files,
    install_user_units,
)
from kryptvault.container.vault import read_container_header
from kryptvault.durable import replace_file
from kryptvault.errors import KryptvaultError, UsageError
from kryptvault.session import fusectl
from kryptvault.session.config import VaultPrefs, config_path, load_vault_prefs, updated_config_text
from kryptvault.session.paths import config_dir
from kryptvault.session.pinentry import PinentryCancelled, PinentryFailed, ask_password, ask_with_program

F = TypeVar("F", bound=Callable[..., Any])


def _yes_no(flag: str, help_text: str) -> Callable[[F], F]:
    return click.option(f"--{flag}/--no-{flag}", default=None, help=help_text)


@cli.command()
@container_argument
@click.option(
    "--mountpoint",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where `kryptvault mount` puts it (default: ~/Vault-<id>, listed by file managers).",
)
@_yes_no("mount-on-plug", "Mount when the token is plugged in (default yes).")
@_yes_no("lock-on-suspend", "Lock before the computer sleeps (default yes).")
@_yes_no("lock-on-screen-lock", "Lock when the screen locks (default no).")
@_yes_no("lock-on-logout", "Lock when the session ends (default yes).")
@click.option(
    "--idle-minutes", type=click.FloatRange(min=0), help="Lock after this long without activity (0: never)."
)
@click.option(
    "--units-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the systemd user units go (default: ~/.config/systemd/user).",
)
@click.option("--dry-run", is_flag=True, help="Show what would be written; write nothing.")
def setup(
    container: Path,
    mountpoint: Path | None,
    mount_on_plug: bool | None,
    lock_on_suspend: bool | None,
    lock_on_screen_lock: bool | None,
    lock_on_logout: bool | None,
    idle_minutes: float | None,
    units_dir: Path | None,
    dry_run: bool,
) -> None:
    """Write CONTAINER's desktop settings (mount point, when to lock) to config.toml;
    `kryptvault mount CONTAINER` then needs no mount point."""
    container = container.resolve()
    if not container.is_file():
        raise UsageError(f"{container} is not a file")
    # Before any key: the UUID only names the settings' table (nothing is trusted from it).
    vault = read_container_header(container, allow_disagreement=True).header.vault_uuid
    prefs = load_vault_prefs(vault) or VaultPrefs(vault_uuid=vault)
    prefs.container = container
    if mountpoint is not None:
        prefs.mountpoint = mountpoint.expanduser().absolute()
    elif prefs.mountpoint is None:
        prefs.mountpoint = Path.home() / f"Vault-{vault.hex[:8]}"
    for name, value in (
        ("mount_on_plug", mount_on_plug),
        ("lock_on_suspend", lock_on_suspend),
        ("lock_on_screen_lock", lock_on_screen_lock),
        ("lock_on_logout", lock_on_logout),
        ("idle_minutes", idle_minutes),
    ):
        if value is not None:
            setattr(prefs, name, value)
    path = config_path()
    old, new = updated_config_text(prefs, path)
    units = units_dir or default_units_dir()
    rules_hint = f"sudo kryptvault token udev {container} --units-dir {units}"
    if dry_run:
        click.echo(f"would write to {path}:")
        click.echo(prefs.to_toml(), nl=False)
        if not prefs.mountpoint.exists():
            click.echo(f"would create the folder {prefs.mountpoint}")
        click.echo(f"would install the systemd user units {', '.join(USER_UNITS)} in {units}")
        for file in desktop_files(data_home()):
            click.echo(f"would install {file}")
        click.echo(f"the udev rules need root: {rules_hint}")
        return
    config_dir().mkdir(mode=0o700, parents=True, exist_ok=True)
    if new != old:
        replace_file(path, new.encode())
    if not prefs.mountpoint.exists():
        prefs.mountpoint.mkdir(mode=0o700, parents=True)
        say(f"created the folder {prefs.mountpoint}")
    install_user_units(units)
    say(f"installed the systemd user units in {units} (`systemctl --user daemon-reload` loads them)")
    install_desktop_files(data_home())
    say(f"wrote the settings of vault {vault} to {path}; `kryptvault mount {container}` mounts it on "
        f"{prefs.mountpoint}")
    if not _rules_name(vault.hex):
        say(f"to mount on plug and lock on unplug, install the udev rules (needs root): {rules_hint}")


def _rules_name(vault_hex: str, rules: Path = Path("/etc/udev/rules.d/70-kryptvault.rules")) -> bool:
    """Do the installed udev rules name this vault?"""
    try:
        return vault_hex in rules.read_text()
    except OSError:
        return False


PLUG_TRIES = 3


@cli.command(hidden=True)
@click.argument("vault")
@click.option("--token", "token_spec", metavar="SPEC", help="The token, if it cannot be found by itself.")
@click.option("--pinentry", "program", default="pinentry", show_default=True, help="The prompt program.")
@click.option(
    "--fallback",
    default="systemd-ask-password",
    show_default=True,
    help="Asks when pinentry cannot run (prompt as argument, password on stdout).",
)
def plug(vault: str, token_spec: str | None, program: str, fallback: str) -> None:
    """Mount VAULT (its UUID) after its token was plugged in, if its settings say so:
    asks the password with pinentry. Started by kryptvault-plug@.service."""
    try:
        vault_uuid = uuid.UUID(vault)
    except ValueError:
        raise UsageError(f"{vault!r} is not a vault UUID")
    prefs = load_vault_prefs(vault_uuid)
    if prefs is None or prefs.container is None or prefs.mountpoint is None:
        say(f"vault {vault_uuid} has no settings (`kryptvault setup CONTAINER`): not mounting it")
        return
    if not prefs.mount_on_plug:
        say(f"mount on plug is off for vault {vault_uuid}")
        return
    if fusectl.is_mounted(prefs.mountpoint):
        say(f"{prefs.mountpoint} is already mounted")
        return
    error: str | None = None
    description = f"Password of vault {vault_uuid.hex[:8]}"
    use_fallback = False
    for _ in range(PLUG_TRIES):
        try:
            if not use_fallback:
                try:
                    password = ask_password(program, description, error)
                except PinentryFailed as exc:
                    failed = str(exc)
                    use_fallback = True
            if use_fallback:
                try:
                    prompt = f"{error} {description}:" if error else f"{description}:"
                    password = ask_with_program(fallback, prompt)
                except PinentryFailed as exc:
                    raise KryptvaultError(f"cannot ask for the password: {failed}; {exc}")
        except PinentryCancelled:
            # No retry storm: the token stays in, the vault stays locked until asked again.
            say("cancelled: the vault stays locked")
            return
        mounted = _mount_with(prefs.container, password, token_spec)
        if mounted.returncode == 0:
            say(mounted.stdout.strip())
            return
        problem = mounted.stderr.strip().removeprefix("kryptvault: ")
        if "wrong password" not in problem:
            raise KryptvaultError(problem or f"mount failed (status {mounted.returncode})")
        error = "Wrong password, or the wrong token."
    raise KryptvaultError(f"wrong password {PLUG_TRIES} times: the vault stays locked")


def _mount_with(
    container: Path, password: bytearray, token_spec: str | None
) -> subprocess.CompletedProcess[str]:
    """`kryptvault mount CONTAINER` (at its configured mount point), the password through a
    pipe (--password-fd), never argv or the environment."""
    read_end, write_end = os.pipe()
    try:
        try:
            # A pipe holds 64 KiB: far more than a password, so no reader is needed yet.
            for part in (password, b"\n"):
                with memoryview(part) as view:
                    done = 0
                    while done < len(view):
                        done += os.write(write_end, view[done:])
        finally:
            password[:] = bytes(len(password))
            os.close(write_end)
        command = [sys.executable, "-m", "kryptvault.cli.main", "mount", str(container),
                   "--password-fd", str(read_end)]
        if token_spec:
            command += ["--token", token_spec]
        return subprocess.run(command, pass_fds=(read_end,), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, check=False)
    finally:
        os.close(read_end)

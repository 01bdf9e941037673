"""Desktop set-up: `kryptvault setup CONTAINER` writes the vault's settings to config.toml."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click

from kryptvault.cli.app import cli
from kryptvault.cli.options import container_argument
from kryptvault.cli.output import say
from kryptvault.cli.token_commands import udev_rules_for, with_other_vaults_kept
from kryptvault.cli.unit_files import (
    data_home,
    default_units_dir,
    desktop_files,
    install_desktop_files,
    install_user_units,
    unit_texts,
    write_text_file,
)
from kryptvault.container.vault import read_container_header
from kryptvault.durable import replace_file
from kryptvault.errors import KryptvaultError, UsageError
from kryptvault.session import fusectl
from kryptvault.session.config import (
    VaultPrefs,
    all_vault_prefs,
    config_path,
    load_vault_prefs,
    updated_config_text,
)
from kryptvault.session.paths import config_dir
from kryptvault.session.pinentry import PinentryCancelled, PinentryFailed, ask_password, ask_with_program

F = TypeVar("F", bound=Callable[..., Any])
DEFAULT_RULES_DIR = Path("/etc/udev/rules.d")
RULES_NAME = "70-kryptvault.rules"


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
@click.option(
    "--install-udev-rules",
    is_flag=True,
    help="Not root: install the udev rules through sudo (or pkexec), which asks for a password. "
    "As root they are installed anyway.",
)
@click.option(
    "--rules-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_RULES_DIR,
    envvar="KRYPTVAULT_UDEV_RULES_DIR",
    show_default=True,
    help="Where the udev rules go.",
)
@click.option("--dry-run", is_flag=True, help="Show every file and command; write and run nothing.")
def setup(
    container: Path,
    mountpoint: Path | None,
    mount_on_plug: bool | None,
    lock_on_suspend: bool | None,
    lock_on_screen_lock: bool | None,
    lock_on_logout: bool | None,
    idle_minutes: float | None,
    units_dir: Path | None,
    install_udev_rules: bool,
    rules_dir: Path,
    dry_run: bool,
) -> None:
    """Set CONTAINER up for the desktop in one step: its settings (mount point, when to
    lock) in config.toml, the systemd user units (and `systemctl --user daemon-reload`), the
    desktop entry, and the udev rules (as root; otherwise with --install-udev-rules, or the
    one command to run is printed). `kryptvault mount CONTAINER` then needs no mount point."""
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
    # Everything is worked out before the first write: a bad config or a missing unit
    # template stops setup with nothing changed.
    path = config_path()
    old, new = updated_config_text(prefs, path)
    units = units_dir or default_units_dir()
    unit_names = list(unit_texts())
    desktop = desktop_files(data_home())
    rules = _plan_rules(container, vault, rules_dir)
    root = os.geteuid() == 0
    elevate = install_udev_rules and not root and not rules.current
    if dry_run:
        click.echo(f"would write to {path}:" if new != old else f"{path}: no change to")
        click.echo(prefs.to_toml(), nl=False)
        if not prefs.mountpoint.exists():
            click.echo(f"would create the folder {prefs.mountpoint}")
        click.echo(f"would install the systemd user units {', '.join(unit_names)} in {units}")
        for file in desktop:
            click.echo(f"would install {file}")
        click.echo("would run: systemctl --user daemon-reload (when a systemd user manager is running)")
        _show_rules_step(rules, root, elevate, dry_run=True)
        return
    done: list[str] = []

    def step(what: str, action: Callable[[], str | None]) -> None:
        try:
            message = action()
        except (KryptvaultError, OSError, subprocess.SubprocessError) as exc:
            if isinstance(exc, OSError) and exc.strerror:
                reason = exc.strerror + (f": {exc.filename}" if exc.filename else "")
            else:
                reason = str(exc)
            so_far = f"already done: {'; '.join(done)}" if done else "nothing was changed"
            raise KryptvaultError(f"{what} failed: {reason}; {so_far}") from None
        if message:
            say(message)
            done.append(message)

    def write_config() -> str | None:
        if new == old:
            return None
        config_dir().mkdir(mode=0o700, parents=True, exist_ok=True)
        replace_file(path, new.encode())
        return f"wrote the settings of vault {vault} to {path}"

    def make_folder() -> str | None:
        assert prefs.mountpoint is not None
        if prefs.mountpoint.exists():
            return None
        prefs.mountpoint.mkdir(mode=0o700, parents=True)
        return f"created the folder {prefs.mountpoint}"

    def units_step() -> str:
        install_user_units(units)
        return f"installed the systemd user units in {units}"

    def desktop_step() -> str:
        install_desktop_files(data_home())
        return f"installed the desktop entry and its icon in {data_home()}"

    step("writing the settings", write_config)
    step("creating the mount point", make_folder)
    step("installing the systemd user units", units_step)
    step("installing the desktop entry", desktop_step)
    step("reloading the systemd user manager", _reload_user_manager)
    if root:
        step("installing the udev rules", lambda: _install_rules(rules))
    elif elevate:
        step("installing the udev rules", lambda: _install_rules_elevated(rules))
    else:
        _show_rules_step(rules, root, elevate, dry_run=False)
    say(f"`kryptvault mount {container}` mounts vault {vault} on {prefs.mountpoint}")


@dataclass
class _RulesPlan:
    path: Path
    text: str
    current: bool  # the installed file is exactly `text`
    kept: list[str]  # vaults with no settings here whose installed rules `text` keeps
    command: list[str]  # what root runs to install `text`


def _plan_rules(container: Path, vault: uuid.UUID, rules_dir: Path) -> _RulesPlan:
    """The rules file covers every vault set up in config.toml, not only this one: it is
    one file, and writing it for one vault must not drop the others' rules (those of a
    vault with no settings here, or on a disk that is not there, are kept as installed)."""
    by_vault = {vault: container}
    for other in all_vault_prefs():
        if other.vault_uuid is None or other.vault_uuid in by_vault or other.container is None:
            continue
        try:
            found = read_container_header(other.container).header.vault_uuid
        except (KryptvaultError, OSError):
            continue  # on a disk that is not there: left out, and said so if it had rules
        if found == other.vault_uuid:
            by_vault[found] = other.container
    covered = set(by_vault)
    # In UUID order: the same vaults give the same file, whichever was set up last.
    containers = [by_vault[v] for v in sorted(by_vault, key=str)]
    text, _ = udev_rules_for(containers)
    rules_path = rules_dir / RULES_NAME
    try:
        installed = rules_path.read_text()
    except OSError:
        installed = ""
    text, kept = with_other_vaults_kept(text, installed, covered)
    command = [_executable(), "token", "udev", *map(str, containers), "--no-units", "--keep-other-vaults"]
    if rules_dir != DEFAULT_RULES_DIR:
        command += ["--rules-dir", str(rules_dir)]
    return _RulesPlan(rules_path, text, installed == text, kept, command)


def _executable() -> str:
    # Absolute: sudo's secure_path and pkexec's clean environment do not find a virtualenv.
    return shutil.which("kryptvault") or str(Path(sys.executable).parent / "kryptvault")


def _elevator() -> str | None:
    return shutil.which("sudo") or shutil.which("pkexec")


def _show_rules_step(rules: _RulesPlan, root: bool, elevate: bool, dry_run: bool) -> None:
    """Dry run: what the udev step would do. Otherwise (not root, no --install-udev-rules):
    the one command to run, unless the installed rules are already these."""
    if rules.current:
        say(f"the udev rules in {rules.path} are up to date")
        return
    kept = _kept_note(rules)
    if dry_run and root:
        click.echo(f"would write {rules.path}{kept}")
        click.echo("would run: udevadm control --reload")
        return
    command = shlex.join([os.path.basename(_elevator() or "sudo"), *rules.command])
    if dry_run and elevate:
        click.echo(f"would run: {command}{kept}")
        return
    text = f"to mount on plug and lock on unplug, install the udev rules (needs root): {command}{kept}"
    if dry_run:
        click.echo(text)
    else:
        say(text)


def _kept_note(rules: _RulesPlan) -> str:
    if not rules.kept:
        return ""
    which = "vault" if len(rules.kept) == 1 else "vaults"
    return f" (keeping the installed rules of {which} {', '.join(rules.kept)}, with no settings here)"


def _install_rules(rules: _RulesPlan) -> str | None:
    """As root: write the rules file (atomically) and have udevd read it."""
    if rules.current:
        say(f"the udev rules in {rules.path} are up to date")
        return None
    rules.path.parent.mkdir(parents=True, exist_ok=True)
    write_text_file(rules.path, rules.text)
    udevadm = shutil.which("udevadm")
    reload = None
    if udevadm is not None:
        reload = subprocess.run([udevadm, "control", "--reload"], stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, timeout=60, check=False)
    if reload is None or reload.returncode != 0:
        return (f"wrote {rules.path}{_kept_note(rules)}; udevd is not running here (`udevadm control "
                "--reload` failed): it reads the rules when it starts")
    return f"wrote {rules.path}{_kept_note(rules)} and reloaded udevd (udevadm control --reload)"


def _install_rules_elevated(rules: _RulesPlan) -> str:
    """Not root, asked to: `sudo kryptvault token udev ... --no-units` (pkexec without sudo),
    on this terminal so that it can ask its password."""
    elevator = _elevator()
    if elevator is None:
        raise KryptvaultError(
            f"neither sudo nor pkexec is installed; as root, run: {shlex.join(rules.command)}"
        )
    command = [elevator, *rules.command]
    ran = subprocess.run(command, check=False)
    if ran.returncode != 0:
        raise KryptvaultError(f"`{shlex.join(command)}` ended with status {ran.returncode}")
    return f"installed the udev rules in {rules.path} (with {os.path.basename(elevator)})"


def _reload_user_manager() -> str | None:
    """`systemctl --user daemon-reload` when a user manager is there to reload. Nothing to
    enable: the units are templates that udev's SYSTEMD_USER_WANTS starts."""
    systemctl = shutil.which("systemctl")
    if systemctl is None:
        say("no systemctl here: a systemd user manager reads the units when it starts")
        return None
    probe = subprocess.run([systemctl, "--user", "is-system-running"], stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=30, check=False)
    # "offline": no manager to talk to (no session, a container, su without a login).
    if probe.stdout.strip() in ("", "offline", "unknown"):
        say("no systemd user manager is reachable here: it reads the units when it starts")
        return None
    reload = subprocess.run([systemctl, "--user", "daemon-reload"], stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=60, check=False)
    if reload.returncode != 0:
        why = " ".join(reload.stderr.split()) or f"status {reload.returncode}"
        raise KryptvaultError(f"systemctl --user daemon-reload: {why}")
    return "reloaded the systemd user manager (systemctl --user daemon-reload)"


PLUG_TRIES = 3
# How long `plug` waits for the token to become usable before it asks for the password:
# the udev rule starts it when the stick's disk appears, and a desktop's automounter
# (udisks) mounts the filesystem that holds the share a moment later.
PLUG_TOKEN_WAIT_S = 20.0


def _token_problem(container: Path, token_spec: str | None) -> str | None:
    """Why the vault's token cannot be used yet (None: it can, or there is nothing to wait
    for: a FIDO2 key or a directory token). Reads only the container's public header."""
    from kryptvault.errors import TokenError
    from kryptvault.session.unlock import find_token, slot_identities

    try:
        header = read_container_header(container).header
    except (KryptvaultError, OSError):
        return None  # the mount says what is wrong with the container itself
    identities = slot_identities(header).values()
    # A vault with FIDO2 keyslots gets here only after `_probe_keys` found none of its keys
    # plugged: it then waits for its stick, if it has one.
    if not token_spec and not any(i.kind != "dir" for i in identities):
        return None
    try:
        find_token(header, token_spec)
    except TokenError as exc:
        return str(exc)
    return None


@dataclass
class _Probe:
    """What the plugged FIDO2 keys say about a vault with FIDO2 keyslots."""

    keys_only: bool  # no stick to wait for: FIDO2 slots (and directory tokens) only, or --token fido2
    spec: str | None = None  # `fido2:/dev/hidrawN` of the key holding a credential of the vault
    uv: bool = False  # that credential's slot wants the key's PIN
    problem: str | None = None  # why no key could be asked


def _probe_keys(container: Path, token_spec: str | None) -> _Probe | None:
    """Which plugged key holds one of the vault's FIDO2 credentials, asked without a touch
    or a PIN (an assertion with up=false: a key answers NO_CREDENTIALS for a credential
    it did not make). None: the vault has no FIDO2 keyslot (or another --token)."""
    from kryptvault.errors import TokenError
    from kryptvault.session.unlock import fido2_identities, slot_identities
    from kryptvault.token.fido2key import authenticators_for, find_holder, is_fido2_spec

    if token_spec and not is_fido2_spec(token_spec):
        return None
    try:
        header = read_container_header(container).header
    except (KryptvaultError, OSError):
        return None  # the mount says what is wrong with the container itself
    wanted = list(fido2_identities(header).values())
    if not wanted:
        return None
    keys_only = bool(token_spec) or not any(i.kind != "dir" for i in slot_identities(header).values())
    try:
        keys = authenticators_for(token_spec)
    except TokenError as exc:
        return _Probe(keys_only, problem=str(exc))
    try:
        found = find_holder(keys, wanted)
    except TokenError as exc:
        return _Probe(keys_only, problem=str(exc))
    finally:
        # An open hidraw handle gets a copy of every reply: let go before the mount asks.
        for key in keys:
            key.close()
    if found is None:
        return _Probe(keys_only)
    auth, identity = found
    return _Probe(keys_only, spec=f"fido2:{auth.path}", uv=identity.uv)


def _wait_for_token(container: Path, token_spec: str | None, timeout: float) -> str | None:
    """None once the token can be used, else (after `timeout` seconds) why it cannot."""
    deadline = time.monotonic() + timeout
    while True:
        problem = _token_problem(container, token_spec)
        if problem is None or time.monotonic() >= deadline:
            return problem
        time.sleep(0.25)


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
    asks the password with pinentry (and a FIDO2 key's PIN when its slot wants it).
    Started by kryptvault-plug@.service: by the guard unit for a stick, by the udev rule
    for any security key when the vault has FIDO2 keyslots (then a key holding none of
    its credentials ends it quietly)."""
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
    probe = _probe_keys(prefs.container, token_spec)
    if probe is not None and probe.spec is None and probe.keys_only:
        # Every security key plugged starts the plug unit of every FIDO2 vault: most of
        # the time it is another vault's key (or not one of ours). No prompt, no notice.
        why = f" ({probe.problem})" if probe.problem else ""
        say(f"no plugged security key holds a credential of vault {vault_uuid}{why}: not mounting it")
        return
    key = probe if probe is not None and probe.spec is not None else None
    if key is None:
        wait = float(os.environ.get("KRYPTVAULT_PLUG_TOKEN_WAIT", PLUG_TOKEN_WAIT_S))
        problem = _wait_for_token(prefs.container, token_spec, wait)
        if problem is not None:
            # No prompt for a password that could not be used; the desktop says why.
            from kryptvault.session.desktop import notify_once

            notify_once("Vault not mounted", f"Vault {vault_uuid.hex[:8]}: {problem}.")
            raise KryptvaultError(f"not asking for the password: {problem}")
    short = vault_uuid.hex[:8]
    asker = _Asker(program, fallback)
    error: str | None = None
    pin_error: str | None = None
    password: bytearray | None = None
    pin: bytearray | None = None
    wrong = "password"
    try:
        for _ in range(PLUG_TRIES):
            try:
                if password is None:
                    password = asker.ask(f"Password of vault {short}", error, "Password:")
                if key is not None and key.uv and pin is None:
                    pin = asker.ask(f"PIN of the security key for vault {short}", pin_error, "PIN:")
            except PinentryCancelled:
                # No retry storm: the token stays in, the vault stays locked until asked again.
                say("cancelled: the vault stays locked")
                return
            mounted = _mount_with(
                prefs.container, password, key.spec if key is not None else token_spec, pin, short
            )
            if mounted.returncode == 0:
                say(mounted.stdout.strip())
                return
            problem = mounted.stderr.strip().removeprefix("kryptvault: ")
            last = problem.splitlines()[-1].removeprefix("kryptvault: ") if problem else ""
            if pin is not None and last.startswith("wrong PIN"):
                # The key checks its PIN before the password is tried: keep the password.
                pin[:] = bytes(len(pin))
                pin = None
                pin_error = last[0].upper() + last[1:] + "."
                wrong = "PIN"
            elif "wrong password" in problem:
                password[:] = bytes(len(password))
                password = None
                error = "Wrong password, or the wrong token."
                wrong = "password"
            else:
                # A unit started by udev has no terminal: the desktop says why (a key not
                # touched in time, a blocked PIN, a damaged container, a busy mount point).
                why = last or f"mount failed (status {mounted.returncode})"
                from kryptvault.session.desktop import notify_once

                notify_once("Vault not mounted", f"Vault {short}: {why}.")
                raise KryptvaultError(problem or f"mount failed (status {mounted.returncode})")
    finally:
        for secret in (password, pin):
            if secret is not None:
                secret[:] = bytes(len(secret))
    raise KryptvaultError(f"wrong {wrong} {PLUG_TRIES} times: the vault stays locked")


class _Asker:
    """pinentry, or the fallback program once pinentry could not run."""

    def __init__(self, program: str, fallback: str) -> None:
        self.program = program
        self.fallback = fallback
        self.failed: str | None = None

    def ask(self, description: str, error: str | None, prompt: str) -> bytearray:
        if self.failed is None:
            try:
                return ask_password(self.program, description, error, prompt)
            except PinentryFailed as exc:
                self.failed = str(exc)
        try:
            return ask_with_program(self.fallback, f"{error} {description}:" if error else f"{description}:")
        except PinentryFailed as exc:
            raise KryptvaultError(f"cannot ask for the password: {self.failed}; {exc}")


def _secret_pipe(secret: bytearray) -> int:
    """The read end of a pipe holding `secret` and a newline (a pipe holds 64 KiB: far
    more than a password, so no reader is needed yet)."""
    read_end, write_end = os.pipe()
    try:
        for part in (secret, b"\n"):
            with memoryview(part) as view:
                done = 0
                while done < len(view):
                    done += os.write(write_end, view[done:])
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)
    return read_end


def _mount_with(
    container: Path, password: bytearray, token_spec: str | None, pin: bytearray | None, short: str
) -> subprocess.CompletedProcess[str]:
    """`kryptvault mount CONTAINER` (at its configured mount point), the password (and a
    FIDO2 key's PIN) through pipes (--password-fd, --pin-file /proc/self/fd/N), never argv
    or the environment. The mount's "Touch your security key" becomes a notification: the
    key waits for the touch, and a unit started by udev has no terminal to say it on."""
    from kryptvault.session.desktop import notify_once
    from kryptvault.token.fido2key import TOUCH_PROMPT

    fds: list[int] = []
    try:
        fds.append(_secret_pipe(password))
        command = [sys.executable, "-m", "kryptvault.cli.main", "mount", str(container),
                   "--password-fd", str(fds[0])]
        if pin is not None:
            fds.append(_secret_pipe(pin))
            command += ["--pin-file", f"/proc/self/fd/{fds[1]}"]
        if token_spec:
            command += ["--token", token_spec]
        proc = subprocess.Popen(command, pass_fds=tuple(fds), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        for fd in fds:
            os.close(fd)
    assert proc.stdout is not None and proc.stderr is not None
    errors = []
    # The daemon the mount starts keeps neither pipe: both end when the mount returns, and
    # its stdout is one line, so reading stderr first cannot block on a full stdout.
    for line in proc.stderr:
        if line.strip() == TOUCH_PROMPT:
            notify_once(TOUCH_PROMPT, f"Vault {short} opens when you touch the key.")
        else:
            errors.append(line)
    out = proc.stdout.read()
    proc.stdout.close()
    proc.stderr.close()
    return subprocess.CompletedProcess(command, proc.wait(), out, "".join(errors))

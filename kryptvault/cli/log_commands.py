"""`kryptvault log`: read the audit log (unlocks, locks and why, control requests, backups)."""

from __future__ import annotations

import contextlib
import datetime
import json
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import click

from kryptvault.cli.app import cli
from kryptvault.errors import UsageError
from kryptvault.session.audit import AuditLog, follow_entries, parse_timestamp, read_entries
from kryptvault.token.base import printable

_FIRST = ("ts", "event", "vault")


def format_entry(entry: dict[str, Any]) -> str:
    """One line: local time, event, then key=value (e.g. `... lock vault=… reason=unplug`)."""
    try:
        when = parse_timestamp(str(entry.get("ts"))).astimezone()
        stamp = when.strftime("%Y-%m-%d %H:%M:%S.") + f"{when.microsecond // 1000:03d}"
    except ValueError:
        stamp = printable(str(entry.get("ts")))
    parts = [stamp, printable(str(entry.get("event", "?")))]
    if entry.get("vault"):
        parts.append(f"vault={_value(entry['vault'])}")
    parts += [
        f"{printable(str(k))}={_value(v)}" for k, v in entry.items() if k not in _FIRST and v is not None
    ]
    return " ".join(parts)


def _value(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    text = printable(str(value))
    # Quote what would otherwise split or blur the key=value list.
    return json.dumps(text, ensure_ascii=False) if (not text or any(c in text for c in ' ="')) else text


def _since(text: str | None) -> datetime.datetime | None:
    if text is None:
        return None
    try:
        return parse_timestamp(text)
    except ValueError:
        raise UsageError(f"--since: not an ISO-8601 time: {printable(text)[:60]!r} (e.g. 2026-11-30T11:20)")


_HEX = frozenset("0123456789abcdef")


def _vault(text: str | None, path: Path) -> uuid.UUID | None:
    """A full UUID, or the start of one: the short id `mount` and `df` show
    (`kryptvault:abcd1234`) or any prefix, dashes optional, that only one vault in the
    log has."""
    if text is None:
        return None
    with contextlib.suppress(ValueError):
        return uuid.UUID(text.strip())
    prefix = text.strip().lower().removeprefix("kryptvault:").replace("-", "")
    if not prefix or not set(prefix) <= _HEX or len(prefix) > 32:
        raise UsageError(f"--vault: not a vault UUID or the start of one: {printable(text)[:60]!r}")
    known = set()
    for entry in read_entries(path):
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            known.add(uuid.UUID(entry.get("vault")))
    matches = sorted(str(v) for v in known if v.hex.startswith(prefix))
    if not matches:
        raise UsageError(f"--vault: no vault in the audit log has an id starting with {prefix}")
    if len(matches) > 1:
        shown = ", ".join(m[:13] + "…" for m in matches[:4]) + (", …" if len(matches) > 4 else "")
        raise UsageError(f"--vault: {prefix} is the start of {len(matches)} vault ids ({shown}); give more")
    return uuid.UUID(matches[0])


def _print(entries: Iterable[dict[str, Any]], as_json: bool) -> None:
    for entry in entries:
        line = (
            json.dumps(entry, ensure_ascii=False, separators=(",", ":")) if as_json else format_entry(entry)
        )
        click.echo(line)


@cli.command("log")
@click.option(
    "--vault",
    "vault_text",
    metavar="ID",
    help="Only entries about this vault: its UUID, or a unique start of it such as the short id "
    "that mount and df show (kryptvault:abcd1234).",
)
@click.option(
    "--since", "since_text", metavar="ISO", help="Only entries at or after this time (local unless given)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the entries as JSON lines, as stored.")
@click.option(
    "--follow", "-f", is_flag=True, help="Keep printing new entries as they are written (Ctrl-C ends)."
)
def log_command(vault_text: str | None, since_text: str | None, as_json: bool, follow: bool) -> None:
    """Show the audit log: unlocks, locks (and why), control requests, backups."""
    path = AuditLog().path
    vault, since = _vault(vault_text, path), _since(since_text)
    if not follow:
        _print(read_entries(path, vault, since), as_json)
        return
    try:
        _print(follow_entries(path, vault, since), as_json)
    except KeyboardInterrupt:
        return  # the normal way to end --follow, not a failure

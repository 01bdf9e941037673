"""`kryptvault log`: read the audit log (unlocks, locks and why, control requests, backups)."""

from __future__ import annotations

import datetime
import json
import uuid
from collections.abc import Iterable
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


def _vault(text: str | None) -> uuid.UUID | None:
    if text is None:
        return None
    try:
        return uuid.UUID(text.strip())
    except ValueError:
        raise UsageError(f"--vault: not a vault UUID: {printable(text)[:60]!r}")


def _print(entries: Iterable[dict[str, Any]], as_json: bool) -> None:
    for entry in entries:
        line = (
            json.dumps(entry, ensure_ascii=False, separators=(",", ":")) if as_json else format_entry(entry)
        )
        click.echo(line)


@cli.command("log")
@click.option("--vault", "vault_text", metavar="UUID", help="Only entries about this vault.")
@click.option(
    "--since", "since_text", metavar="ISO", help="Only entries at or after this time (local unless given)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the entries as JSON lines, as stored.")
@click.option(
    "--follow", "-f", is_flag=True, help="Keep printing new entries as they are written (Ctrl-C ends)."
)
def log_command(vault_text: str | None, since_text: str | None, as_json: bool, follow: bool) -> None:
    """Show the audit log: unlocks, locks (and why), control requests, backups."""
    vault, since = _vault(vault_text), _since(since_text)
    path = AuditLog().path
    if not follow:
        _print(read_entries(path, vault, since), as_json)
        return
    try:
        _print(follow_entries(path, vault, since), as_json)
    except KeyboardInterrupt:
        return  # the normal way to end --follow, not a failure

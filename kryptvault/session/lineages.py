"""Which lineage each container file was last seen with, on this machine.

The lineage id is in the encrypted commit record (docs/FORMAT.md §4.6), and a backup reads
no key. So whatever learns a container's lineage with the key (every mount, `restore
--new-identity`) notes it here, by vault UUID and file identity (device and inode, as the
control socket does), and a backup asks before adding the file's state to a backup set:
a fork's versions must not land among the vault's (docs/BACKUP.md §9).

What this cannot know: a file never mounted here since it was forked, copied to another
file, or replaced by a new file (an fsck rebuild, a rekey) until its next mount.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import uuid
from pathlib import Path

from kryptvault.session.control import container_instance
from kryptvault.session.paths import state_dir


def _note_path(vault_uuid: uuid.UUID, info: os.stat_result) -> Path:
    return state_dir() / "lineages" / f"{vault_uuid}.{container_instance(info)}.json"


def remember_lineage(info: os.stat_result, vault_uuid: uuid.UUID, lineage: bytes, container: str) -> None:
    """Best effort (a failure only loses the note, never a mount): atomic replace."""
    path = _note_path(vault_uuid, info)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    try:
        path.parent.mkdir(mode=0o700, exist_ok=True)
        tmp.write_text(json.dumps({"lineage": lineage.hex(), "container": container}))
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


def known_lineage(container: Path, vault_uuid: uuid.UUID) -> bytes | None:
    """The lineage this file was last mounted or forked with here, or None if unknown."""
    try:
        note = json.loads(_note_path(vault_uuid, os.stat(container)).read_text())
        lineage = bytes.fromhex(note["lineage"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return lineage if len(lineage) == 16 else None

"""Which vaults a token serves: `kryptvault token list` marks each stick with these."""

from __future__ import annotations

import uuid

from kryptvault.token.base import Token
from kryptvault.token.share import list_share_uuids


def list_registrations(token: Token) -> list[uuid.UUID]:
    """Vault UUIDs that `token` holds share files for, from the file names (junk ignored).

    Only names are read: a listed share file may still turn out corrupted when opened.
    """
    return list_share_uuids(token.share_dir)

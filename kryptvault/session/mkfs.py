"""Writing the empty filesystem into a freshly created container."""

from __future__ import annotations

import os

from kryptvault.container.header import Header
from kryptvault.container.store import ObjectStore
from kryptvault.container.vault import StoreKeys
from kryptvault.fs.filesystem import Filesystem


def initialise_filesystem(fd: int, header: Header, keys: StoreKeys) -> None:
    store = ObjectStore.create(fd, header.layout, header.vault_uuid, keys.data, keys.meta)
    try:
        Filesystem.mkfs(store, os.getuid(), os.getgid())
    finally:
        store.close()

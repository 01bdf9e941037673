"""Noticing that the token left: kernel uevents, mount-table changes and polling.

This layer imports only `kryptvault.token`, `kryptvault.errors` and the standard library.
"""

from kryptvault.watcher.devices import WatchedDevices, watched_devices
from kryptvault.watcher.uevent import NetlinkUnavailableError, Uevent, UeventListener, parse_uevent
from kryptvault.watcher.watcher import ROUTES, TokenWatcher

__all__ = [
    "ROUTES",
    "NetlinkUnavailableError",
    "TokenWatcher",
    "Uevent",
    "UeventListener",
    "WatchedDevices",
    "parse_uevent",
    "watched_devices",
]

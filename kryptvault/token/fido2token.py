"""A plugged FIDO2 key as the token a mounted vault watches (lock when it is pulled).

The key holds no files: what opened the vault was its hmac-secret (token/fido2key.py).
While mounted, only its presence matters: the hidraw node with the same device number,
and the same device behind /sys/class/hidraw/NAME. A key pulled and another plugged in
under the same name sits at another sysfs path (the HID device's instance number grows).

There is nowhere on the key to keep the rollback record, so `share_dir` is the
machine's own record directory ($XDG_STATE_HOME/kryptvault/rollback, the one the mount
session keeps anyway): a FIDO2 mount is checked against what this machine saw.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from kryptvault.errors import TokenError
from kryptvault.token.base import Token, TokenIdentity, printable


def _local_records_dir() -> Path:
    # The same directory as session.rollback.local_records_dir(); this layer may not
    # import the session, so the XDG rule is repeated here.
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    path = Path(base) / "kryptvault" / "rollback"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


class Fido2Token(Token):
    """`--token fido2:/dev/hidrawN` in the mount daemon: the key at that node."""

    def __init__(self, node: str, *, sysfs_root: str = "/sys", records_dir: Path | None = None) -> None:
        self.node = node
        name = os.path.basename(node)
        try:
            st = os.stat(node)
        except OSError as exc:
            raise TokenError(f"the security key {printable(node)} is not there: {exc.strerror}")
        if not stat.S_ISCHR(st.st_mode):
            raise TokenError(f"{printable(node)} is not a hidraw device")
        self._rdev = st.st_rdev
        self._class_link = os.path.join(sysfs_root, "class", "hidraw", name)
        self.sysfs_path = os.path.realpath(self._class_link)
        if not os.path.isdir(self.sysfs_path):
            raise TokenError(f"the security key {printable(node)} has no entry in sysfs")
        self.identity = TokenIdentity("fido2", path=node)
        self.share_dir = records_dir or _local_records_dir()

    def is_present(self) -> bool:
        # Two stats and a readlink: cheap enough to poll every 200 ms.
        try:
            if os.stat(self.node).st_rdev != self._rdev:
                return False
        except OSError:
            return False
        return os.path.realpath(self._class_link) == self.sysfs_path and os.path.isdir(self.sysfs_path)

    def _prepare_share_dir(self) -> None:
        raise TokenError("a FIDO2 security key holds no share files")

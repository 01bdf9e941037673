"""READDIRPLUS replies carry each new name's attributes: `ls -l` of a directory the kernel
has not seen costs one request per batch of names, not one LOOKUP per name."""

from __future__ import annotations

import os
import stat

from fs_fixtures import MemoryStore

from kryptvault.fs import Filesystem
from kryptvault.fuseadapter import wire as w
from kryptvault.fuseadapter.server import FuseServer, mount_options


def _entries(reply: bytes) -> list[tuple[bytes, int, int, int]]:
    """(name, node id in the entry, inode in the dirent, mode in the attributes) per record."""
    out = []
    at = 0
    while at < len(reply):
        nodeid = w.ENTRY_OUT.unpack_from(reply, at)[0]
        attr = w.ATTR.unpack_from(reply, at + w.ENTRY_OUT.size)
        dirent_at = at + w.ENTRY_OUT.size + w.ATTR.size
        ino, _cookie, namelen, _type = w.DIRENT.unpack_from(reply, dirent_at)
        name = reply[dirent_at + w.DIRENT.size : dirent_at + w.DIRENT.size + namelen]
        out.append((name, nodeid, ino, attr[9]))
        at = dirent_at + w.align8(w.DIRENT.size + namelen)
    return out


def test_readdirplus_sends_attributes_for_names_the_kernel_does_not_hold(tmp_path: object) -> None:
    fs = Filesystem.mkfs(MemoryStore(), os.getuid(), os.getgid())
    d = fs.mkdir(1, b"d", 0o755, os.getuid(), os.getgid())
    made = {}
    for i in range(5):
        st, fh = fs.create(d.ino, f"f{i}".encode(), 0o640, os.O_WRONLY, os.getuid(), os.getgid())
        fs.release(fh)
        made[f"f{i}".encode()] = st.ino
    server = FuseServer(fs, str(tmp_path), options=mount_options("t", allow_other=False, extra=None),
                        commit_delay=None)
    readdirplus = server.handlers[w.READDIRPLUS]
    body = memoryview(w.READ_IN.pack(d.ino, 0, 65536, 0, 0, 0, 0))
    entries = {name: rest for name, *rest in _entries(readdirplus(d.ino, 0, 0, os.getpid(), body))}
    assert set(entries) == {b".", b"..", *made}
    for name, ino in made.items():
        nodeid, dirent_ino, mode = entries[name]
        assert (nodeid, dirent_ino) == (ino, ino) and stat.S_ISREG(mode) and mode & 0o777 == 0o640
    assert entries[b"."][0] == 0 and entries[b".."][0] == 0  # the kernel skips those
    # Now the kernel holds them: a second listing refreshes nothing (their cached ACLs stay).
    again = _entries(readdirplus(d.ino, 0, 0, os.getpid(), body))
    assert all(nodeid == 0 for _, nodeid, _, _ in again)

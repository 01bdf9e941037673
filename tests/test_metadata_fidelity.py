"""Copies into a mounted vault keep every piece of metadata, not only the contents.

A source tree on the host filesystem (ext4 here) with varied modes (set-uid/gid, sticky,
execute-only), owners, nanosecond mtimes, symlinks, hard links, a fifo, user.* xattrs
and POSIX ACLs is copied into the vault with `cp -a`, `rsync -aAXH` and `tar --xattrs
--acls`; every entry of the copy must match the source in type, mode, owner, group,
size, mtime (ns), symlink target, contents, hard-link group, user.* xattrs and ACLs. The
ACL rules themselves (mode sync, chmod, default ACL inheritance, umask) are checked
against the kernel's own implementation by running the same setfacl/chmod/create steps
on the host filesystem and in the vault and comparing the results.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import make_vault, run_process
from fs_fixtures import (  # noqa: F401  (fixtures)
    close_store,
    mdir_fixture,
    mounted,
    new_store,
    shared_mount_fixture,
)
from needs import require_tool

from kryptvault.fs import Filesystem, FsError

ACCESS = "system.posix_acl_access"
DEFAULT = "system.posix_acl_default"
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
UNDEF = 0xFFFFFFFF


def acl_value(*entries: tuple[int, int, int], version: int = 2) -> bytes:
    """Linux's xattr form of an ACL: u32 version, then (u16 tag, u16 perm, u32 id)."""
    return struct.pack("<I", version) + b"".join(struct.pack("<HHI", *e) for e in entries)


def base_acl(user: int, group: int, other: int) -> list[tuple[int, int, int]]:
    return [(USER_OBJ, user, UNDEF), (GROUP_OBJ, group, UNDEF), (OTHER, other, UNDEF)]


# ---------------------------------------------------------------------- the source tree
def build_tree(root: Path) -> None:
    """Everything `cp -a` must keep; root-owned unless said otherwise (we are root)."""
    if os.geteuid() != 0:
        pytest.skip("the source tree needs chown (run as root)")
    root.mkdir()
    (root / "bin").mkdir()
    tool = root / "bin" / "tool"
    tool.write_text("#!/bin/sh\necho tool\n")
    os.chmod(tool, 0o755)
    os.link(tool, root / "bin" / "tool-hard")
    suid = root / "bin" / "suid"
    suid.write_bytes(b"\x7fELF-not-really")
    os.chmod(suid, 0o4755)
    sgid = root / "bin" / "sgid"
    sgid.write_bytes(b"sgid")
    os.chown(sgid, 0, 100)
    os.chmod(sgid, 0o2755)

    private = root / "private"
    private.mkdir()
    (private / "secret").write_bytes(b"s" * 5000)
    (private / "exec-only").write_bytes(b"#!/bin/true\n")
    os.chmod(private / "secret", 0o600)
    os.chmod(private / "exec-only", 0o711)
    for p in (private / "secret", private / "exec-only", private):
        os.chown(p, 1234, 5678)
    os.chmod(private, 0o700)

    shared = root / "shared"
    shared.mkdir()
    os.chown(shared, 0, 100)
    os.chmod(shared, 0o2775)
    (shared / "notes").write_text("group notes\n")  # takes group 100 from the set-gid dir
    os.chmod(shared / "notes", 0o664)

    sticky = root / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    (sticky / "nobody").write_text("x")
    os.chown(sticky / "nobody", 65534, 65534)
    os.chmod(sticky / "nobody", 0o644)

    links = root / "links"
    links.mkdir()
    os.symlink("../bin/tool", links / "rel")
    os.symlink("/etc/hostname", links / "abs")
    os.symlink("does/not/exist", links / "dangling")
    os.lchown(links / "rel", 1234, 5678)

    (root / "empty").write_bytes(b"")
    os.chmod(root / "empty", 0o444)
    (root / "big.bin").write_bytes(os.urandom(300_000))
    os.mkfifo(root / "fifo", 0o640)

    xdir = root / "xattr"
    xdir.mkdir()
    (xdir / "f").write_text("with attributes\n")
    (xdir / "g").write_text("with many attributes\n")
    try:
        os.setxattr(xdir / "f", "user.comment", b"hello")
        os.setxattr(xdir / "f", "user.binary", bytes(range(256)))
        for i in range(12):  # ext4 keeps one inode's attributes in one 4 KiB block
            os.setxattr(xdir / "g", f"user.k{i}", os.urandom(i * 20))
        os.setxattr(xdir, "user.dir", b"on a directory")
    except OSError as e:
        if e.errno != errno.EOPNOTSUPP:
            raise
        pytest.skip(f"the host filesystem has no user xattrs: {e}")

    adir = root / "acl"
    adir.mkdir()
    (adir / "extended").write_text("acl\n")
    os.chmod(adir / "extended", 0o640)
    dflt = adir / "defaults"
    dflt.mkdir()
    try:
        os.setxattr(
            adir / "extended",
            ACCESS,
            acl_value((USER_OBJ, 6, UNDEF), (USER, 6, 1234), (GROUP_OBJ, 4, UNDEF),
                      (GROUP, 5, 100), (MASK, 7, UNDEF), (OTHER, 0, UNDEF)),
        )
        os.setxattr(
            dflt,
            DEFAULT,
            acl_value((USER_OBJ, 7, UNDEF), (USER, 5, 1234), (GROUP_OBJ, 5, UNDEF),
                      (MASK, 7, UNDEF), (OTHER, 0, UNDEF)),
        )
    except OSError as e:
        if e.errno != errno.EOPNOTSUPP:
            raise
        pytest.skip(f"the host filesystem has no POSIX ACLs: {e}")
    (dflt / "inherited").write_text("inherits the default ACL\n")
    (dflt / "subdir").mkdir()

    # Times last, deepest first (creating an entry changes its directory's mtime).
    entries = sorted(walk(root), key=lambda p: -len(p.parts))
    for i, path in enumerate(entries):
        ns = 1_500_000_000_000_000_000 + i * 86_400_123_456_789 + 987_654_321
        os.utime(path, ns=(ns - 5, ns), follow_symlinks=False)


def walk(root: Path) -> list[Path]:
    out = [root]
    for dirpath, dirnames, filenames in os.walk(root):
        out += [Path(dirpath) / n for n in dirnames + filenames]
    return out


def _xattr(path: Path, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.EOPNOTSUPP):
            return None
        raise


def snapshot(root: Path) -> dict[str, dict[str, Any]]:
    """Everything about every entry that a faithful copy keeps (not atime/ctime/ino)."""
    out: dict[str, dict[str, Any]] = {}
    groups: dict[int, list[str]] = {}
    for path in walk(root):
        rel = str(path.relative_to(root))
        st = os.lstat(path)
        rec: dict[str, Any] = {
            "mode": oct(st.st_mode),
            "uid": st.st_uid,
            "gid": st.st_gid,
            "mtime_ns": st.st_mtime_ns,
        }
        if stat.S_ISLNK(st.st_mode):
            rec["target"] = os.readlink(path)
        else:
            rec["user_xattrs"] = {
                n: os.getxattr(path, n) for n in sorted(os.listxattr(path)) if n.startswith("user.")
            }
            rec["acl_access"] = _xattr(path, ACCESS)
            rec["acl_default"] = _xattr(path, DEFAULT)
        if stat.S_ISREG(st.st_mode):
            rec["size"] = st.st_size
            rec["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
            groups.setdefault(st.st_ino, []).append(rel)
        out[rel] = rec
    for names in groups.values():
        for name in names:
            out[name]["links"] = sorted(names)
    return out


def assert_same_tree(source: Path, copy: Path) -> None:
    want, got = snapshot(source), snapshot(copy)
    assert sorted(got) == sorted(want)
    diffs = [
        f"{rel}: {key} {want[rel][key]!r} != {got[rel].get(key)!r}"
        for rel in sorted(want)
        for key in want[rel]
        if want[rel][key] != got[rel].get(key)
    ]
    assert not diffs, "\n".join(diffs[:40])


def sh(*cmd: str | Path, cwd: Path | None = None, umask: int | None = None) -> str:
    def pre() -> None:
        if umask is not None:
            os.umask(umask)

    r = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, check=False,
        preexec_fn=pre if umask is not None else None,
    )
    assert r.returncode == 0, f"{cmd}: {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout


@pytest.fixture(name="source")
def source_fixture(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    build_tree(src)
    return src


# ---------------------------------------------------------------------- copies into the vault
@pytest.mark.fuse
def test_cp_a_keeps_modes_owners_ns_mtimes_links_xattrs_and_acls(
    source: Path, mdir: Path
) -> None:
    sh(require_tool("cp", "coreutils"), "-a", source, mdir / "copy")
    assert_same_tree(source, mdir / "copy")


@pytest.mark.fuse
def test_cp_a_of_a_system_doc_dir_keeps_755_dirs_and_644_files(mdir: Path) -> None:
    """The reported case: cp sets system.posix_acl_access, which must set the mode."""
    doc = Path("/usr/share/doc/bash")
    if not doc.is_dir():
        pytest.skip("no /usr/share/doc/bash here")
    sh(require_tool("cp", "coreutils"), "-a", doc, mdir)
    assert_same_tree(doc, mdir / "bash")
    assert stat.S_IMODE(os.stat(mdir / "bash").st_mode) == stat.S_IMODE(os.stat(doc).st_mode)
    # An ACL that says no more than the mode is not kept (as on ext4): no "+" in ls -l.
    for path in walk(mdir / "bash"):
        assert _xattr(path, ACCESS) is None


@pytest.mark.fuse
def test_rsync_aAXH_keeps_every_attribute(source: Path, mdir: Path) -> None:
    rsync = require_tool("rsync", "rsync")
    sh(rsync, "-aAXH", f"{source}/", mdir / "copy")
    assert_same_tree(source, mdir / "copy")


@pytest.mark.fuse
def test_tar_with_xattrs_and_acls_round_trips_through_the_vault(
    source: Path, mdir: Path, tmp_path: Path
) -> None:
    tar = require_tool("tar", "tar")
    opts = ["--xattrs", "--xattrs-include=user.*", "--acls", "--numeric-owner"]
    (mdir / "copy").mkdir()
    packed = subprocess.run(
        [tar, *opts, "-cf", "-", "-C", str(source), "."], capture_output=True, check=True
    ).stdout
    subprocess.run(
        [tar, *opts, "-xpf", "-", "-C", str(mdir / "copy")], input=packed, check=True
    )
    assert_same_tree(source, mdir / "copy")
    # And back out of the vault: the archive made from the vault restores the same tree.
    back = tmp_path / "back"
    back.mkdir()
    repacked = subprocess.run(
        [tar, *opts, "-cf", "-", "-C", str(mdir / "copy"), "."], capture_output=True, check=True
    ).stdout
    subprocess.run([tar, *opts, "-xpf", "-", "-C", str(back)], input=repacked, check=True)
    assert_same_tree(source, back)


@pytest.mark.fuse
def test_metadata_survives_lock_and_remount(source: Path, tmp_path: Path) -> None:
    vault = make_vault(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mounted = run_process("mount", vault.container, mnt, *vault.pw())
    assert mounted.returncode == 0, mounted.stderr
    try:
        sh(require_tool("cp", "coreutils"), "-a", source, mnt / "copy")
        assert_same_tree(source, mnt / "copy")
        locked = run_process("lock", mnt)
        assert locked.returncode == 0, locked.stderr
        deadline = time.monotonic() + 20
        while os.path.ismount(mnt) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not os.path.ismount(mnt)
        again = run_process("mount", vault.container, mnt, *vault.pw())
        assert again.returncode == 0, again.stderr
        assert_same_tree(source, mnt / "copy")
    finally:
        if os.path.ismount(mnt):
            run_process("lock", mnt)


# ---------------------------------------------------------------------- ACL rules vs the kernel's
def acl_steps(base: Path, setfacl: str, getfacl: str) -> list[str]:
    """The same ACL operations anywhere; a transcript of modes, ACLs and stored names."""
    log: list[str] = []

    def record(label: str, *names: str) -> None:
        for name in names:
            p = base / name
            st = os.lstat(p)
            text = sh(getfacl, "-p", "-n", name, cwd=base)
            stored = sorted(n for n in os.listxattr(p) if n.startswith("system.posix_acl"))
            log.append(f"{label} {name} {oct(st.st_mode)} {st.st_uid}:{st.st_gid} {stored}\n{text}")

    sh("touch", base / "f", umask=0o022)
    record("created", "f")
    sh(setfacl, "-m", "u:1234:rwx,g:100:r", base / "f")
    record("extended", "f")
    os.chmod(base / "f", 0o640)
    record("chmod", "f")
    sh(setfacl, "-x", "u:1234", base / "f")
    record("named user removed", "f")
    sh(setfacl, "-b", base / "f")
    record("stripped", "f")
    sh(setfacl, "--set", "u::rw,g::r,o::r", base / "f")
    record("equivalent set", "f")
    sh(setfacl, "-m", "m::r", base / "f")
    record("mask only", "f")

    (base / "d").mkdir(mode=0o755)
    sh(setfacl, "-d", "-m", "u:1234:rx,g::rwx,o::-,g:100:rw", base / "d")
    record("default set", "d")
    sh("touch", base / "d" / "a", umask=0o077)
    sh("mkdir", base / "d" / "sub", umask=0o077)
    sh("mkfifo", "-m", "0620", base / "d" / "p", umask=0o077)
    fd = os.open(base / "d" / "b", os.O_CREAT | os.O_WRONLY, 0o600)
    os.close(fd)
    sh("touch", base / "d" / "sub" / "deep", umask=0o027)
    record("inherited", "d/a", "d/sub", "d/p", "d/b", "d/sub/deep")
    os.chmod(base / "d" / "sub", 0o750)
    record("chmod dir", "d/sub")
    sh(setfacl, "-k", base / "d")
    sh(setfacl, "-k", base / "d")  # removing an absent default ACL is no error
    sh("touch", base / "d" / "c", umask=0o077)
    sh("mkdir", base / "d" / "e", umask=0o002)
    record("default removed", "d", "d/c", "d/e")
    return log


@pytest.mark.fuse
def test_setfacl_getfacl_chmod_and_inheritance_match_the_kernels_own_acls(
    mdir: Path, tmp_path: Path
) -> None:
    setfacl = require_tool("setfacl", "acl")
    getfacl = require_tool("getfacl", "acl")
    host = tmp_path / "host"
    host.mkdir()
    try:
        os.setxattr(host, DEFAULT, acl_value(*base_acl(7, 5, 5)))
        os.removexattr(host, DEFAULT)
    except OSError as e:
        pytest.skip(f"the host filesystem has no POSIX ACLs: {e}")
    want = acl_steps(host, setfacl, getfacl)
    got = acl_steps(mdir, setfacl, getfacl)
    for w, g in zip(want, got, strict=True):
        assert g == w


@pytest.mark.fuse
def test_acl_grants_access_the_mode_alone_would_not() -> None:
    """The kernel enforces the ACL (FUSE_POSIX_ACL): a named user gets in, others don't.
    Other users reach the mount only with allow_other, and only through a path they may
    traverse, hence a mount of its own under a world-searchable directory."""
    if os.geteuid() != 0:
        pytest.skip("needs root (to act as other users)")
    base = Path(tempfile.mkdtemp(prefix="kv-acl-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        with mounted(base, allow_other=True) as m:
            _check_acl_enforced(m.mountpoint)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _check_acl_enforced(mdir: Path) -> None:
    secret = mdir / "secret"
    secret.write_text("for uid 1234 only\n")
    os.chmod(secret, 0o600)
    os.chmod(mdir, 0o755)
    os.setxattr(
        secret,
        ACCESS,
        acl_value((USER_OBJ, 6, UNDEF), (USER, 4, 1234), (GROUP_OBJ, 0, UNDEF),
                  (MASK, 4, UNDEF), (OTHER, 0, UNDEF)),
    )
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o640  # group bits = mask

    def read_as(uid: int) -> int:
        r = subprocess.run(
            ["cat", str(secret)], capture_output=True, check=False, user=uid, group=uid
        )
        return r.returncode

    assert read_as(1234) == 0
    assert read_as(4321) != 0


# ---------------------------------------------------------------------- the filesystem layer
@pytest.fixture(name="fs")
def fs_fixture(tmp_path: Path) -> Iterator[Filesystem]:
    store = new_store(tmp_path / "c.kv")
    fs = Filesystem.mkfs(store, 0, 0)
    yield fs
    fs.close()
    close_store(store)


def _errno(fn: Any, *args: Any) -> int:
    try:
        fn(*args)
    except FsError as e:
        return e.errno or 0
    return 0


def test_malformed_acls_are_refused_and_leave_nothing_behind(fs: Filesystem) -> None:
    st, fh = fs.create(1, b"f", 0o644, os.O_WRONLY, 0, 0)
    fs.release(fh)
    ino = st.ino
    a = ACCESS.encode()
    good = base_acl(6, 4, 4)
    bad_values = [
        b"",  # no header
        b"\x02\x00\x00",  # short header
        acl_value(*good)[:-3],  # a partial entry
        acl_value((USER_OBJ, 6, UNDEF), (GROUP_OBJ, 4, UNDEF)),  # no OTHER
        acl_value((GROUP_OBJ, 4, UNDEF), (USER_OBJ, 6, UNDEF), (OTHER, 4, UNDEF)),  # order
        acl_value((USER_OBJ, 6, UNDEF), (USER_OBJ, 6, UNDEF), (GROUP_OBJ, 4, UNDEF),
                  (OTHER, 4, UNDEF)),  # two owners
        acl_value((USER_OBJ, 6, UNDEF), (USER, 6, 7), (GROUP_OBJ, 4, UNDEF),
                  (OTHER, 4, UNDEF)),  # named user without a mask
        acl_value((USER_OBJ, 6, UNDEF), (USER, 6, 7), (USER, 4, 7), (GROUP_OBJ, 4, UNDEF),
                  (MASK, 6, UNDEF), (OTHER, 4, UNDEF)),  # the same user twice
        acl_value((USER_OBJ, 6, UNDEF), (USER, 6, UNDEF), (GROUP_OBJ, 4, UNDEF),
                  (MASK, 6, UNDEF), (OTHER, 4, UNDEF)),  # named user without an id
        acl_value((USER_OBJ, 0o10, UNDEF), (GROUP_OBJ, 4, UNDEF), (OTHER, 4, UNDEF)),  # perm
        acl_value((USER_OBJ, 6, UNDEF), (0x40, 4, UNDEF), (OTHER, 4, UNDEF)),  # unknown tag
    ]
    for value in bad_values:
        assert _errno(fs.setxattr, ino, a, value) == errno.EINVAL, value.hex()
    assert _errno(fs.setxattr, ino, a, acl_value(*good, version=1)) == errno.EOPNOTSUPP
    # A default ACL belongs on directories only.
    assert _errno(fs.setxattr, ino, DEFAULT.encode(), acl_value(*good)) == errno.EACCES
    assert fs.listxattr(ino) == []
    assert stat.S_IMODE(fs.getattr(ino).mode) == 0o644


def test_equivalent_acl_sets_the_mode_and_is_not_stored(fs: Filesystem) -> None:
    st, fh = fs.create(1, b"f", 0o700, os.O_WRONLY, 0, 0, umask=0o022)
    fs.release(fh)
    assert stat.S_IMODE(st.mode) == 0o700
    fs.setxattr(st.ino, ACCESS.encode(), acl_value(*base_acl(6, 4, 4)))
    assert stat.S_IMODE(fs.getattr(st.ino).mode) == 0o644
    assert fs.listxattr(st.ino) == []
    # An extended ACL is kept; the group bits show its mask, chmod rewrites the mask.
    ext = acl_value((USER_OBJ, 6, UNDEF), (USER, 7, 1000), (GROUP_OBJ, 4, UNDEF),
                    (MASK, 7, UNDEF), (OTHER, 0, UNDEF))
    fs.setxattr(st.ino, ACCESS.encode(), ext)
    assert stat.S_IMODE(fs.getattr(st.ino).mode) == 0o670
    assert fs.getxattr(st.ino, ACCESS.encode()) == ext
    fs.chmod(st.ino, 0o640)
    assert fs.getxattr(st.ino, ACCESS.encode()) == acl_value(
        (USER_OBJ, 6, UNDEF), (USER, 7, 1000), (GROUP_OBJ, 4, UNDEF), (MASK, 4, UNDEF),
        (OTHER, 0, UNDEF))


def test_new_entries_take_the_default_acl_instead_of_the_umask(fs: Filesystem) -> None:
    d = fs.mkdir(1, b"d", 0o777, 0, 0, umask=0o022)
    assert stat.S_IMODE(d.mode) == 0o755
    default = acl_value((USER_OBJ, 7, UNDEF), (GROUP_OBJ, 5, UNDEF), (GROUP, 7, 100),
                        (MASK, 7, UNDEF), (OTHER, 0, UNDEF))
    fs.setxattr(d.ino, DEFAULT.encode(), default)
    st, fh = fs.create(d.ino, b"f", 0o664, os.O_WRONLY, 0, 0, umask=0o077)
    fs.release(fh)
    assert stat.S_IMODE(st.mode) == 0o660  # mask rw (rwx & 6), other 0; no umask
    assert fs.getxattr(st.ino, ACCESS.encode()) == acl_value(
        (USER_OBJ, 6, UNDEF), (GROUP_OBJ, 5, UNDEF), (GROUP, 7, 100), (MASK, 6, UNDEF),
        (OTHER, 0, UNDEF))
    assert _errno(fs.getxattr, st.ino, DEFAULT.encode()) == errno.ENODATA
    sub = fs.mkdir(d.ino, b"sub", 0o755, 0, 0, umask=0o077)
    assert stat.S_IMODE(sub.mode) == 0o750
    assert fs.getxattr(sub.ino, DEFAULT.encode()) == default
    plain = fs.mkdir(1, b"plain", 0o777, 0, 0, umask=0o027)
    assert stat.S_IMODE(plain.mode) == 0o750


def test_access_acl_set_by_a_non_member_clears_set_gid(fs: Filesystem) -> None:
    """As the kernel's posix_acl_update_mode: set-gid survives an ACL change only for a
    caller in the file's group (the FUSE layer does not negotiate the kernel's hint)."""
    st, fh = fs.create(1, b"f", 0o2770, os.O_WRONLY, 0, 50)
    fs.release(fh)
    ext = acl_value((USER_OBJ, 7, UNDEF), (USER, 7, 1000), (GROUP_OBJ, 7, UNDEF),
                    (MASK, 7, UNDEF), (OTHER, 0, UNDEF))
    fs.setxattr(st.ino, ACCESS.encode(), ext, caller_uid=1000, caller_groups=(1000, 50))
    assert stat.S_IMODE(fs.getattr(st.ino).mode) == 0o2770
    fs.setxattr(st.ino, ACCESS.encode(), ext, caller_uid=1000, caller_groups=(1000,))
    assert stat.S_IMODE(fs.getattr(st.ino).mode) == 0o770

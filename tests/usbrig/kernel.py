"""Fetch and prepare the Debian stock kernel the QEMU guest boots.

Only apt touches the network: ``apt-get download`` fetches the kernel package, which is
unpacked with ``dpkg-deb -x`` into a cache directory keyed by the kernel version, so
later runs (and parallel test processes) reuse it.
"""

from __future__ import annotations

import bz2
import contextlib
import fcntl
import json
import lzma
import os
import re
import shutil
import subprocess
import tempfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CACHE = Path("/var/tmp/kryptvault-usbrig")
META_PACKAGE = "linux-image-amd64"
_COMPLETE = ".complete"


class KernelError(RuntimeError):
    """The guest kernel could not be found, downloaded or prepared."""


@dataclass(frozen=True)
class GuestKernel:
    version: str  # the module directory name, e.g. "6.1.0-57-amd64"
    root: Path  # the unpacked package: boot/, lib/modules/<version>/
    bzimage: Path
    vmlinux: Path | None  # ELF image for a direct PVH boot, if it could be unpacked

    @property
    def modules_dir(self) -> Path:
        return self.root / "lib" / "modules" / self.version


def cache_dir() -> Path:
    return Path(os.environ.get("KRYPTVAULT_RIG_CACHE") or DEFAULT_CACHE)


def _apt_kernel_package() -> str | None:
    try:
        out = subprocess.run(
            ["apt-cache", "depends", META_PACKAGE],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
    except FileNotFoundError:
        return None
    m = re.search(r"Depends:\s*(linux-image-\S+)", out)
    return m.group(1) if m else None


APT_LISTS = Path("/var/lib/apt/lists")


def _lists_stamp() -> str:
    try:
        return str(APT_LISTS.stat().st_mtime_ns)
    except OSError:
        return ""


def resolve_package(base: Path | None = None) -> str:
    """The versioned kernel package ``linux-image-amd64`` currently points to.

    apt-cache takes 1-3 s on a busy machine, so the answer is remembered until the apt
    package lists change (``apt-get update`` renames files into the lists directory).
    """
    memo = (base or cache_dir()) / "resolved.json"
    stamp = _lists_stamp()
    try:
        saved = json.loads(memo.read_text())
        if stamp and saved.get("lists") == stamp and saved.get("package"):
            return str(saved["package"])
    except (OSError, ValueError):
        pass
    pkg = _resolve_with_apt()
    with contextlib.suppress(OSError):
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"lists": _lists_stamp(), "package": pkg}))
        tmp.rename(memo)
    return pkg


def _resolve_with_apt() -> str:
    pkg = _apt_kernel_package()
    if pkg is None:
        # Fresh containers often ship without package lists.
        _apt_update()
        pkg = _apt_kernel_package()
    if pkg is None:
        raise KernelError(f"apt-cache does not know {META_PACKAGE}; is this a Debian system?")
    return pkg


def _cached_versions(base: Path) -> list[str]:
    """Complete cached kernels, most recently prepared last."""
    if not base.is_dir():
        return []
    done = [p / _COMPLETE for p in base.iterdir() if (p / _COMPLETE).exists()]
    return [p.parent.name for p in sorted(done, key=lambda p: p.stat().st_mtime_ns)]


def _apt_update() -> None:
    subprocess.run(["apt-get", "update", "-qq"], check=False, capture_output=True)


def ensure_kernel(base: Path | None = None) -> GuestKernel:
    """Return the prepared guest kernel, downloading and unpacking it on first use.

    ``KRYPTVAULT_RIG_KERNEL=<version>`` pins a version instead of following
    ``linux-image-amd64``.
    """
    base = base or cache_dir()
    pinned = os.environ.get("KRYPTVAULT_RIG_KERNEL")
    if pinned:
        return _ensure_version(base, pinned)
    try:
        try:
            return _ensure_version(base, resolve_package(base).removeprefix("linux-image-"))
        except KernelError:
            # Stale lists can name a package the mirror no longer serves: refresh once.
            _apt_update()
            return _ensure_version(base, resolve_package(base).removeprefix("linux-image-"))
    except KernelError as e:
        # Offline or no apt: an earlier run's kernel is still a fine guest kernel.
        cached = _cached_versions(base)
        if not cached:
            raise
        warnings.warn(f"using cached guest kernel {cached[-1]}: {e}", stacklevel=2)
        return _load(cached[-1], base / cached[-1])


def _ensure_version(base: Path, version: str) -> GuestKernel:
    target = base / version
    if not (target / _COMPLETE).exists():
        base.mkdir(parents=True, exist_ok=True)
        # Parallel test processes may race for the first download; one builds, the rest wait.
        with open(base / f"{version}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (target / _COMPLETE).exists():
                _build(base, version, target)
    return _load(version, target)


def _load(version: str, target: Path) -> GuestKernel:
    root = target / "root"
    bzimage = root / "boot" / f"vmlinuz-{version}"
    vmlinux = target / "vmlinux"
    return GuestKernel(
        version=version,
        root=root,
        bzimage=bzimage,
        vmlinux=vmlinux if vmlinux.exists() else None,
    )


def _build(base: Path, version: str, target: Path) -> None:
    if target.exists():
        shutil.rmtree(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=base))
    try:
        pkg = f"linux-image-{version}"
        subprocess.run(
            # apt's sandbox user cannot write into a root-owned temp dir; we are the sandbox.
            ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", pkg],
            cwd=staging,
            check=True,
            capture_output=True,
            text=True,
        )
        debs = list(staging.glob(f"{pkg}_*.deb"))
        if len(debs) != 1:
            raise KernelError(f"apt-get download {pkg} produced {debs}")
        root = staging / "root"
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(root)], check=True)
        debs[0].unlink()
        # The package lists modules under lib/; newer layouts use usr/lib/.
        moddir = root / "lib" / "modules" / version
        if not moddir.is_dir() and (root / "usr" / "lib" / "modules" / version).is_dir():
            (root / "lib").mkdir(exist_ok=True)
            (root / "usr" / "lib" / "modules").rename(root / "lib" / "modules")
        subprocess.run(["depmod", "-b", str(root), version], check=True)
        bzimage = root / "boot" / f"vmlinuz-{version}"
        try:
            (staging / "vmlinux").write_bytes(extract_vmlinux(bzimage.read_bytes()))
        except KernelError:
            pass  # the rig falls back to booting the bzImage through SeaBIOS
        (staging / _COMPLETE).write_text(version + "\n")
        staging.rename(target)
    except subprocess.CalledProcessError as e:
        raise KernelError(f"{e.cmd} failed: {e.stderr or e}") from e
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _decompressors() -> list[tuple[bytes, str]]:
    return [
        (b"\x1f\x8b\x08", "gzip"),
        (b"\xfd7zXZ\x00", "xz"),
        (b"BZh", "bzip2"),
        (b"\x5d\x00\x00", "lzma"),
        (b"\x28\xb5\x2f\xfd", "zstd"),
    ]


def _decompress(kind: str, data: bytes) -> bytes:
    if kind == "gzip":
        # The kernel appends the uncompressed size after the stream; zlib ignores trailing bytes.
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)
    if kind == "xz":
        return lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(data)
    if kind == "lzma":
        return lzma.LZMADecompressor(lzma.FORMAT_ALONE).decompress(data)
    if kind == "bzip2":
        return bz2.BZ2Decompressor().decompress(data)
    if kind == "zstd" and shutil.which("zstd"):
        return subprocess.run(["zstd", "-dcq"], input=data, capture_output=True, check=False).stdout
    raise KernelError(f"cannot decompress a {kind} kernel payload")


def extract_vmlinux(bzimage: bytes) -> bytes:
    """Unpack the ELF kernel from a bzImage, like the kernel's scripts/extract-vmlinux.

    The boot protocol header says exactly where the compressed payload sits; scanning for
    compressor magic (what extract-vmlinux does) is only the fallback for odd images.
    """
    candidates: list[int] = []
    if bzimage[0x202:0x206] == b"HdrS" and len(bzimage) > 0x250:
        setup_sects = bzimage[0x1F1] or 4
        payload_offset = int.from_bytes(bzimage[0x248:0x24C], "little")
        candidates.append((setup_sects + 1) * 512 + payload_offset)
    for magic, _ in _decompressors():
        pos = bzimage.find(magic)
        while pos != -1 and len(candidates) < 64:
            candidates.append(pos)
            pos = bzimage.find(magic, pos + 1)
    for pos in candidates:
        for magic, kind in _decompressors():
            if not bzimage.startswith(magic, pos):
                continue
            try:
                out = _decompress(kind, bzimage[pos:])
            except (OSError, EOFError, lzma.LZMAError, zlib.error, ValueError, KernelError):
                continue
            if out[:4] == b"\x7fELF":
                return out
    raise KernelError("no ELF kernel found in the bzImage payload")

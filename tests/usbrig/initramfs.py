"""Build the guest's tiny initramfs: static busybox, a few modules and the init script.

Written as a ``newc`` cpio in pure Python so no cpio tool (or root, for the device
nodes) is needed on the host.
"""

from __future__ import annotations

import gzip
import io
import lzma
import shlex
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path

from .kernel import GuestKernel

# Stage 1 needs virtio/9p/overlay to reach the root filesystem. The USB, SCSI, vfat and
# fuse modules are loaded there too: insmod from the in-RAM initramfs is much cheaper under
# TCG than kmod reading its indexes over 9p, and the stick enumerates while the rest of
# the boot goes on. xhci_pci comes last so its drivers are ready when the stick shows up.
STAGE1_MODULES = (
    "virtio_pci",
    "9pnet_virtio",
    "9p",
    "overlay",
    "fuse",
    "sd_mod",
    "usb_storage",
    "vfat",
    "nls_cp437",
    "nls_iso8859_1",
    "xhci_pci",
)
# busybox insmod ignores module options on the kernel command line (kmod reads those).
MODULE_PARAMS = {"usb_storage": "delay_use=0"}  # it waits 1 s before scanning otherwise
BUSYBOX_CANDIDATES = (Path("/bin/busybox"), Path("/usr/bin/busybox"))
BUSYBOX_APPLETS = (
    "sh",
    "mount",
    "mkdir",
    "insmod",
    "switch_root",
    "ln",
    "mkfifo",
    "ip",
    "stty",
)


class InitramfsError(RuntimeError):
    pass


class CpioWriter:
    """A minimal writer for the kernel's ``newc`` initramfs format."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._ino = 1
        self._dirs: set[str] = {""}

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        name_b = name.encode() + b"\0"
        fields = (
            self._ino,
            mode,
            0,
            0,
            1,
            0,
            len(data),
            0,
            0,
            rdev[0],
            rdev[1],
            len(name_b),
            0,
        )
        self._ino += 1
        self._buf.write(b"070701" + b"".join(b"%08X" % f for f in fields) + name_b)
        self._pad()
        self._buf.write(data)
        self._pad()

    def _pad(self) -> None:
        self._buf.write(b"\0" * (-self._buf.tell() % 4))

    def directory(self, name: str, perm: int = 0o755) -> None:
        name = name.strip("/")
        if name in self._dirs:
            return
        parent = name.rpartition("/")[0]
        self.directory(parent)
        self._dirs.add(name)
        self._entry(name, stat.S_IFDIR | perm)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        name = name.strip("/")
        self.directory(name.rpartition("/")[0])
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        name = name.strip("/")
        self.directory(name.rpartition("/")[0])
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        name = name.strip("/")
        self.directory(name.rpartition("/")[0])
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self._buf.getvalue()


def _modname(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    for ext in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if base.endswith(ext):
            base = base[: -len(ext)]
            break
    return base.replace("-", "_")


def module_load_order(modules_dir: Path, wanted: Iterable[str]) -> list[Path]:
    """Module files for ``wanted`` and their dependencies, each after what it needs.

    Names that modules.dep does not list but modules.builtin does are compiled in and
    need nothing; anything else is an error rather than a guest that cannot boot.
    """
    deps: dict[str, tuple[str, list[str]]] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[_modname(mod)] = (mod, rest.split())
    builtin_file = modules_dir / "modules.builtin"
    builtin = (
        {_modname(x) for x in builtin_file.read_text().split()} if builtin_file.exists() else set()
    )
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        if name not in deps:
            if name in builtin:
                return
            raise InitramfsError(f"module {name} is neither in modules.dep nor built in")
        path, needs = deps[name]
        for dep in needs:
            visit(_modname(dep))
        order.append(modules_dir / path)

    for name in wanted:
        visit(name.replace("-", "_"))
    return order


def _module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    # busybox insmod takes plain ELF only; unpack what newer kernels compress.
    if path.name.endswith(".xz"):
        data = lzma.decompress(data)
    elif path.name.endswith(".gz"):
        data = gzip.decompress(data)
    elif path.name.endswith(".zst"):
        raise InitramfsError(f"zstd-compressed module {path} is not supported")
    return data


def _is_static_elf(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(65536)
    if head[:4] != b"\x7fELF" or head[4] != 2:  # 64-bit ELF only
        return False
    phoff = int.from_bytes(head[0x20:0x28], "little")
    phentsize = int.from_bytes(head[0x36:0x38], "little")
    phnum = int.from_bytes(head[0x38:0x3A], "little")
    for i in range(phnum):
        off = phoff + i * phentsize
        if int.from_bytes(head[off : off + 4], "little") == 3:  # PT_INTERP: needs ld.so
            return False
    return True


def find_static_busybox() -> Path:
    # A dynamic busybox would need its libc inside the initramfs; insist on the static
    # one (Debian's busybox-static) instead of guessing at libraries.
    for cand in BUSYBOX_CANDIDATES:
        if cand.is_file() and _is_static_elf(cand):
            return cand
    raise InitramfsError("a static busybox is needed (apt-get install busybox-static)")


def build_initramfs(
    kernel: GuestKernel,
    init_script: Path,
    config: Mapping[str, str],
    out: Path,
    compress: bool = True,
) -> Path:
    """Write the initramfs to ``out``; ``config`` becomes shell variables for the init."""
    cpio = CpioWriter()
    for d in ("dev", "proc", "sys", "lower", "rw", "newroot", "keep", "etc"):
        cpio.directory(d)
    # The kernel opens /dev/console for init's stdio before anything can mount devtmpfs.
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3, 0o666)
    busybox = find_static_busybox()
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in BUSYBOX_APPLETS:
        cpio.symlink(f"bin/{applet}", "busybox")
    names: list[str] = []
    for mod in module_load_order(kernel.modules_dir, STAGE1_MODULES):
        name = _modname(mod.name)
        cpio.file(f"lib/modules/{name}.ko", _module_bytes(mod))
        names.append(f"{name} {MODULE_PARAMS.get(name, '')}".rstrip())
    cpio.file("etc/kvrig-modules", ("\n".join(names) + "\n").encode())
    conf = "".join(f"{k}={shlex.quote(v)}\nexport {k}\n" for k, v in config.items())
    cpio.file("etc/kvrig.conf", conf.encode())
    cpio.file("init", init_script.read_bytes(), 0o755)
    data = cpio.finish()
    # Level 1: gzip -9 saves a few percent of size and costs 5x the host time.
    out.write_bytes(gzip.compress(data, compresslevel=1, mtime=0) if compress else data)
    return out

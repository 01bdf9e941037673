"""The FUSE adapter: the kernel protocol on /dev/fuse, serving a kryptvault Filesystem."""

from kryptvault.fuseadapter.mount import serve
from kryptvault.fuseadapter.server import FuseServer

__all__ = ["FuseServer", "serve"]

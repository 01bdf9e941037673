"""The mfusepy (libfuse3) adapter that mounts a kryptvault Filesystem."""

from kryptvault.fuseadapter.mount import serve
from kryptvault.fuseadapter.operations import KryptvaultOperations

__all__ = ["KryptvaultOperations", "serve"]

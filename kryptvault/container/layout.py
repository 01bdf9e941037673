"""Where each structure lives in the container file (docs/FORMAT.md, section 1)."""

from __future__ import annotations

from dataclasses import dataclass

MAGIC = b"KRYPTVLT"
FORMAT_VERSION = 1
CIPHER_SUITE_AES256GCM_HKDF_ARGON2ID = 1

HEADER_COPY_SIZE = 16 * 1024
HEADER_OFFSETS = (0, HEADER_COPY_SIZE)
COMMIT_SLOT_SIZE = 4096
COMMIT_OFFSETS = (2 * HEADER_COPY_SIZE, 2 * HEADER_COPY_SIZE + COMMIT_SLOT_SIZE)
DATA_AREA_OFFSET = 64 * 1024

DEFAULT_BLOCK_SIZE = 64 * 1024
ALLOCATION_UNIT = 4096
MIN_BLOCK_SIZE_LOG2 = 12
MAX_BLOCK_SIZE_LOG2 = 20


@dataclass(frozen=True)
class Layout:
    """The geometry every layer agrees on once the header has been read."""

    block_size: int = DEFAULT_BLOCK_SIZE
    unit_size: int = ALLOCATION_UNIT
    data_offset: int = DATA_AREA_OFFSET

    def __post_init__(self) -> None:
        if self.block_size & (self.block_size - 1) or not (
            1 << MIN_BLOCK_SIZE_LOG2 <= self.block_size <= 1 << MAX_BLOCK_SIZE_LOG2
        ):
            raise ValueError(f"block size {self.block_size} is not a power of two in 4 KiB..1 MiB")
        if self.block_size % self.unit_size:
            raise ValueError("block size must be a multiple of the allocation unit")

    def unit_offset(self, unit: int) -> int:
        return self.data_offset + unit * self.unit_size

"""Argon2id cost parameters as a container records them, and their sane bounds.

Apart from kryptvault/crypto/kdf.py so that code which only reads containers (the mount
daemon, fsck, verify) does not load libargon2: every module a daemon imports is memory
its exit must tear down, inside the lock's time budget.
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_MEMORY_KIB = 8 * 1024
MAX_MEMORY_KIB = 4 * 1024 * 1024
MAX_TIME_COST = 1000
MAX_PARALLELISM = 16


@dataclass(frozen=True)
class Argon2Params:
    time_cost: int
    memory_kib: int
    parallelism: int

    def validate(self) -> None:
        """Reject parameters read from a container before they can exhaust the machine."""
        if not 1 <= self.time_cost <= MAX_TIME_COST:
            raise ValueError(f"Argon2 time cost {self.time_cost} out of range")
        if not MIN_MEMORY_KIB <= self.memory_kib <= MAX_MEMORY_KIB:
            raise ValueError(f"Argon2 memory {self.memory_kib} KiB out of range")
        if not 1 <= self.parallelism <= MAX_PARALLELISM:
            raise ValueError(f"Argon2 parallelism {self.parallelism} out of range")

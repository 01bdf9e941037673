"""Free-space map of the data area, rebuilt at every open (never stored on disk).

One byte per allocation unit:
  FREE      0  may be handed out
  USED      1  referenced by the last durable commit (or freed, awaiting its release)
  FRESH     2  allocated by the running transaction; nothing durable references it
  RESERVED  3  a group descriptor; never handed out
"""

from __future__ import annotations

FREE, USED, FRESH, RESERVED = 0, 1, 2, 3
_FRESH_TO_USED = bytes.maketrans(b"\x02", b"\x01")


class UnitMap:
    __slots__ = (
        "_fill",
        "_zeros",
        "cursor",
        "descriptor_units",
        "free_units",
        "fresh",
        "held",
        "holds",
        "map",
        "pending",
        "units_per_group",
    )

    def __init__(self, units_per_group: int, descriptor_units: int) -> None:
        self.map = bytearray()
        self.units_per_group = units_per_group
        self.descriptor_units = descriptor_units
        self.cursor = 0
        # FREE units, kept current so that the space check before every write is O(1).
        self.free_units = 0
        self.fresh: list[tuple[int, int]] = []  # runs allocated in the running transaction
        self.pending: list[tuple[int, int]] = []  # durable runs freed in the running transaction
        self.held: list[tuple[int, int]] = []  # released while a backup hold was active
        self.holds = 0
        self._zeros = [bytes(n) for n in range(257)]
        self._fill = [bytes([FRESH]) * n for n in range(257)]

    @property
    def total(self) -> int:
        return len(self.map)

    def is_descriptor(self, unit: int, units: int) -> bool:
        """True if [unit, unit+units) overlaps a descriptor or crosses a group boundary."""
        pos = unit % self.units_per_group
        return pos < self.descriptor_units or pos + units > self.units_per_group

    def resize(self, total: int) -> list[int]:
        """Grow to `total` units; reserve descriptor units; return the groups newly begun."""
        old = len(self.map)
        if total <= old:
            return []
        self.map.extend(bytes(total - old))
        self.free_units += total - old
        upg, desc = self.units_per_group, self.descriptor_units
        first_group = old // upg
        new_groups = []
        for group in range(first_group, (total - 1) // upg + 1):
            start = group * upg
            end = min(start + desc, total)
            if end > start:
                lo = max(start, old)
                self.free_units -= self.map.count(0, lo, max(end, lo))
                self.map[start:end] = bytes([RESERVED]) * (end - start)
            if start >= old:
                new_groups.append(group)
        return new_groups

    def alloc(self, n: int) -> int:
        """First fit from the cursor (next fit), then from the start; -1 if no run fits."""
        pat = self._zeros[n]
        m = self.map
        unit = m.find(pat, self.cursor)
        if unit < 0:
            unit = m.find(pat, 0, self.cursor + n - 1)
            if unit < 0:
                return -1
        m[unit : unit + n] = self._fill[n]
        self.free_units -= n
        self.fresh.append((unit, n))
        self.cursor = unit + n
        return unit

    def take(self, unit: int, n: int) -> None:
        """Allocate the given free run (a metadata block's second copy, placed by the store)."""
        m = self.map
        if m.count(0, unit, unit + n) != n:
            raise RuntimeError(f"take of units {unit}+{n}, which are not free")
        m[unit : unit + n] = self._fill[n]
        self.free_units -= n
        self.fresh.append((unit, n))

    def free(self, unit: int, n: int) -> None:
        state = self.map[unit]
        if state == FRESH:
            self.map[unit : unit + n] = self._zeros[n]
            self.free_units += n
        elif state == USED:
            self.pending.append((unit, n))
        else:
            raise RuntimeError(f"free of unit {unit} in state {state}")

    def mark_used(self, unit: int, n: int) -> bool:
        """Mark a run referenced by the durable commit; False if any unit was already taken."""
        m = self.map
        zeros = m.count(0, unit, unit + n)
        clash = zeros != n
        self.free_units -= zeros
        m[unit : unit + n] = b"\x01" * n
        return not clash

    def commit_done(self) -> None:
        """The transaction's commit is durable: its units become USED, its frees FREE."""
        m = self.map
        for unit, n in self.fresh:
            m[unit : unit + n] = m[unit : unit + n].translate(_FRESH_TO_USED)
        self.fresh.clear()
        if self.holds:
            self.held.extend(self.pending)
        else:
            for unit, n in self.pending:
                self.free_units += n - m.count(0, unit, unit + n)
                m[unit : unit + n] = self._zeros[n]
        self.pending.clear()

    def hold(self) -> None:
        self.holds += 1

    def release(self) -> None:
        if self.holds == 0:
            raise RuntimeError("release_reuse() without hold_reuse()")
        self.holds -= 1
        if self.holds == 0:
            for unit, n in self.held:
                self.free_units += n - self.map.count(0, unit, unit + n)
                self.map[unit : unit + n] = self._zeros[n]
            self.held.clear()

    def free_count(self) -> int:
        return self.free_units

"""Two mount daemons of one vault (the vault and a fork beside it) raise the records of
their own lineages in one record file at the same time: no update may be lost, i.e. no
record may ever be seen to fall (docs/TOKEN.md "Rollback records")."""

from __future__ import annotations

import multiprocessing
import uuid
from pathlib import Path

from kryptvault.token.records import RecordsDamaged, advance_records, read_records

VAULT = uuid.UUID("5b1c3f4e-0d2a-4c8e-9a71-2b5d0e9f4c13")
ROUNDS = 300


def _raise_records(directory: str, lineage: bytes) -> None:
    for generation in range(1, ROUNDS + 1):
        advance_records(Path(directory), VAULT, lineage, generation)


def test_concurrent_advances_of_two_lineages_never_lower_a_record(tmp_path: Path) -> None:
    lineages = [bytes(16), bytes([7]) * 16]
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_raise_records, args=(str(tmp_path), x)) for x in lineages]
    for writer in writers:
        writer.start()
    seen = {x: 0 for x in lineages}
    fell: list[tuple[str, int, int]] = []
    while any(w.is_alive() for w in writers):
        try:
            records = read_records(tmp_path, VAULT)
        except RecordsDamaged:
            continue
        for lineage in lineages:
            now = records.get(lineage)
            if now < seen[lineage]:
                fell.append((lineage.hex()[:4], seen[lineage], now))
            seen[lineage] = max(seen[lineage], now)
    for writer in writers:
        writer.join()
        assert writer.exitcode == 0
    final = read_records(tmp_path, VAULT)
    assert [final.get(x) for x in lineages] == [ROUNDS, ROUNDS]
    assert fell == []

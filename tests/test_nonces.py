"""Nonces are never repeated: batched OS randomness, used once, and a fork child does not
reuse the parent's batch."""

from __future__ import annotations

import os

from kryptvault.crypto.aead import NONCE_LEN, new_nonce


def test_a_hundred_thousand_nonces_are_all_distinct_and_full_length() -> None:
    nonces = [new_nonce() for _ in range(100_000)]
    assert all(len(n) == NONCE_LEN for n in nonces)
    assert len(set(nonces)) == len(nonces)


def test_a_forked_child_never_gets_the_nonces_its_parent_gets_next() -> None:
    new_nonce()  # the parent now holds a partly used batch
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        os.close(read_end)
        os.write(write_end, b"".join(new_nonce() for _ in range(200)))
        os._exit(0)
    os.close(write_end)
    child = b""
    while chunk := os.read(read_end, 65536):
        child += chunk
    os.close(read_end)
    os.waitpid(pid, 0)
    parent = {new_nonce() for _ in range(200)}
    children = {child[i : i + NONCE_LEN] for i in range(0, len(child), NONCE_LEN)}
    assert len(children) == 200
    assert not parent & children

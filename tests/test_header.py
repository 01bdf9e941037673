"""The header: encoding round trips, choosing between the two copies, damage and tampering."""

from __future__ import annotations

import os
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kryptvault.container.header import (
    HEADER_COPY_SIZE,
    KIND_RECOVERY,
    KIND_TOKEN_PASSWORD,
    SLOT_COUNT,
    Header,
    Keyslot,
    decode_header,
    read_header,
)
from kryptvault.container.keyslots import (
    TokenFactor,
    authenticate_header,
    new_password_slot,
    unlock_with_password,
)
from kryptvault.container.layout import HEADER_OFFSETS, Layout
from kryptvault.container.vault import (
    create_container,
    read_container_header,
    replace_slot,
    write_header_copies,
)
from kryptvault.crypto.kdf_params import Argon2Params
from kryptvault.crypto.secret import Secret
from kryptvault.errors import AuthenticationError, FormatError, IntegrityError

FAST_KDF = Argon2Params(1, 8192, 1)
PASSWORD = b"a long enough test password"


def factor(secret: bytes = b"\x42" * 32, binding: bytes = b"") -> TokenFactor:
    return TokenFactor(Secret.from_bytes(secret), binding, b"dir")


def make_container(path: Path) -> Header:
    def first_slot(vault_uuid: uuid.UUID, master: Secret) -> Keyslot:
        with Secret.from_bytes(PASSWORD) as pw:
            return new_password_slot(vault_uuid, 0, master, pw, factor(), FAST_KDF, "primary")

    # The header layer alone: the data area stays empty (the store is another layer).
    return create_container(path, first_slot, lambda fd, header, keys: None)


def open_master(header: Header) -> Secret:
    with Secret.from_bytes(PASSWORD) as pw:
        master, _ = unlock_with_password(header, pw, factor())
    return master


keyslots = st.builds(
    Keyslot,
    kind=st.sampled_from([KIND_TOKEN_PASSWORD, KIND_RECOVERY]),
    created=st.integers(0, 2**63 - 1),
    kdf=st.builds(Argon2Params, st.integers(1, 1000), st.integers(8192, 2**22), st.integers(1, 16)),
    salt=st.binary(min_size=32, max_size=32),
    nonce=st.binary(min_size=12, max_size=12),
    wrapped_key=st.binary(min_size=48, max_size=48),
    token_identity=st.binary(max_size=200),
    label=st.text(max_size=16),
).map(
    lambda s: s if s.kind == KIND_TOKEN_PASSWORD else replace(s, kdf=None, salt=bytes(32), token_identity=b"")
)


@given(
    slots=st.lists(st.one_of(st.none(), keyslots), min_size=SLOT_COUNT, max_size=SLOT_COUNT),
    sequence=st.integers(0, 2**64 - 1),
    created=st.integers(0, 2**63),
    block_log2=st.integers(12, 20),
    mac=st.binary(min_size=32, max_size=32),
)
@settings(max_examples=150, deadline=None)
def test_every_header_decodes_to_what_was_encoded(
    slots: list[Keyslot | None], sequence: int, created: int, block_log2: int, mac: bytes
) -> None:
    header = Header(
        uuid.uuid4(), sequence, created, Layout(block_size=1 << block_log2), tuple(slots), mac=mac
    )
    raw = header.encode()
    assert len(raw) == HEADER_COPY_SIZE
    assert decode_header(raw) == header


def test_new_container_opens_and_its_header_authenticates(tmp_path: Path) -> None:
    path = tmp_path / "vault.kv"
    make_container(path)
    read = read_container_header(path)
    assert read.damaged == ()
    with open_master(read.header) as master:
        authenticate_header(read.header, master)


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def test_every_single_byte_flip_in_the_header_region_opens_via_the_other_copy(tmp_path: Path) -> None:
    """Flip each byte of both copies in turn: the reader must pick a good copy every time
    (one that is byte-identical to a copy written), and that copy must still unlock."""
    path = tmp_path / "vault.kv"
    make_container(path)
    pristine = path.read_bytes()
    good_copies = {pristine[o : o + HEADER_COPY_SIZE] for o in HEADER_OFFSETS}
    fd = os.open(path, os.O_RDWR)
    try:
        for offset in range(2 * HEADER_COPY_SIZE):
            os.pwrite(fd, bytes([pristine[offset] ^ 0x01]), offset)
            read = read_header(fd)
            assert read.header.encode() in good_copies
            assert read.damaged and read.damaged[0][0] == offset // HEADER_COPY_SIZE
            assert "damaged" in (read.damage_note() or "")
            if offset % 1024 == 0:  # the Argon2 unlock is the slow part: sample it
                with open_master(read.header) as master:
                    authenticate_header(read.header, master)
            os.pwrite(fd, pristine[offset : offset + 1], offset)
    finally:
        os.close(fd)


def test_both_copies_damaged_is_a_clean_error(tmp_path: Path) -> None:
    path = tmp_path / "vault.kv"
    make_container(path)
    _flip(path, 100)
    _flip(path, HEADER_COPY_SIZE + 100)
    with pytest.raises(FormatError, match="both header copies are damaged"):
        read_container_header(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "not a kryptvault container"),
        (b"hello world" * 5000, "not a kryptvault container"),
        (b"KRYPTVLT" + bytes(100), "truncated"),
    ],
)
def test_files_that_are_not_containers_are_refused_cleanly(
    tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "x"
    path.write_bytes(content)
    with pytest.raises(FormatError, match=message):
        read_container_header(path)


def test_truncated_container_inside_the_second_copy_opens_with_the_first(tmp_path: Path) -> None:
    path = tmp_path / "vault.kv"
    make_container(path)
    os.truncate(path, HEADER_COPY_SIZE + 10)
    read = read_container_header(path)
    assert read.copy_index == 0 and read.damaged


def test_unknown_format_version_is_named(tmp_path: Path) -> None:
    path = tmp_path / "vault.kv"
    header = make_container(path)
    future = replace(header, version=7)
    with open(path, "r+b") as f:
        for offset in HEADER_OFFSETS:
            f.seek(offset)
            f.write(future.encode())
    with pytest.raises(FormatError, match="unknown format version 7"):
        read_container_header(path)


def test_a_recomputed_checksum_does_not_hide_tampering_from_the_mac(tmp_path: Path) -> None:
    """An attacker can fix the SHA-256 but not the MAC: after unlocking, the change shows."""
    path = tmp_path / "vault.kv"
    header = make_container(path)
    forged = replace(header, sequence=header.sequence + 10, created=12345)
    with open(path, "r+b") as f:
        f.seek(HEADER_OFFSETS[0])
        f.write(forged.encode())  # keeps the old MAC, fresh checksum
    read = read_container_header(path)
    assert read.header.created == 12345
    with open_master(read.header) as master, pytest.raises(IntegrityError):
        authenticate_header(read.header, master)


def test_tampered_slot_parameters_break_the_unwrap(tmp_path: Path) -> None:
    path = tmp_path / "vault.kv"
    header = make_container(path)
    slot = header.slots[0]
    assert slot is not None
    weaker = replace(slot, kdf=Argon2Params(1, 8192, 2))
    with pytest.raises(AuthenticationError):
        open_master(replace_slot(header, 0, weaker))


def test_header_rewrite_replaces_both_copies_and_bumps_the_sequence(tmp_path: Path) -> None:
    path = tmp_path / "vault.kv"
    header = make_container(path)
    with open_master(header) as master:
        fd = os.open(path, os.O_RDWR)
        try:
            new = write_header_copies(fd, replace_slot(header, 0, header.slots[0]), master)
        finally:
            os.close(fd)
    assert new.sequence == header.sequence + 2
    raw = path.read_bytes()
    sequences = sorted(decode_header(raw[o : o + HEADER_COPY_SIZE]).sequence for o in HEADER_OFFSETS)
    assert sequences == [header.sequence + 1, header.sequence + 2]


def test_init_refuses_an_existing_file_and_leaves_it_untouched(tmp_path: Path) -> None:
    from kryptvault.errors import UsageError

    path = tmp_path / "precious"
    path.write_bytes(b"do not overwrite")
    with pytest.raises(UsageError, match="already exists"):
        make_container(path)
    assert path.read_bytes() == b"do not overwrite"


def test_failed_creation_leaves_no_partial_file(tmp_path: Path) -> None:
    path = tmp_path / "vault.kv"

    def failing_store(fd: int, header: Header, keys: object) -> None:
        raise OSError(28, "No space left on device")

    def first_slot(vault_uuid: uuid.UUID, master: Secret) -> Keyslot:
        with Secret.from_bytes(PASSWORD) as pw:
            return new_password_slot(vault_uuid, 0, master, pw, factor(), FAST_KDF)

    from kryptvault.errors import KryptvaultError

    with pytest.raises(KryptvaultError, match="no space left"):
        create_container(path, first_slot, failing_store)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- forged copies, through the CLI


def _forge_copy_a(
    container: Path, edits: dict[int, bytes] | None = None, raise_sequence: bool = True
) -> None:
    """A key-less edit of copy A done as FORMAT.md §2 lets anyone do it: raise its sequence
    (offset 32, u64 big-endian) above copy B's, apply `edits` (offset -> bytes), and
    recompute the checksum = SHA-256(bytes [0, 16352)) at offset 16352. The MAC stays."""
    import hashlib
    import struct

    raw = container.read_bytes()
    (seq_b,) = struct.unpack_from(">Q", raw, HEADER_OFFSETS[1] + 32)
    copy = bytearray(raw[HEADER_OFFSETS[0] : HEADER_OFFSETS[0] + HEADER_COPY_SIZE])
    if raise_sequence:
        struct.pack_into(">Q", copy, 32, seq_b + 2)
    for offset, data in (edits or {}).items():
        copy[offset : offset + len(data)] = data
    copy[16352:] = hashlib.sha256(copy[:16352]).digest()
    with open(container, "r+b") as f:
        f.seek(HEADER_OFFSETS[0])
        f.write(copy)
    read = read_container_header(container, allow_disagreement=True)
    assert read.copy_index == (0 if raise_sequence else 1) and not read.damaged  # both look valid


def test_a_forged_newest_header_copy_falls_back_to_the_intact_one_and_fsck_repairs_it(
    tmp_path: Path,
) -> None:
    from cli_helpers import make_vault, run_process

    vault = make_vault(tmp_path)
    _forge_copy_a(vault.container)

    # fsck without --repair: opens (through copy B), reports copy A, exits 1, changes nothing.
    before = vault.container.read_bytes()
    check = run_process("fsck", vault.container, *vault.pw())
    assert check.returncode == 1, check.stderr
    assert "copy A (failed authentication)" in check.stdout and "opened with copy B" in check.stdout
    assert vault.container.read_bytes() == before

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.path.exists("/dev/fuse"):
        mounted = run_process("mount", vault.container, mnt, *vault.pw())
        assert mounted.returncode == 0, mounted.stderr
        assert "copy A" in mounted.stderr  # warned, with the way out
        try:
            (mnt / "f").write_text("written through copy B's keys\n")
        finally:
            assert run_process("lock", mnt).returncode == 0

    repaired = run_process("fsck", "--repair", vault.container, *vault.pw())
    assert repaired.returncode == 1, repaired.stderr
    assert "rewrote both header copies from copy B" in repaired.stdout
    assert "after repair: clean" in repaired.stdout
    read = read_container_header(vault.container)
    assert not read.damaged and not read.others[0][1].sequence > read.header.sequence
    again = run_process("fsck", vault.container, *vault.pw())
    assert again.returncode == 0 and "clean" in again.stdout


@pytest.mark.parametrize("raise_sequence", [True, False], ids=["forged-copy-newest", "forged-copy-older"])
def test_an_edited_vault_uuid_in_one_copy_opens_through_the_other_and_fsck_repairs_it(
    tmp_path: Path, raise_sequence: bool
) -> None:
    """Copies naming different vaults are each tried on their own: the one that
    authenticates wins, the other is damage; key-less commands say the copies disagree."""
    from cli_helpers import assert_clean_error, make_vault, run_process

    vault = make_vault(tmp_path)
    forged = uuid.uuid4()
    _forge_copy_a(vault.container, {16: forged.bytes}, raise_sequence)

    info = run_process("info", vault.container)
    assert info.returncode == 0, info.stderr
    assert "the two header copies disagree about the vault" in info.stderr
    assert f"copy A says {forged}" in info.stderr and f"copy B says {vault.uuid}" in info.stderr
    dest = tmp_path / "dest"
    dest.mkdir()
    backup = run_process("backup", vault.container, dest)  # key-less: it cannot tell which is genuine
    assert backup.returncode == 1 and "disagree about the vault" in backup.stderr
    assert_clean_error(backup.stderr)
    assert list(dest.iterdir()) == []

    if os.path.exists("/dev/fuse"):
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        mounted = run_process("mount", vault.container, mnt, *vault.pw())
        assert mounted.returncode == 0, mounted.stderr
        assert f"copy A (names another vault, {forged})" in mounted.stderr
        try:
            (mnt / "f").write_text("kept\n")
        finally:
            assert run_process("lock", mnt).returncode == 0

    check = run_process("fsck", vault.container, *vault.pw())
    assert check.returncode == 1, check.stdout + check.stderr
    assert f"copy A (names another vault, {forged})" in check.stdout and "opened with copy B" in check.stdout
    repaired = run_process("fsck", "--repair", vault.container, *vault.pw())
    assert repaired.returncode == 1, repaired.stdout + repaired.stderr
    assert "rewrote both header copies from copy B" in repaired.stdout
    assert "after repair: clean" in repaired.stdout
    again = run_process("fsck", vault.container, *vault.pw())
    assert again.returncode == 0 and "clean" in again.stdout, again.stdout
    read = read_container_header(vault.container)  # strict: the copies agree again
    assert {str(h.vault_uuid) for _, h in read.copies()} == {vault.uuid}
    assert "disagree" not in run_process("info", vault.container).stderr


def test_a_forged_keyslot_in_the_newest_copy_falls_back_to_the_other_copy(tmp_path: Path) -> None:
    from cli_helpers import make_vault, run_process

    vault = make_vault(tmp_path)
    _forge_copy_a(vault.container, {64 + 76: bytes(48)})  # slot 0's wrapped key (§3.2)
    check = run_process("fsck", vault.container, *vault.pw())
    assert check.returncode == 1, check.stderr
    assert "copy A (no keyslot opens it)" in check.stdout
    repaired = run_process("fsck", "--repair", vault.container, *vault.pw())
    assert repaired.returncode == 1 and "after repair: clean" in repaired.stdout, repaired.stdout
    assert run_process("fsck", vault.container, *vault.pw()).returncode == 0


def test_non_zero_reserved_bytes_are_reported_and_zeroed_by_repair(tmp_path: Path) -> None:
    """FORMAT.md §1/§4.6: the commit slots' padding and the 24 KiB before the data area are zero."""
    from cli_helpers import make_vault, run_process

    from kryptvault.container.layout import COMMIT_OFFSETS, DATA_AREA_OFFSET

    vault = make_vault(tmp_path)
    with open(vault.container, "r+b") as f:
        f.seek(COMMIT_OFFSETS[1] + 4000)
        f.write(b"\x01")
        f.seek(DATA_AREA_OFFSET - 1)
        f.write(b"\xff")
    note = read_container_header(vault.container).damage_note() or ""
    assert "padding of commit slot 1 is not zero" in note and "reserved area" in note
    check = run_process("fsck", vault.container, *vault.pw())
    assert check.returncode == 1 and "padding of commit slot 1 is not zero" in check.stdout, check.stdout
    repaired = run_process("fsck", "--repair", vault.container, *vault.pw())
    assert repaired.returncode == 1 and "zeroed the padding of commit slot 1" in repaired.stdout
    assert "after repair: clean" in repaired.stdout, repaired.stdout
    assert read_container_header(vault.container).damage_note() is None
    assert run_process("fsck", vault.container, *vault.pw()).returncode == 0

"""The share file: byte-exact format, strict parsing, atomic writes, registrations."""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import uuid
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kryptvault.errors import TokenError
from kryptvault.token import (
    DirectoryToken,
    Share,
    create_share_dir,
    decode_share,
    encode_share,
    list_registrations,
    read_share_file,
    write_share_file,
)
from kryptvault.token.share import SHARE_SIZE, share_path

VAULT = uuid.UUID("12345678-9abc-def0-1234-56789abcdef0")
SECRET = bytes(range(32))


def make_share(generation: int = 7, vault: uuid.UUID = VAULT) -> Share:
    return Share(vault, bytearray(SECRET), generation)


def test_encoding_matches_the_documented_byte_layout() -> None:
    data = bytes(encode_share(make_share(generation=0x0102030405060708)))
    assert len(data) == 128
    assert data[0:8] == b"KVSHARE1"
    assert data[8:10] == b"\x00\x01"
    assert data[10:16] == bytes(6)
    assert data[16:32] == VAULT.bytes
    assert data[32:64] == SECRET
    assert data[64:72] == bytes([1, 2, 3, 4, 5, 6, 7, 8])
    assert data[72:96] == bytes(24)
    assert data[96:128] == hashlib.sha256(data[:96]).digest()


@given(
    vault=st.uuids(),
    secret=st.binary(min_size=32, max_size=32),
    generation=st.integers(0, 2**64 - 1),
)
def test_any_share_round_trips(vault: uuid.UUID, secret: bytes, generation: int) -> None:
    share = Share(vault, bytearray(secret), generation)
    back = decode_share(encode_share(share), vault)
    assert (back.vault_uuid, bytes(back.secret), back.generation) == (vault, secret, generation)
    assert isinstance(back.secret, bytearray)


def test_every_truncation_is_rejected_as_corrupted() -> None:
    data = bytes(encode_share(make_share()))
    for n in range(len(data)):
        with pytest.raises(TokenError, match="corrupted or truncated"):
            decode_share(data[:n], VAULT)
    with pytest.raises(TokenError, match="corrupted or truncated"):
        decode_share(data + b"\x00", VAULT)


def test_every_single_byte_flip_is_rejected_with_a_token_error() -> None:
    data = encode_share(make_share())
    for i in range(len(data)):
        for bit in (0x01, 0x80):
            bad = bytearray(data)
            bad[i] ^= bit
            with pytest.raises(TokenError):
                decode_share(bad, VAULT)


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise_anything_but_token_error(data: bytes) -> None:
    with pytest.raises(TokenError):
        decode_share(data, VAULT)


def _resealed(data: bytearray) -> bytearray:
    data[96:] = hashlib.sha256(bytes(data[:96])).digest()
    return data


def test_a_share_of_another_vault_is_refused_with_its_own_message() -> None:
    other = uuid.UUID(int=5)
    with pytest.raises(TokenError, match="belongs to another vault"):
        decode_share(encode_share(make_share(vault=other)), VAULT)


def test_an_unknown_version_is_reported_as_such() -> None:
    data = encode_share(make_share())
    struct.pack_into(">H", data, 8, 2)
    with pytest.raises(TokenError, match="format version 2"):
        decode_share(_resealed(data), VAULT)


def test_nonzero_reserved_fields_are_refused_even_with_a_valid_checksum() -> None:
    for offset in (10, 12, 80):
        data = encode_share(make_share())
        data[offset] = 1
        with pytest.raises(TokenError, match="reserved"):
            decode_share(_resealed(data), VAULT)


def test_the_secret_never_shows_in_repr_and_wipe_zeroes_it() -> None:
    share = make_share()
    assert SECRET.hex() not in repr(share)
    assert repr(list(SECRET)) not in repr(share)
    share.wipe()
    assert share.secret == bytearray(32)


def test_generated_shares_have_distinct_random_secrets() -> None:
    a, b = Share.generate(VAULT), Share.generate(VAULT)
    assert len(a.secret) == 32 and a.secret != b.secret and a.secret != bytearray(32)


def test_a_share_rejects_a_bad_secret_or_generation() -> None:
    with pytest.raises(TokenError):
        Share(VAULT, bytearray(31), 0)
    with pytest.raises(TokenError):
        Share(VAULT, bytes(32), 0)  # type: ignore[arg-type]
    with pytest.raises(TokenError):
        Share(VAULT, bytearray(32), 2**64)


def test_write_then_read_gives_the_share_back_with_mode_0600(tmp_path: Path) -> None:
    write_share_file(tmp_path, make_share())
    path = share_path(tmp_path, VAULT)
    assert path.name == "12345678-9abc-def0-1234-56789abcdef0.kvshare"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.stat().st_size == SHARE_SIZE
    back = read_share_file(tmp_path, VAULT)
    assert bytes(back.secret) == SECRET and back.generation == 7
    assert os.listdir(tmp_path) == [path.name]


def test_rewriting_replaces_the_file_and_leaves_no_temp_files(tmp_path: Path) -> None:
    write_share_file(tmp_path, make_share(generation=1))
    write_share_file(tmp_path, make_share(generation=2))
    assert read_share_file(tmp_path, VAULT).generation == 2
    assert os.listdir(tmp_path) == [f"{VAULT}.kvshare"]


def test_writing_into_a_missing_directory_says_so(tmp_path: Path) -> None:
    missing = tmp_path / "gone"
    with pytest.raises(TokenError, match=r"token directory .*gone does not exist"):
        write_share_file(missing, make_share())
    assert os.listdir(tmp_path) == []


def test_writing_where_a_file_stands_in_for_the_directory_fails_cleanly(tmp_path: Path) -> None:
    blocker = tmp_path / "token"
    blocker.write_bytes(b"not a directory")
    with pytest.raises(TokenError, match="not a directory"):
        write_share_file(blocker, make_share())
    assert os.listdir(tmp_path) == ["token"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_writing_into_a_read_only_directory_leaves_nothing_behind(tmp_path: Path) -> None:
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(TokenError, match="permission"):
            write_share_file(tmp_path, make_share())
        assert os.listdir(tmp_path) == []
    finally:
        tmp_path.chmod(0o700)


def test_a_failed_rewrite_keeps_the_old_complete_file(tmp_path: Path) -> None:
    write_share_file(tmp_path, make_share(generation=1))
    # A directory squatting on the final name makes the rename fail after the temp file
    # was fully written: the temp file must go, the old content must stay readable.
    target = share_path(tmp_path, uuid.UUID(int=9))
    target.mkdir()
    (target / "x").write_text("keep me non-empty")
    with pytest.raises(TokenError):
        write_share_file(tmp_path, make_share(vault=uuid.UUID(int=9)))
    assert sorted(os.listdir(tmp_path)) == sorted([f"{VAULT}.kvshare", target.name])
    assert read_share_file(tmp_path, VAULT).generation == 1


def test_reading_a_missing_share_names_the_vault(tmp_path: Path) -> None:
    with pytest.raises(TokenError, match=f"no share for vault {VAULT}"):
        read_share_file(tmp_path, VAULT)
    with pytest.raises(TokenError, match="does not exist"):
        read_share_file(tmp_path / "nope", VAULT)


def test_reading_a_damaged_or_oversized_file_is_a_token_error(tmp_path: Path) -> None:
    path = share_path(tmp_path, VAULT)
    path.write_bytes(bytes(encode_share(make_share())) + b"tail")
    with pytest.raises(TokenError, match="corrupted"):
        read_share_file(tmp_path, VAULT)
    path.write_bytes(b"KVSHARE1")
    with pytest.raises(TokenError, match="corrupted"):
        read_share_file(tmp_path, VAULT)


def test_a_symlink_in_place_of_the_share_file_is_not_followed(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    write_share_file(tmp_path, make_share())
    share_path(tmp_path, VAULT).rename(elsewhere)
    share_path(tmp_path, VAULT).symlink_to(elsewhere)
    with pytest.raises(TokenError):
        read_share_file(tmp_path, VAULT)


def test_create_share_dir_makes_a_private_directory_once(tmp_path: Path) -> None:
    share_dir = create_share_dir(tmp_path)
    assert share_dir == tmp_path / ".kryptvault"
    assert stat.S_IMODE(share_dir.stat().st_mode) == 0o700
    assert create_share_dir(tmp_path) == share_dir
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / ".kryptvault").write_text("x")
    with pytest.raises(TokenError, match="not a directory"):
        create_share_dir(tmp_path / "f")


def test_registrations_are_the_vaults_with_share_files_and_junk_is_ignored(
    tmp_path: Path,
) -> None:
    others = [uuid.UUID(int=3), uuid.UUID(int=1)]
    for vault in others:
        write_share_file(tmp_path, make_share(vault=vault))
    for junk in (
        f"{VAULT}.kvshare.tmp-0011223344556677",
        "notes.txt",
        f"{str(VAULT).upper()}.kvshare",
        f"{VAULT.hex}.kvshare",
        "copy of 00000000-0000-0000-0000-000000000002.kvshare",
    ):
        (tmp_path / junk).write_bytes(b"x")
    (tmp_path / f"{uuid.UUID(int=4)}.kvshare").mkdir()
    token = DirectoryToken(tmp_path)
    assert list_registrations(token) == sorted(others)


def test_a_directory_token_reads_and_writes_shares_in_the_directory_itself(
    tmp_path: Path,
) -> None:
    token = DirectoryToken(tmp_path)
    assert token.is_present()
    assert token.identity.kind == "dir" and token.identity.path == str(tmp_path)
    assert not token.has_share(VAULT)
    token.write_share(make_share())
    assert token.has_share(VAULT)
    assert (tmp_path / f"{VAULT}.kvshare").is_file()
    assert token.read_share(VAULT).generation == 7


def test_a_directory_token_must_exist_and_be_a_directory(tmp_path: Path) -> None:
    with pytest.raises(TokenError, match="does not exist"):
        DirectoryToken(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(TokenError, match="not a directory"):
        DirectoryToken(tmp_path / "file")


def test_a_removed_directory_is_no_longer_present_and_reads_fail_cleanly(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "token"
    folder.mkdir()
    token = DirectoryToken(folder)
    token.write_share(make_share())
    for child in folder.iterdir():
        child.unlink()
    folder.rmdir()
    assert not token.is_present()
    with pytest.raises(TokenError, match="not present"):
        token.read_share(VAULT)
    with pytest.raises(TokenError, match="not present"):
        token.write_share(make_share())

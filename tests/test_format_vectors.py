"""Known-answer vectors for the header and keyslots (tests/vectors/header_v1.json)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import spec_reader

from kryptvault.container.header import decode_header
from kryptvault.container.keyslots import TokenFactor, authenticate_header, unlock_with_password
from kryptvault.crypto.secret import Secret

VECTORS = json.loads((Path(__file__).parent / "vectors" / "header_v1.json").read_text())
INPUTS = VECTORS["inputs"]
EXPECTED = VECTORS["expected"]


def test_header_vector_matches_the_spec_computed_from_raw_primitives() -> None:
    raw = bytes.fromhex(EXPECTED["header_copy"])
    header = spec_reader.parse_header_copy(raw)
    assert header is not None
    assert header.uuid == uuid.UUID(INPUTS["vault_uuid"]).bytes
    (slot,) = header.slots
    assert slot.raw.hex() == EXPECTED["slot_bytes"]
    assert spec_reader.slot_aad(header.uuid, slot).hex() == EXPECTED["slot_aad"]
    kek = spec_reader.password_kek(
        header.uuid,
        slot,
        INPUTS["password_utf8"].encode(),
        bytes.fromhex(INPUTS["token_secret"]),
        INPUTS["token_binding"].encode(),
    )
    assert kek.hex() == EXPECTED["kek"]
    master = spec_reader.unwrap(header.uuid, slot, kek)
    assert master.hex() == INPUTS["master_key"]
    for purpose in ("header", "data", "meta"):
        assert spec_reader.subkey(master, purpose.encode(), header.uuid).hex() == EXPECTED[f"k_{purpose}"]
    assert spec_reader.header_mac_ok(header, master)


def test_our_code_opens_the_vector_header_with_the_vector_factors() -> None:
    header = decode_header(bytes.fromhex(EXPECTED["header_copy"]))
    assert header.sequence == INPUTS["header_sequence"]
    factor = TokenFactor(
        Secret.from_bytes(bytes.fromhex(INPUTS["token_secret"])),
        INPUTS["token_binding"].encode(),
        INPUTS["token_identity"].encode(),
    )
    with Secret.from_bytes(INPUTS["password_utf8"].encode()) as password:
        master, index = unlock_with_password(header, password, factor)
    with master, master.view() as view:
        assert view.hex() == INPUTS["master_key"]
        assert index == 0
        authenticate_header(header, master)


@pytest.mark.parametrize("field", ["token_secret", "token_binding", "password_utf8"])
def test_vector_header_does_not_open_when_one_factor_differs(field: str) -> None:
    from kryptvault.errors import AuthenticationError

    header = decode_header(bytes.fromhex(EXPECTED["header_copy"]))
    secret = bytearray.fromhex(INPUTS["token_secret"])
    binding = INPUTS["token_binding"].encode()
    password = INPUTS["password_utf8"].encode()
    if field == "token_secret":
        secret[0] ^= 1
    elif field == "token_binding":
        binding = b"usb-serial:TOKEN-9999"
    else:
        password += b"!"
    factor = TokenFactor(Secret.from_bytes(secret), binding, INPUTS["token_identity"].encode())
    with Secret.from_bytes(password) as pw, pytest.raises(AuthenticationError):
        unlock_with_password(header, pw, factor)

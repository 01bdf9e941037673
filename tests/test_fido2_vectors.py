"""Known answers for a FIDO2 keyslot (tests/vectors/fido2_slot_v1.json): the spec's
bytes computed from raw primitives, and our code agreeing with them."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import struct
import uuid
from pathlib import Path

import pytest
import spec_reader

from kryptvault.container.header import Keyslot
from kryptvault.container.keyslots import TokenFactor, unlock_with_password
from kryptvault.crypto.secret import Secret
from kryptvault.errors import AuthenticationError
from kryptvault.token.fido2key import Fido2Identity

VECTORS = json.loads((Path(__file__).parent / "vectors" / "fido2_slot_v1.json").read_text())
INPUTS = VECTORS["inputs"]
EXPECTED = VECTORS["expected"]
UUID = uuid.UUID(INPUTS["vault_uuid"])


def _spec_slot(raw: bytes, index: int) -> spec_reader.SpecSlot:
    t, m, p = struct.unpack(">III", raw[16:28])
    (id_len,) = struct.unpack(">H", raw[124:126])
    return spec_reader.SpecSlot(index, raw[1], t, m, p, raw[32:64], raw[64:76], raw[76:124],
                                raw[126 : 126 + id_len], raw)


def test_fido2_slot_vector_follows_the_spec_from_raw_primitives() -> None:
    cred = bytes.fromhex(INPUTS["credential_id"])
    salt = bytes.fromhex(INPUTS["hmac_salt"])
    flags = b"\x01" if INPUTS["uv_required"] else b"\x00"
    identity = b"fido2:" + base64.urlsafe_b64encode(flags + salt + cred).rstrip(b"=")
    assert identity.decode() == EXPECTED["identity_ascii"] == EXPECTED["binding_ascii"]
    output = hmac.new(bytes.fromhex(INPUTS["cred_random"]), salt, hashlib.sha256).digest()
    assert output.hex() == EXPECTED["hmac_secret_output"]
    raw = bytes.fromhex(EXPECTED["slot_bytes"])
    assert len(raw) == 512 and raw[0] == 1 and raw[1] == 1  # active, token+password
    slot = _spec_slot(raw, INPUTS["slot_index"])
    assert slot.identity == identity
    assert spec_reader.slot_aad(UUID.bytes, slot).hex() == EXPECTED["slot_aad"]
    kek = spec_reader.password_kek(UUID.bytes, slot, INPUTS["password_utf8"].encode(), output, identity)
    assert kek.hex() == EXPECTED["kek"]
    assert spec_reader.unwrap(UUID.bytes, slot, kek).hex() == INPUTS["master_key"]


def _header_with(slot: Keyslot) -> object:
    from kryptvault.container.header import SLOT_COUNT, Header
    from kryptvault.container.layout import Layout

    index = INPUTS["slot_index"]
    slots = tuple(slot if i == index else None for i in range(SLOT_COUNT))
    return Header(UUID, 0, 0, Layout(block_size=65536), slots)


def _factor(output: bytes, identity: bytes) -> TokenFactor:
    return TokenFactor(Secret.from_bytes(output), identity, identity)


def test_our_code_encodes_the_identity_and_opens_the_vector_slot() -> None:
    identity = Fido2Identity(bytes.fromhex(INPUTS["credential_id"]), bytes.fromhex(INPUTS["hmac_salt"]),
                             INPUTS["uv_required"])
    assert identity.encode().decode() == EXPECTED["identity_ascii"]
    assert identity.binding().decode() == EXPECTED["binding_ascii"]
    slot = Keyslot.decode(bytes.fromhex(EXPECTED["slot_bytes"]))
    assert slot is not None and Fido2Identity.decode(slot.token_identity) == identity
    header = _header_with(slot)
    output = bytes.fromhex(EXPECTED["hmac_secret_output"])
    with Secret.from_bytes(INPUTS["password_utf8"].encode()) as password:
        master, index = unlock_with_password(header, password, _factor(output, identity.encode()))  # type: ignore[arg-type]
    with master, master.view() as view:
        assert view.hex() == INPUTS["master_key"] and index == INPUTS["slot_index"]


@pytest.mark.parametrize("change", ["output", "policy", "credential"])
def test_vector_slot_does_not_open_with_another_key_output_policy_or_credential(change: str) -> None:
    slot = Keyslot.decode(bytes.fromhex(EXPECTED["slot_bytes"]))
    assert slot is not None
    header = _header_with(slot)
    output = bytearray.fromhex(EXPECTED["hmac_secret_output"])
    identity = Fido2Identity.decode(slot.token_identity)
    if change == "output":
        output[0] ^= 1  # another key, or the same key answering with UV when the slot has none
    elif change == "policy":
        identity = Fido2Identity(identity.credential_id, identity.salt, not identity.uv)
    else:
        identity = Fido2Identity(identity.credential_id[:-1] + b"\0", identity.salt, identity.uv)
    with Secret.from_bytes(INPUTS["password_utf8"].encode()) as pw, pytest.raises(AuthenticationError):
        unlock_with_password(header, pw, _factor(bytes(output), identity.encode()))  # type: ignore[arg-type]

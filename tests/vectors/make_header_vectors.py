"""Regenerates tests/vectors/header_v1.json from fixed inputs (run by hand, output committed).

The test suite checks the committed vectors against both our code and the raw primitives
following docs/FORMAT.md, so a format change cannot slip through unnoticed.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import replace
from pathlib import Path

from kryptvault.container.header import KIND_TOKEN_PASSWORD, SLOT_COUNT, Header, Keyslot
from kryptvault.container.keyslots import TokenFactor, derive_password_kek, seal_slot, sign_header, subkey
from kryptvault.container.layout import Layout
from kryptvault.crypto.kdf import argon2id
from kryptvault.crypto.kdf_params import Argon2Params
from kryptvault.crypto.secret import Secret

INPUTS = {
    "vault_uuid": "6f1c2a4e-9d3b-4c8e-8a71-2b5d0e9f4c13",
    "master_key": "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
    "password_utf8": "correct horse battery staple",
    "token_secret": "f0e1d2c3b4a5968778695a4b3c2d1e0f00112233445566778899aabbccddeeff",
    "token_binding": "usb-serial:TOKEN-1234",
    "token_identity": "usb:46f4:0001:TOKEN-1234",
    "slot_index": 0,
    "kind": KIND_TOKEN_PASSWORD,
    "argon2": {"time_cost": 1, "memory_kib": 8192, "parallelism": 1},
    "salt": "a5" * 32,
    "wrap_nonce": "101112131415161718191a1b",
    "slot_created": 1767225600,
    "label": "primary",
    "header_created": 1767225600,
    "header_sequence": 0,
    "block_size": 65536,
}


def _hex(secret: Secret) -> str:
    # A Secret wipes itself when dropped: hold it while reading it.
    with secret, secret.view() as view:
        return view.hex()


def build() -> dict[str, object]:
    vault_uuid = uuid.UUID(INPUTS["vault_uuid"])  # type: ignore[arg-type]
    kdf = Argon2Params(**INPUTS["argon2"])  # type: ignore[arg-type]
    master = Secret.from_bytes(bytes.fromhex(INPUTS["master_key"]))  # type: ignore[arg-type]
    password = Secret.from_bytes(str(INPUTS["password_utf8"]).encode())
    factor = TokenFactor(
        Secret.from_bytes(bytes.fromhex(str(INPUTS["token_secret"]))),
        str(INPUTS["token_binding"]).encode(),
        str(INPUTS["token_identity"]).encode(),
    )
    salt = bytes.fromhex(str(INPUTS["salt"]))
    index = int(INPUTS["slot_index"])  # type: ignore[call-overload]
    stretched = argon2id(password, salt, kdf)
    kek = derive_password_kek(vault_uuid, index, salt, kdf, password, factor)
    template = Keyslot(
        KIND_TOKEN_PASSWORD,
        int(INPUTS["slot_created"]),
        kdf,
        salt,
        bytes(12),
        bytes(48),  # type: ignore[call-overload]
        factor.identity,
        str(INPUTS["label"]),
    )
    slot = seal_slot(vault_uuid, index, template, kek, master, bytes.fromhex(str(INPUTS["wrap_nonce"])))
    header = Header(
        vault_uuid,
        int(INPUTS["header_sequence"]),
        int(INPUTS["header_created"]),  # type: ignore[call-overload]
        Layout(block_size=int(INPUTS["block_size"])),  # type: ignore[call-overload]
        (slot,) + (None,) * (SLOT_COUNT - 1),
    )
    header = sign_header(replace(header), master)
    expected = {
        "argon2id_output": _hex(stretched),
        "kek": _hex(kek),
        "slot_bytes": slot.encode().hex(),
        "slot_aad": slot.associated_data(vault_uuid, index).hex(),
        **{
            f"k_{purpose}": _hex(subkey(master, purpose.encode(), vault_uuid))
            for purpose in ("header", "data", "meta")
        },
        "header_copy": header.encode().hex(),
    }
    return {
        "description": "docs/FORMAT.md sections 2 and 3: one header copy with one token+password keyslot",
        "inputs": INPUTS,
        "expected": expected,
    }


if __name__ == "__main__":
    out = Path(__file__).with_name("header_v1.json")
    out.write_text(json.dumps(build(), indent=1) + "\n")
    print(f"wrote {out}")

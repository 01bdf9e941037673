"""Regenerates tests/vectors/fido2_slot_v1.json from fixed inputs (run by hand, output committed).

A FIDO2 keyslot (docs/FORMAT.md §3.2/§3.3, docs/TOKEN.md "FIDO2 security keys") is a
token+password slot whose token identity is `fido2:` + base64url(flags || salt ||
credential id) and whose token secret is the key's hmac-secret output for that salt.
The key computes the output as HMAC-SHA256(CredRandom, salt); `cred_random` stands for
the secret inside the key, so the whole chain from key to master key is pinned here.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from pathlib import Path

from kryptvault.container.header import KIND_TOKEN_PASSWORD, Keyslot
from kryptvault.container.keyslots import TokenFactor, derive_password_kek, seal_slot
from kryptvault.crypto.kdf_params import Argon2Params
from kryptvault.crypto.secret import Secret
from kryptvault.token.fido2key import Fido2Identity

INPUTS = {
    "vault_uuid": "6f1c2a4e-9d3b-4c8e-8a71-2b5d0e9f4c13",
    "master_key": "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
    "password_utf8": "correct horse battery staple",
    "credential_id": "c0" * 16 + "c1" * 16 + "c2" * 16,
    "hmac_salt": "5a" * 32,
    "uv_required": True,
    "cred_random": "77" * 32,
    "slot_index": 3,
    "argon2": {"time_cost": 1, "memory_kib": 8192, "parallelism": 1},
    "salt": "a5" * 32,
    "wrap_nonce": "101112131415161718191a1b",
    "slot_created": 1767225600,
    "label": "yubikey",
}


def _hex(secret: Secret) -> str:
    with secret, secret.view() as view:
        return view.hex()


def build() -> dict[str, object]:
    vault_uuid = uuid.UUID(str(INPUTS["vault_uuid"]))
    kdf = Argon2Params(**INPUTS["argon2"])  # type: ignore[arg-type]
    identity = Fido2Identity(
        bytes.fromhex(str(INPUTS["credential_id"])), bytes.fromhex(str(INPUTS["hmac_salt"])),
        bool(INPUTS["uv_required"]),
    )
    output = hmac.new(bytes.fromhex(str(INPUTS["cred_random"])), identity.salt, hashlib.sha256).digest()
    factor = TokenFactor(Secret.from_bytes(output), identity.binding(), identity.encode())
    password = Secret.from_bytes(str(INPUTS["password_utf8"]).encode())
    master = Secret.from_bytes(bytes.fromhex(str(INPUTS["master_key"])))
    salt = bytes.fromhex(str(INPUTS["salt"]))
    index = int(str(INPUTS["slot_index"]))
    kek = derive_password_kek(vault_uuid, index, salt, kdf, password, factor)
    template = Keyslot(
        KIND_TOKEN_PASSWORD, int(str(INPUTS["slot_created"])), kdf, salt, bytes(12), bytes(48),
        factor.identity, str(INPUTS["label"]),
    )
    with kek:
        slot = seal_slot(vault_uuid, index, template, kek, master, bytes.fromhex(str(INPUTS["wrap_nonce"])))
        kek_hex = kek.view().hex()
    return {
        "description": "a FIDO2 token+password keyslot: identity, hmac-secret output, KEK, slot bytes",
        "inputs": INPUTS,
        "expected": {
            "identity_ascii": identity.encode().decode("ascii"),
            "binding_ascii": identity.binding().decode("ascii"),
            "hmac_secret_output": output.hex(),
            "kek": kek_hex,
            "slot_bytes": slot.encode().hex(),
            "slot_aad": slot.associated_data(vault_uuid, index).hex(),
        },
    }


if __name__ == "__main__":
    out = Path(__file__).with_name("fido2_slot_v1.json")
    out.write_text(json.dumps(build(), indent=1) + "\n")
    print(f"wrote {out}")

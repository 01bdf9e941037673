"""Regenerates tests/vectors/store/store_v2.json from fixed inputs (run by hand, output
committed): `.venv/bin/python tests/vectors/store/make_store_vectors.py`.

One Merkle chain, as docs/FORMAT.md §4 describes it: commit record -> object-table
block -> entry of object 1 -> stream root -> indirect block -> data block; plus one group
descriptor. The table and indirect blocks are metadata: their pointers carry a ditto
distance to a second copy (§4.2). tests/test_store_vectors.py checks it against the raw
primitives and our code. store_v1.json (store format 1, no second copies) was made by
the format-1 version of this script and is kept: format 1 is still read.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from array import array
from pathlib import Path

from kryptvault.container import pointer as fmt
from kryptvault.container.commit import CommitRecord, seal_commit
from kryptvault.container.groups import GroupGeometry, encode_descriptor
from kryptvault.crypto.aead import Aead
from kryptvault.crypto.secret import Secret

BS, US = 65536, 4096
INPUTS = {
    "vault_uuid": "0b3e1c52-7a49-4d1f-9e6a-5c2f8d7b1a03",
    "data_key": bytes(range(0x20, 0x40)).hex(),
    "meta_key": bytes(range(0x40, 0x60)).hex(),
    "block_size": BS,
    "unit_size": US,
    "data_plaintext": "bytes(i * 7 % 251 for i in range(5000)) followed by zeros to block_size",
    "data": {"oid": 1, "stream": 0, "level": 0, "index": 0, "unit": 17,
             "nonce": bytes(range(0xA0, 0xAC)).hex()},
    "indirect": {"oid": 1, "stream": 0, "level": 1, "index": 0, "unit": 18, "ditto": 30,
                 "nonce": bytes(range(0xB0, 0xBC)).hex(),
                 "note": "slot 0 = data pointer, slot 1 = hole, slot 2 = data pointer again"},
    "stream_size": 2 * BS + 5000,
    "attrs": bytes(range(128)).hex(),
    "table": {"oid": 0, "stream": 0, "level": 0, "index": 0, "unit": 19, "ditto": 20,
              "nonce": bytes(range(0xC0, 0xCC)).hex(),
              "note": "entries 0 (zero) and 1 (in use); table stream size 512"},
    "commit": {"generation": 7, "total_units": 4096, "encryptions": 3,
               "timestamp_ns": 1767225600000000000, "next_oid": 2, "nonce": bytes(range(0xD0, 0xDC)).hex()},
    "descriptor": {"group": 0, "generation": 7, "chunk_generations": {"0": 7, "1": 7, "5": 6}},
}


def data_plaintext() -> bytearray:
    buf = bytearray(BS)
    buf[:5000] = bytes(i * 7 % 251 for i in range(5000))
    return buf


def main() -> None:
    vid = uuid.UUID(INPUTS["vault_uuid"]).bytes
    data = Aead(Secret.from_bytes(bytes.fromhex(INPUTS["data_key"])))
    meta = Aead(Secret.from_bytes(bytes.fromhex(INPUTS["meta_key"])))
    out: dict[str, object] = {}

    def seal(spec: dict, plain: bytearray) -> dict:  # type: ignore[type-arg]
        where = (spec["oid"], spec["stream"], spec["level"], spec["index"])
        nonce = bytes.fromhex(spec["nonce"])
        ct, ptr = fmt.seal_block(data.seal, vid, *where, plain, spec["unit"], US, nonce)
        aad = fmt.block_aad(vid, *where, len(ct))
        out = {"aad": aad.hex(), "stored_length": len(ct), "ciphertext": bytes(ct).hex()}
        ditto = spec.get("ditto", 0)
        if ditto:
            unit, units, _flags, nonce_, tag = fmt.unpack_pointer(ptr)
            ptr = fmt.pack_pointer(unit, units, nonce_, tag, flags=ditto & 0xFFFF)
            out["copy2_unit"] = unit + ditto * (BS // US)  # the same ciphertext there
        out["pointer"] = ptr.hex()
        return out

    out["data_block"] = seal(INPUTS["data"], data_plaintext())
    dptr = bytes.fromhex(out["data_block"]["pointer"])

    node = bytearray(BS)
    node[0:40] = dptr
    node[80:120] = dptr
    out["indirect_block"] = seal(INPUTS["indirect"], node)
    iptr = bytes.fromhex(out["indirect_block"]["pointer"])

    root = fmt.pack_root(INPUTS["stream_size"], 1, iptr)
    entry = bytearray(fmt.ENTRY_SIZE)
    entry[0] = fmt.ENTRY_IN_USE
    entry[8:64] = root
    entry[128:256] = bytes.fromhex(INPUTS["attrs"])
    out["stream_root"] = root.hex()
    out["table_entry"] = bytes(entry).hex()

    table = bytearray(BS)
    table[256:512] = entry
    out["table_block"] = seal(INPUTS["table"], table)
    tptr = bytes.fromhex(out["table_block"]["pointer"])

    c = INPUTS["commit"]
    table_root = fmt.pack_root(512, 0, tptr)
    rec = CommitRecord(c["generation"], BS, US, table_root, c["total_units"], c["encryptions"],
                       c["timestamp_ns"], c["next_oid"])
    image = seal_commit(meta, vid, rec, bytes.fromhex(c["nonce"]))
    assert not any(image[284:])
    out["commit_record"] = {"slot": c["generation"] % 2, "table_root": table_root.hex(),
                            "aad": (b"KVCOMMIT" + vid + bytes([c["generation"] % 2])).hex(),
                            "slot_image_first_284_bytes": image[:284].hex(),
                            "note": "bytes 284..4096 of the slot are zero"}

    geom = GroupGeometry(BS, US)
    d = INPUTS["descriptor"]
    gens = array("Q", [0]) * geom.chunks_per_group
    for k, v in d["chunk_generations"].items():
        gens[int(k)] = v
    raw = encode_descriptor(geom, d["group"], d["generation"], gens)
    out["group_descriptor"] = {"chunks_per_group": geom.chunks_per_group, "head": raw[:64].hex(),
                               "checksum": raw[-32:].hex(),
                               "sha256_of_whole": hashlib.sha256(raw).hexdigest()}

    doc = {
        "description": "kryptvault object store format 2 known-answer vectors (docs/FORMAT.md §4)",
        "inputs": INPUTS,
        "expected": out,
    }
    path = Path(__file__).with_name("store_v2.json")
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main()

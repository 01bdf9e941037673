"""Known-answer vectors (tests/vectors/store/store_v2.json), checked three ways: an
independent reader written from docs/FORMAT.md §4 with raw AES-GCM and struct, our
format functions, and a real store run with an injected nonce source. store_v1.json
(store format 1) must still open."""

from __future__ import annotations

import hashlib
import json
import struct
import uuid
from array import array
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from store_support import Vault

from kryptvault.container import pointer as fmt
from kryptvault.container.commit import CommitRecord, open_commit, seal_commit
from kryptvault.container.groups import GroupGeometry, decode_descriptor, encode_descriptor
from kryptvault.container.layout import COMMIT_OFFSETS, Layout
from kryptvault.crypto.aead import Aead
from kryptvault.crypto.secret import Secret

V = json.loads((Path(__file__).parent / "vectors" / "store" / "store_v2.json").read_text())
V1 = json.loads((Path(__file__).parent / "vectors" / "store" / "store_v1.json").read_text())
IN, EX = V["inputs"], V["expected"]
UUID = uuid.UUID(IN["vault_uuid"]).bytes
DK, MK = bytes.fromhex(IN["data_key"]), bytes.fromhex(IN["meta_key"])
BS, US = IN["block_size"], IN["unit_size"]


# ---- the independent reader: nothing from kryptvault below this line ----------------
def spec_block_aad(oid: int, stream: int, level: int, index: int, stored: int) -> bytes:
    return b"KVBLK1" + UUID + struct.pack("<QBBQI", oid, stream, level, index, stored)


def spec_pointer(raw: bytes) -> tuple[int, int, int, bytes, bytes]:
    """-> (unit, units, ditto, nonce, tag); ditto is an i16 (§4.2)."""
    return struct.unpack("<QHh12s16s", raw)


def spec_seal(spec: dict, plain: bytes) -> tuple[bytes, bytes, bytes]:
    stored = len(plain.rstrip(b"\0"))
    stored = -(-stored // US) * US
    aad = spec_block_aad(spec["oid"], spec["stream"], spec["level"], spec["index"], stored)
    nonce = bytes.fromhex(spec["nonce"])
    sealed = AESGCM(DK).encrypt(nonce, plain[:stored], aad)
    ptr = struct.pack("<QHh12s16s", spec["unit"], stored // US, spec.get("ditto", 0), nonce, sealed[-16:])
    return sealed[:-16], ptr, aad


def spec_open_block(ct: bytes, ptr: bytes, oid: int, stream: int, level: int, index: int) -> bytes:
    unit, units, _ditto, nonce, tag = spec_pointer(ptr)
    assert unit and len(ct) == units * US
    plain = AESGCM(DK).decrypt(nonce, ct + tag, spec_block_aad(oid, stream, level, index, units * US))
    return plain + bytes(BS - len(plain))


def spec_root(raw: bytes) -> tuple[int, int, bytes]:
    size, depth, pad, ptr = struct.unpack("<QB7s40s", raw)
    assert pad == bytes(7)
    return size, depth, ptr


def spec_open_commit(slot: int, image: bytes) -> dict:
    plain = AESGCM(MK).decrypt(image[:12], image[12:284], b"KVCOMMIT" + UUID + bytes([slot]))
    gen, ver, bs, us, _r, root, total, enc, ts, nxt, lineage = struct.unpack_from("<QIIII56sQQQQ16s", plain)
    assert len(plain) == 256 and plain[128:] == bytes(128) and gen % 2 == slot and ver in (1, 2)
    return {"generation": gen, "block_size": bs, "unit_size": us, "table_root": root,
            "total_units": total, "encryptions": enc, "timestamp_ns": ts, "next_oid": nxt,
            "lineage": lineage, "version": ver}


def data_plaintext() -> bytes:
    return bytes(i * 7 % 251 for i in range(5000)) + bytes(BS - 5000)


# ---- the checks ----------------------------------------------------------------------
def test_vectors_follow_the_spec() -> None:
    ct, dptr, aad = spec_seal(IN["data"], data_plaintext())
    assert (ct.hex(), dptr.hex(), aad.hex()) == (
        EX["data_block"]["ciphertext"], EX["data_block"]["pointer"], EX["data_block"]["aad"])
    assert len(ct) == EX["data_block"]["stored_length"] == 8192  # 5000 bytes -> two units

    node = dptr + bytes(40) + dptr + bytes(BS - 120)
    ct, iptr, _ = spec_seal(IN["indirect"], node)
    assert (ct.hex(), iptr.hex()) == (EX["indirect_block"]["ciphertext"], EX["indirect_block"]["pointer"])

    root = struct.pack("<QB7x40s", IN["stream_size"], 1, iptr)
    assert root.hex() == EX["stream_root"]
    entry = b"\x01" + bytes(7) + root + bytes(56) + bytes(8) + bytes.fromhex(IN["attrs"])
    assert len(entry) == 256 and entry.hex() == EX["table_entry"]

    ct, tptr, _ = spec_seal(IN["table"], bytes(256) + entry + bytes(BS - 512))
    assert (ct.hex(), tptr.hex()) == (EX["table_block"]["ciphertext"], EX["table_block"]["pointer"])
    # metadata blocks name their second copy: ditto chunks of block_size/unit_size units
    for name, ptr in (("table_block", tptr), ("indirect_block", iptr)):
        unit, _units, ditto = spec_pointer(ptr)[:3]
        assert ditto and unit + ditto * (BS // US) == EX[name]["copy2_unit"]
    assert spec_pointer(dptr)[2] == 0  # data blocks have one copy

    image = bytes.fromhex(EX["commit_record"]["slot_image_first_284_bytes"])
    rec = spec_open_commit(1, image)
    c = IN["commit"]
    assert rec["generation"] == c["generation"] and rec["encryptions"] == c["encryptions"]
    assert rec["version"] == 2
    assert rec["lineage"] == bytes(16)  # FORMAT.md §4.6: a created vault is the original lineage
    assert rec["table_root"] == struct.pack("<QB7x40s", 512, 0, tptr)
    # and walking the chain back down from the commit record recovers the data
    table_ct = bytes.fromhex(EX["table_block"]["ciphertext"])
    t = spec_open_block(table_ct, spec_root(rec["table_root"])[2], 0, 0, 0, 0)
    size, depth, iroot = spec_root(t[256 + 8 : 256 + 64])
    assert (size, depth) == (IN["stream_size"], 1)
    n = spec_open_block(bytes.fromhex(EX["indirect_block"]["ciphertext"]), iroot, 1, 0, 1, 0)
    d = spec_open_block(bytes.fromhex(EX["data_block"]["ciphertext"]), n[80:120], 1, 0, 0, 0)
    assert d == data_plaintext()

    cpg = (BS - 64) // 8
    assert cpg == EX["group_descriptor"]["chunks_per_group"] == 8184
    gens = [0] * cpg
    for k, v in IN["descriptor"]["chunk_generations"].items():
        gens[int(k)] = v
    body = b"KVGROUP1" + struct.pack("<QQII", 0, 7, cpg, 0) + struct.pack(f"<{cpg}Q", *gens)
    raw = body + hashlib.sha256(body).digest()
    assert raw[:64].hex() == EX["group_descriptor"]["head"]
    assert hashlib.sha256(raw).hexdigest() == EX["group_descriptor"]["sha256_of_whole"]


def test_our_format_code_matches_the_vectors() -> None:
    data = Aead(Secret.from_bytes(DK))
    d = IN["data"]
    ct, ptr = fmt.seal_block(data.seal, UUID, d["oid"], d["stream"], d["level"], d["index"],
                             bytearray(data_plaintext()), d["unit"], US, bytes.fromhex(d["nonce"]))
    assert bytes(ct).hex() == EX["data_block"]["ciphertext"] and ptr.hex() == EX["data_block"]["pointer"]
    iptr = bytes.fromhex(EX["indirect_block"]["pointer"])
    assert fmt.pack_root(IN["stream_size"], 1, iptr).hex() == EX["stream_root"]
    meta = Aead(Secret.from_bytes(MK))
    c = IN["commit"]
    rec = CommitRecord(c["generation"], BS, US, bytes.fromhex(EX["commit_record"]["table_root"]),
                       c["total_units"], c["encryptions"], c["timestamp_ns"], c["next_oid"])
    image = seal_commit(meta, UUID, rec, bytes.fromhex(c["nonce"]))
    assert image[:284].hex() == EX["commit_record"]["slot_image_first_284_bytes"]
    assert open_commit(meta, UUID, 1, image) == rec
    assert open_commit(meta, UUID, 0, image) is None  # wrong slot
    geom = GroupGeometry(BS, US)
    gens = array("Q", [0]) * geom.chunks_per_group
    for k, v in IN["descriptor"]["chunk_generations"].items():
        gens[int(k)] = v
    raw = encode_descriptor(geom, 0, 7, gens)
    assert hashlib.sha256(raw).hexdigest() == EX["group_descriptor"]["sha256_of_whole"]
    assert decode_descriptor(geom, 0, raw) == gens
    assert decode_descriptor(geom, 1, raw) is None


def test_a_real_store_writes_the_vector_bytes(tmp_path, monkeypatch) -> None:
    vault = Vault(tmp_path / "c", Layout(), uuid.UUID(IN["vault_uuid"]), DK, MK)
    store = vault.create()
    nonces = iter([bytes.fromhex(IN["data"]["nonce"])] + [bytes([n]) * 12 for n in range(1, 50)])
    monkeypatch.setattr(fmt, "nonce_source", lambda: next(nonces))
    oid = store.allocate_oid()
    assert oid == 1
    store.write(oid, 0, 0, data_plaintext()[:5000])
    store.set_attrs(oid, bytes.fromhex(IN["attrs"]))
    gen = store.commit()
    store.close()
    # independent walk of the container the store produced
    image = vault.path.read_bytes()
    rec = spec_open_commit(gen % 2, image[COMMIT_OFFSETS[gen % 2] : COMMIT_OFFSETS[gen % 2] + 4096])
    assert rec["generation"] == gen and (rec["block_size"], rec["unit_size"]) == (BS, US)
    assert len(image) == 65536 + rec["total_units"] * US

    def block(ptr: bytes, *where: int) -> bytes:
        unit, units = spec_pointer(ptr)[:2]
        off = 65536 + unit * US
        return spec_open_block(image[off : off + units * US], ptr, *where)

    tsize, tdepth, tptr = spec_root(rec["table_root"])
    assert (tsize, tdepth) == (512, 0)
    entry = block(tptr, 0, 0, 0, 0)[256:512]
    # the table block's second copy: the same ciphertext, in another chunk
    tunit, tunits, tditto = spec_pointer(tptr)[:3]
    assert tditto
    copy1 = image[65536 + tunit * US : 65536 + (tunit + tunits) * US]
    at = 65536 + (tunit + tditto * (BS // US)) * US
    assert image[at : at + tunits * US] == copy1
    assert entry[0] == 1 and entry[128:] == bytes.fromhex(IN["attrs"])
    size, depth, dptr = spec_root(entry[8:64])
    assert (size, depth) == (5000, 0)
    assert block(dptr, 1, 0, 0, 0) == data_plaintext()
    # with the vector's nonce the on-disk ciphertext is the vector's, wherever it landed
    unit, units, _f, nonce, tag = spec_pointer(dptr)
    expected = bytes.fromhex(EX["data_block"]["pointer"])
    assert (units, nonce, tag) == spec_pointer(expected)[1:2] + spec_pointer(expected)[3:]
    assert image[65536 + unit * US : 65536 + (unit + units) * US].hex() == EX["data_block"]["ciphertext"]
    # the group descriptor of group 0 says chunk 0 and the chunk of that unit changed at gen
    desc = image[65536 : 65536 + BS]
    assert desc[:8] == b"KVGROUP1" and hashlib.sha256(desc[:-32]).digest() == desc[-32:]
    gens = struct.unpack_from("<8184Q", desc, 32)
    assert gens[0] == gen and gens[unit * US // BS] == gen
    vault.close_fds()


def test_store_format_1_vectors_still_open() -> None:
    """FORMAT.md §4.6: a format-1 commit record and its single-copy pointers are read."""
    ex = V1["expected"]
    image = bytes.fromhex(ex["commit_record"]["slot_image_first_284_bytes"]) + bytes(4096 - 284)
    rec = spec_open_commit(1, image)
    assert rec["version"] == 1
    ours = open_commit(Aead(Secret.from_bytes(MK)), UUID, 1, image)
    assert ours is not None and ours.generation == rec["generation"]
    assert ours.table_root == rec["table_root"]
    tptr = spec_root(rec["table_root"])[2]
    assert spec_pointer(tptr)[2] == 0
    t = spec_open_block(bytes.fromhex(ex["table_block"]["ciphertext"]), tptr, 0, 0, 0, 0)
    assert t[256] == 1


def test_a_format_1_container_opens_writes_and_is_upgraded_to_format_2(tmp_path) -> None:
    """A container as a format-1 build wrote it (sealed here from the spec, one copy of
    every block, commit record version 1) opens writable; its first commit says 2."""
    path = tmp_path / "v1.kv"
    data = data_plaintext()
    total = 64
    image = bytearray(65536 + total * US)
    d_ct, d_ptr, _ = spec_seal({"oid": 1, "stream": 0, "level": 0, "index": 0, "unit": 17,
                                "nonce": "11" * 12}, data)
    image[65536 + 17 * US : 65536 + 17 * US + len(d_ct)] = d_ct
    entry = b"\x01" + bytes(7) + struct.pack("<QB7x40s", 5000, 0, d_ptr) + bytes(56) + bytes(8) + bytes(128)
    t_ct, t_ptr, _ = spec_seal({"oid": 0, "stream": 0, "level": 0, "index": 0, "unit": 19,
                                "nonce": "22" * 12}, bytes(256) + entry + bytes(BS - 512))
    image[65536 + 19 * US : 65536 + 19 * US + len(t_ct)] = t_ct
    plain = struct.pack("<QIIII56sQQQQ16s", 1, 1, BS, US, 0, struct.pack("<QB7x40s", 512, 0, t_ptr),
                        total, 2, 1767225600000000000, 2, bytes(16))
    plain += bytes(256 - len(plain))
    nonce = b"\x33" * 12
    image[COMMIT_OFFSETS[1] : COMMIT_OFFSETS[1] + 284] = nonce + AESGCM(MK).encrypt(
        nonce, plain, b"KVCOMMIT" + UUID + b"\x01")
    geom = GroupGeometry(BS, US)
    gens = array("Q", [0]) * geom.chunks_per_group
    gens[0] = gens[1] = 1
    image[65536 : 65536 + BS] = encode_descriptor(geom, 0, 1, gens)
    path.write_bytes(image)

    vault = Vault(path, Layout(), uuid.UUID(IN["vault_uuid"]), DK, MK)
    store = vault.open()
    assert not store.read_only and store.open_damage == [] and store.commit_damage is None
    assert store.read(1, 0, 0, 5000) == data[:5000]
    oid = store.allocate_oid()
    store.write(oid, 0, 0, b"written by format 2")
    gen = store.commit()
    store.close()
    raw = path.read_bytes()
    rec = spec_open_commit(gen % 2, raw[COMMIT_OFFSETS[gen % 2] : COMMIT_OFFSETS[gen % 2] + 4096])
    assert rec["version"] == 2 and rec["generation"] == 2
    assert spec_pointer(spec_root(rec["table_root"])[2])[2] != 0  # the new table block: two copies
    store = vault.open()
    assert store.read(1, 0, 0, 5000) == data[:5000]
    assert store.read(oid, 0, 0, 100) == b"written by format 2"
    assert store.verify() == [] and store.bad_copies == []
    store.close()
    vault.close_fds()

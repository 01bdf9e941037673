"""Key derivation: Argon2id for passwords, HKDF-SHA256 for everything else.

Argon2id runs through libargon2's `argon2_ctx` so that the password and the output stay
in our wipeable buffers (argon2-cffi's convenience functions require and return `bytes`).
"""

from __future__ import annotations

import os
import time

from _argon2_cffi_bindings import ffi, lib
from argon2.low_level import Type, core
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from kryptvault.crypto.kdf_params import MAX_TIME_COST, MIN_MEMORY_KIB, Argon2Params
from kryptvault.crypto.secret import Secret, scrub_bytes

ARGON2_SALT_LEN = 32
KEY_LEN = 32


def argon2id(password: Secret, salt: bytes, params: Argon2Params) -> Secret:
    params.validate()
    out = Secret(KEY_LEN)
    try:
        with password.view() as pwd, out.view() as out_view:
            # cffi's views export the memoryviews' buffers: they must be released before the
            # memoryviews are, or an exception raised meanwhile (Ctrl-C during the hash)
            # turns into a BufferError at the `with` exit and hides the real cause.
            held: list[object] = []
            try:
                pwd_buf = ffi.from_buffer("uint8_t[]", pwd) if len(pwd) else ffi.NULL
                if len(pwd):
                    held.append(pwd_buf)
                salt_buf = ffi.from_buffer("uint8_t[]", salt)
                held.append(salt_buf)
                out_buf = ffi.from_buffer("uint8_t[]", out_view, require_writable=True)
                held.append(out_buf)
                ctx = ffi.new(
                    "argon2_context *",
                    {
                        "out": out_buf,
                        "outlen": KEY_LEN,
                        "pwd": pwd_buf,
                        "pwdlen": len(pwd),
                        "salt": salt_buf,
                        "saltlen": len(salt),
                        "secret": ffi.NULL,
                        "secretlen": 0,
                        "ad": ffi.NULL,
                        "adlen": 0,
                        "t_cost": params.time_cost,
                        "m_cost": params.memory_kib,
                        "lanes": params.parallelism,
                        "threads": params.parallelism,
                        "version": lib.ARGON2_VERSION_13,
                        "allocate_cbk": ffi.NULL,
                        "free_cbk": ffi.NULL,
                        "flags": lib.ARGON2_DEFAULT_FLAGS,
                    },
                )
                rc = core(ctx, Type.ID.value)
            finally:
                for buf in held:
                    ffi.release(buf)
    except BaseException:
        out.wipe()
        raise
    if rc != 0:
        out.wipe()
        raise ValueError(f"Argon2id failed with code {rc}")
    return out


def hkdf_sha256(ikm: Secret, info: bytes, length: int = KEY_LEN, salt: bytes | None = None) -> Secret:
    with ikm.view() as ikm_view:
        derived = HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm_view)
    try:
        return Secret.from_bytes(derived)
    finally:
        scrub_bytes(derived)


def available_memory_kib() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 1024 * 1024


def calibrate(target_seconds: float = 1.0, memory_kib: int | None = None) -> Argon2Params:
    """Pick Argon2id parameters that take about `target_seconds` here.

    Memory is fixed first (256 MiB, or half of what is free when less), then the time cost
    grows until one run takes the target; that favours memory hardness over iterations.
    """
    if memory_kib is None:
        memory_kib = min(256 * 1024, max(MIN_MEMORY_KIB, available_memory_kib() // 2))
    parallelism = max(1, min(4, os.cpu_count() or 1))
    salt = bytes(ARGON2_SALT_LEN)
    with Secret.from_bytes(b"kryptvault calibration") as probe_password:
        # Each run pays a fixed cost (faulting the memory in) plus a cost per pass: time
        # two runs and solve for both, then check the estimate once and correct it.
        two = _time_argon2(probe_password, salt, Argon2Params(2, memory_kib, parallelism))
        four = _time_argon2(probe_password, salt, Argon2Params(4, memory_kib, parallelism))
        per_pass = max((four - two) / 2, 1e-3)
        fixed = max(two - 2 * per_pass, 0.0)
        time_cost = max(1, min(MAX_TIME_COST, round((target_seconds - fixed) / per_pass)))
        took = _time_argon2(probe_password, salt, Argon2Params(time_cost, memory_kib, parallelism))
        time_cost = max(1, min(MAX_TIME_COST, round(time_cost * target_seconds / max(took, 1e-3))))
    return Argon2Params(time_cost, memory_kib, parallelism)


def _time_argon2(password: Secret, salt: bytes, params: Argon2Params) -> float:
    start = time.perf_counter()
    argon2id(password, salt, params).wipe()
    return time.perf_counter() - start

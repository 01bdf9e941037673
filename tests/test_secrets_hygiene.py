"""Key material hygiene: wiping, non-dumpable processes, constant-time compare, input rules."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kryptvault.cli.secrets_input import check_password_strength, read_from_file
from kryptvault.container.keyslots import format_recovery_key, new_recovery_key, parse_recovery_key
from kryptvault.crypto.secret import Secret, constant_time_equal
from kryptvault.errors import UsageError


def test_wiped_secret_buffer_holds_only_zeros_and_refuses_further_use() -> None:
    secret = Secret.from_bytes(b"\xaa" * 32)
    view = secret.view()
    secret.wipe()
    assert bytes(view) == bytes(32)  # the page was zeroed even though a view was alive
    view.release()
    with pytest.raises(ValueError):
        secret.view()


def test_secret_never_shows_its_value() -> None:
    with Secret.from_bytes(b"hunter2-hunter2") as secret:
        assert "hunter2" not in repr(secret) and "hunter2" not in str(secret)
        with pytest.raises(TypeError):
            import pickle

            pickle.dumps(secret)


def test_hardened_process_is_not_dumpable_and_has_no_core_limit() -> None:
    code = (
        "import resource; from kryptvault.crypto.secret import harden_process, is_dumpable;"
        "assert is_dumpable(); harden_process();"
        "print(is_dumpable(), resource.getrlimit(resource.RLIMIT_CORE))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False (0, 0)"


def test_constant_time_equal_compares_contents() -> None:
    assert constant_time_equal(b"abc", bytearray(b"abc"))
    assert not constant_time_equal(b"abc", b"abd")
    assert not constant_time_equal(b"abc", b"abcd")


@given(st.binary(min_size=20, max_size=20))
def test_recovery_key_text_round_trips(raw: bytes) -> None:
    with Secret.from_bytes(raw) as key, format_recovery_key(key) as text:
        printed = bytes(text.view())
        assert len(printed.split(b"-")) == 8 and all(len(g) == 4 for g in printed.split(b"-"))
        messy = Secret.from_bytes(printed.lower().replace(b"-", b" ") + b"\n")
        with messy, parse_recovery_key(messy) as back:
            assert back.equals(key)


def test_recovery_keys_are_random_and_typos_are_rejected() -> None:
    with new_recovery_key() as a, new_recovery_key() as b:
        assert not a.equals(b)
    with (
        Secret.from_bytes(b"ABCD-EFGH-1JKL-MNOP-QRST-UVWX-YZ23-4567") as bad,
        pytest.raises(UsageError, match="alphabet"),
    ):
        parse_recovery_key(bad)
    with Secret.from_bytes(b"ABCD-EFGH") as short, pytest.raises(UsageError, match="32 characters"):
        parse_recovery_key(short)


@pytest.mark.parametrize(
    ("password", "reason"),
    [
        (b"", "empty"),
        (b"short1!", "too short"),
        (b"aaaaaaaaaaaaaaaa", "repeat"),
        (b"1234567890", "common"),
        (b"abcdefghijklmnop", "sequences"),
        (b"QwertyUiop", "common"),
        # Long enough and varied, yet on every cracking list: the length rule alone let
        # these through before zxcvbn judged them.
        (b"password12", "very common password"),
        (b"iloveyou12", "similar to a commonly used password"),
    ],
)
def test_weak_passwords_are_refused_with_the_reason(password: bytes, reason: str) -> None:
    from kryptvault.cli.secrets_input import _from_line

    with _from_line(bytearray(password)) as secret, pytest.raises(UsageError, match=reason):
        check_password_strength(secret)


def test_a_reasonable_passphrase_is_accepted() -> None:
    with Secret.from_bytes("grüne tasse mond 42".encode()) as secret:
        check_password_strength(secret)


def test_password_file_gives_its_first_line_without_the_newline(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    path.write_bytes(b"first line secret\nsecond line\n")
    with read_from_file(path, "password") as secret:
        assert bytes(secret.view()) == b"first line secret"


def test_password_fd_reads_from_an_inherited_pipe() -> None:
    from kryptvault.cli.secrets_input import read_from_fd

    r, w = os.pipe()
    os.write(w, b"piped password\r\n")
    os.close(w)
    with read_from_fd(r, "password") as secret:
        assert bytes(secret.view()) == b"piped password"
    os.close(r)


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


@pytest.mark.fuse
def test_the_mounted_daemon_keeps_its_keys_in_locked_pages(tmp_path: Path) -> None:
    """docs/SECURITY.md: the daemon's keys live in mlock-ed pages (VmLck > 0) while it is
    mounted, and the AES key is not left in an AESGCM object on the ordinary heap."""
    import json
    import resource

    from cli_helpers import mounted_vault_and_dest, run_process

    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft != resource.RLIM_INFINITY and soft < 64 * 1024 and os.geteuid() != 0:
        pytest.skip(f"RLIMIT_MEMLOCK is {soft} bytes here: mlock is refused")
    vault, mnt, _dest = mounted_vault_and_dest(tmp_path)
    try:
        (mnt / "f").write_bytes(b"x" * 100_000)
        os.sync()
        status = json.loads(run_process("status", "--json").stdout)
        (entry,) = [s for s in status if s["container"] == str(vault.container.resolve())]
        pid = int(entry["pid"])
        locked = _status_kib(pid, "VmLck")
        print(f"\n[mlock] daemon VmLck {locked} kB")
        assert locked >= 8  # the data and meta keys, one page each
    finally:
        assert run_process("lock", mnt).returncode == 0


def test_an_aead_key_lives_only_in_its_own_locked_page() -> None:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from kryptvault.crypto.aead import Aead

    with Secret.random(32) as key:
        aead = Aead(key)
        nonce = os.urandom(12)
        sealed = aead.seal(nonce, b"plain", b"aad")
    # The caller's buffer is wiped; the Aead's own copy (locked) still works ...
    assert aead.open(nonce, sealed, b"aad") == b"plain"
    assert aead._key.locked
    assert not any(isinstance(getattr(aead, name, None), AESGCM) for name in Aead.__slots__)
    # ... until it is wiped, which leaves no usable key behind.
    aead.wipe()
    with pytest.raises(ValueError):
        aead.open(nonce, sealed, b"aad")

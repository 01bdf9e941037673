"""The container commands end to end: init, info, passwd, recovery-key, slot — and bad input."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import time
from pathlib import Path

import pytest
import spec_reader
from cli_helpers import (
    FAST_KDF,
    KRYPTVAULT,
    PASSWORD,
    assert_clean_error,
    make_vault,
    run_cli,
    run_process,
    write_password_file,
)

from kryptvault.container.layout import DATA_AREA_OFFSET, HEADER_COPY_SIZE


def test_init_creates_a_container_that_the_spec_alone_can_open(tmp_path: Path) -> None:
    vault = make_vault(tmp_path)
    header = spec_reader.read_container_header(str(vault.container))
    assert str(header.uuid.hex()) == vault.uuid.replace("-", "")
    (slot,) = header.slots
    assert slot.kind == 1 and slot.identity == b"dir" and slot.m == 8192
    share = (vault.token / f"{vault.uuid}.kvshare").read_bytes()
    assert share[:8] == b"KVSHARE1" and share[16:32] == header.uuid
    kek = spec_reader.password_kek(header.uuid, slot, PASSWORD.encode(), share[32:64], b"")
    master = spec_reader.unwrap(header.uuid, slot, kek)
    assert spec_reader.header_mac_ok(header, master)


def test_info_shows_the_public_header_without_secrets(tmp_path: Path) -> None:
    vault = make_vault(tmp_path)
    result = run_cli("info", vault.container, "--json")
    assert result.exit_code == 0
    info = json.loads(result.output)
    assert info["uuid"] == vault.uuid and info["format_version"] == 1 and info["block_size"] == 65536
    assert info["slots"][0]["kind"] == "token+password"
    assert info["slots"][0]["kdf"]["memory_kib"] == 8192


def test_wrong_password_and_wrong_token_give_the_same_single_message(tmp_path: Path) -> None:
    vault = make_vault(tmp_path)
    other = make_vault(tmp_path / "x" if (tmp_path / "x").mkdir() is None else tmp_path, name="other.kv")
    wrong_pw = write_password_file(tmp_path / "wrong", "not the right password")
    bad_password = run_process(
        "recovery-key", "add", vault.container, "--token", vault.token, "--password-file", wrong_pw
    )
    # A token whose share file has the right name but another vault's secret inside.
    fake_token = tmp_path / "fake-token"
    fake_token.mkdir()
    share = bytearray((other.token / f"{other.uuid}.kvshare").read_bytes())
    genuine = (vault.token / f"{vault.uuid}.kvshare").read_bytes()
    forged = genuine[:32] + bytes(share[32:64]) + genuine[64:96]
    import hashlib

    (fake_token / f"{vault.uuid}.kvshare").write_bytes(forged + hashlib.sha256(forged).digest())
    bad_token = run_process(
        "recovery-key", "add", vault.container, "--token", fake_token, "--password-file", vault.password_file
    )
    for result in (bad_password, bad_token):
        assert result.returncode == 1
        assert_clean_error(result.stderr)
    assert bad_password.stderr == bad_token.stderr
    assert "wrong password or wrong token" in bad_password.stderr


def test_passwd_rewraps_the_slot_and_leaves_the_data_area_untouched(tmp_path: Path) -> None:
    vault = make_vault(tmp_path)
    before = vault.container.read_bytes()
    new_pw = write_password_file(tmp_path / "new", "a brand new passphrase")
    result = run_cli("passwd", vault.container, *vault.pw(), "--new-password-file", new_pw)
    assert result.exit_code == 0, result.output
    after = vault.container.read_bytes()
    assert after[DATA_AREA_OFFSET - 32 * 1024 :] == before[DATA_AREA_OFFSET - 32 * 1024 :]
    assert after[: 2 * HEADER_COPY_SIZE] != before[: 2 * HEADER_COPY_SIZE]
    old = run_cli("recovery-key", "add", vault.container, *vault.pw())
    assert old.exit_code == 1
    new = run_cli("recovery-key", "add", vault.container, "--token", vault.token, "--password-file", new_pw)
    assert new.exit_code == 0, new.output


def _recovery_key(output: str) -> str:
    match = re.search(r"([A-Z2-7]{4}(?:-[A-Z2-7]{4}){7})", output)
    assert match, output
    return match.group(1)


def test_recovery_key_opens_alone_and_slots_can_be_removed_but_not_the_last(tmp_path: Path) -> None:
    vault = make_vault(tmp_path)
    added = run_cli("recovery-key", "add", vault.container, *vault.pw())
    assert added.exit_code == 0
    key_file = tmp_path / "rk"
    key_file.write_text(_recovery_key(added.output).lower().replace("-", " ") + "\n")
    listing = json.loads(run_cli("slot", "list", vault.container, "--json").output)
    assert [s["kind"] for s in listing] == ["token+password", "recovery"]
    removed = run_cli("slot", "remove", vault.container, "0", "--recovery-key-file", key_file)
    assert removed.exit_code == 0, removed.output
    assert "Old copies of the header" in removed.output
    gone = run_cli("recovery-key", "add", vault.container, *vault.pw())
    assert gone.exit_code == 1
    last = run_process("slot", "remove", vault.container, "1", "--recovery-key-file", key_file)
    assert last.returncode == 2
    assert_clean_error(last.stderr)
    assert "last keyslot" in last.stderr


def test_wrong_recovery_key_is_refused(tmp_path: Path) -> None:
    vault = make_vault(tmp_path)
    run_cli("recovery-key", "add", vault.container, *vault.pw())
    key_file = tmp_path / "rk"
    key_file.write_text("AAAA-AAAA-AAAA-AAAA-AAAA-AAAA-AAAA-AAAA\n")
    result = run_process("slot", "remove", vault.container, "0", "--recovery-key-file", key_file)
    assert result.returncode == 1
    assert "wrong recovery key" in result.stderr


def test_every_command_has_help_through_the_installed_entry_point() -> None:
    commands = [
        [],
        ["init"],
        ["info"],
        ["passwd"],
        ["recovery-key"],
        ["recovery-key", "add"],
        ["slot"],
        ["slot", "list"],
        ["slot", "remove"],
    ]
    for command in commands:
        result = run_process(*command, "--help")
        assert result.returncode == 0, (command, result.stderr)
        assert "Usage:" in result.stdout


def test_init_through_a_real_process_with_a_password_fd(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.mkdir()
    r, w = os.pipe()
    os.write(w, (PASSWORD + "\n").encode())
    os.close(w)
    result = run_process(
        "init", tmp_path / "v.kv", "--token", token, "--password-fd", str(r), *FAST_KDF, pass_fds=(r,)
    )
    os.close(r)
    assert result.returncode == 0, result.stderr
    assert re.search(r"created vault [0-9a-f-]{36}", result.stdout)


def test_password_never_reaches_argv_or_environment_of_the_process(tmp_path: Path) -> None:
    """Typed on a terminal, the password is not in the process's argv or environment."""
    token = tmp_path / "token"
    token.mkdir()
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - child
        os.execv(KRYPTVAULT, [KRYPTVAULT, "init", str(tmp_path / "v.kv"), "--token", str(token), *FAST_KDF])
    output = _converse(fd, [("password:", PASSWORD), ("Repeat", PASSWORD)], pid)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, output
    assert "created vault" in output
    assert PASSWORD not in output  # echo was off


def test_mismatched_repeat_on_the_terminal_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.mkdir()
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - child
        os.execv(KRYPTVAULT, [KRYPTVAULT, "init", str(tmp_path / "v.kv"), "--token", str(token), *FAST_KDF])
    output = _converse(fd, [("password:", PASSWORD), ("Repeat", PASSWORD + "x")], pid)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 2
    assert "the two passwords differ" in output
    assert not (tmp_path / "v.kv").exists() and list(token.iterdir()) == []


def _read_some(fd: int, deadline: float) -> bytes:
    import select

    ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
    if not ready:
        return b""
    try:
        return os.read(fd, 1024)
    except OSError:  # the child closed the terminal
        return b""


def _converse(fd: int, script: list[tuple[str, str]], pid: int) -> str:
    output = b""
    deadline = time.monotonic() + 60
    for expect, answer in script:
        while expect.encode() not in output and time.monotonic() < deadline:
            chunk = _read_some(fd, deadline)
            if not chunk:
                break
            output += chunk
        os.write(fd, answer.encode() + b"\n")
    while time.monotonic() < deadline:
        chunk = _read_some(fd, deadline)
        if not chunk:
            break
        output += chunk
    os.close(fd)
    return output.decode(errors="replace")


def test_no_terminal_and_no_password_source_is_a_usage_error(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.mkdir()
    result = subprocess.run(
        [KRYPTVAULT, "init", str(tmp_path / "v.kv"), "--token", str(token)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        start_new_session=True,
    )
    assert result.returncode == 2
    assert_clean_error(result.stderr)
    assert "no terminal" in result.stderr
    assert not (tmp_path / "v.kv").exists()


@pytest.mark.parametrize(
    ("damage", "message", "code"),
    [
        ("not-a-container", "not a kryptvault container", 1),
        ("truncated", "truncated", 1),
        ("both-copies", "both header copies are damaged", 1),
        ("future-version", "unknown format version", 1),
        ("missing", "no such file", 2),
        ("directory", "directory", 2),
    ],
)
def test_bad_containers_get_one_clean_line_and_a_nonzero_exit(
    tmp_path: Path, damage: str, message: str, code: int
) -> None:
    vault = make_vault(tmp_path)
    path = vault.container
    data = bytearray(path.read_bytes())
    if damage == "not-a-container":
        path.write_bytes(b"just some text\n" * 3000)
    elif damage == "truncated":
        path.write_bytes(bytes(data[:1000]))
    elif damage == "both-copies":
        data[200] ^= 0xFF
        data[HEADER_COPY_SIZE + 200] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "future-version":
        import hashlib

        for base in (0, HEADER_COPY_SIZE):
            data[base + 9] = 9
            data[base + HEADER_COPY_SIZE - 32 : base + HEADER_COPY_SIZE] = hashlib.sha256(
                bytes(data[base : base + HEADER_COPY_SIZE - 32])
            ).digest()
        path.write_bytes(bytes(data))
    elif damage == "missing":
        path.unlink()
    else:
        path.unlink()
        path.mkdir()
    for command in (["info", path], ["recovery-key", "add", path, *vault.pw()]):
        result = run_process(*command)
        assert result.returncode == code, result.stderr
        assert_clean_error(result.stderr)
        assert message in result.stderr


def test_one_damaged_header_copy_still_opens_and_says_so(tmp_path: Path) -> None:
    vault = make_vault(tmp_path)
    data = bytearray(vault.container.read_bytes())
    data[HEADER_COPY_SIZE + 5000] ^= 0x10
    vault.container.write_bytes(bytes(data))
    result = run_process("info", vault.container)
    assert result.returncode == 0
    assert "copy B (header checksum mismatch) is damaged; opened with copy A" in result.stderr
    added = run_process("recovery-key", "add", vault.container, *vault.pw())
    assert added.returncode == 0, added.stderr


def test_init_refuses_an_existing_file_unless_forced(tmp_path: Path) -> None:
    vault = make_vault(tmp_path)
    before = vault.container.read_bytes()
    again = run_process("init", vault.container, *vault.pw(), *FAST_KDF)
    assert again.returncode == 2 and "already exists" in again.stderr
    assert vault.container.read_bytes() == before
    forced = run_process("init", vault.container, *vault.pw(), *FAST_KDF, "--force")
    assert forced.returncode == 0, forced.stderr
    assert vault.container.read_bytes()[16:32] != before[16:32]


def test_missing_token_directory_is_refused_and_nothing_is_created(tmp_path: Path) -> None:
    pw = write_password_file(tmp_path / "pw", PASSWORD)
    result = run_process("init", tmp_path / "v.kv", "--token", tmp_path / "nope", "--password-file", pw)
    assert result.returncode != 0
    assert_clean_error(result.stderr)
    assert not (tmp_path / "v.kv").exists()


@pytest.mark.root
def test_read_only_token_directory_is_refused_and_nothing_is_created(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a read-only tmpfs")
    token = tmp_path / "ro-token"
    token.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(token)], check=True)
    try:
        pw = write_password_file(tmp_path / "pw", PASSWORD)
        result = run_process("init", tmp_path / "v.kv", "--token", token, "--password-file", pw, *FAST_KDF)
        assert result.returncode == 1
        assert_clean_error(result.stderr)
        assert "read-only" in result.stderr
        assert not (tmp_path / "v.kv").exists()
    finally:
        subprocess.run(["umount", str(token)], check=True)

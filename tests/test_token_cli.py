"""Token commands on directory tokens: add a backup token, open with either, revoke one,
and enrol a new token with the recovery key when no token is left."""

from __future__ import annotations

import re
from pathlib import Path

from cli_helpers import FAST_KDF, assert_clean_error, make_vault, run_process, write_password_file


def _opens(container: Path, token: Path, password_file: Path) -> bool:
    """`slot list` needs nothing; adding a recovery key proves the factors open the vault."""
    result = run_process("recovery-key", "add", container, "--token", token, "--password-file", password_file)
    return result.returncode == 0


def test_backup_token_opens_alone_and_a_revoked_token_no_longer_does(tmp_path: Path) -> None:
    vault = make_vault(tmp_path)
    backup = tmp_path / "backup-token"
    backup.mkdir()
    added = run_process(
        "token",
        "add",
        vault.container,
        "--token",
        backup,
        "--with-token",
        vault.token,
        "--password-file",
        vault.password_file,
        *FAST_KDF,
    )
    assert added.returncode == 0, added.stderr
    assert _opens(vault.container, backup, vault.password_file)
    assert _opens(vault.container, vault.token, vault.password_file)
    removed = run_process(
        "token", "remove", vault.container, "0", "--token", backup, "--password-file", vault.password_file
    )
    assert removed.returncode == 0, removed.stderr
    assert "Old header copies" in removed.stdout and "kryptvault rekey" in removed.stdout
    assert not _opens(vault.container, vault.token, vault.password_file)
    assert _opens(vault.container, backup, vault.password_file)


def test_removing_the_last_way_in_is_refused(tmp_path: Path) -> None:
    vault = make_vault(tmp_path)
    result = run_process(
        "token",
        "remove",
        vault.container,
        "0",
        "--token",
        vault.token,
        "--password-file",
        vault.password_file,
    )
    assert result.returncode == 2
    assert_clean_error(result.stderr)
    assert "last way into the vault" in result.stderr


def test_a_new_token_can_be_enrolled_with_the_recovery_key_when_all_tokens_are_lost(tmp_path: Path) -> None:
    vault = make_vault(tmp_path)
    added = run_process("recovery-key", "add", vault.container, *vault.pw())
    key = re.search(r"([A-Z2-7]{4}(?:-[A-Z2-7]{4}){7})", added.stdout)
    assert key
    key_file = tmp_path / "rk"
    key_file.write_text(key.group(1) + "\n")
    assert (
        run_process("slot", "remove", vault.container, "0", "--recovery-key-file", key_file).returncode == 0
    )
    new_token = tmp_path / "new-token"
    new_token.mkdir()
    new_pw = write_password_file(tmp_path / "new-pw", "a fresh passphrase here")
    enrolled = run_process(
        "token",
        "add",
        vault.container,
        "--token",
        new_token,
        "--recovery-key-file",
        key_file,
        "--password-file",
        new_pw,
        *FAST_KDF,
    )
    assert enrolled.returncode == 0, enrolled.stderr
    assert _opens(vault.container, new_token, new_pw)

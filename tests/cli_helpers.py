"""Running the real `kryptvault` command in tests: through click's runner and as a process."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from click.testing import CliRunner, Result
from needs import require_fuse

from kryptvault.cli.commands import cli

VENV_BIN = Path(sys.executable).parent
KRYPTVAULT = str(VENV_BIN / "kryptvault")
FAST_KDF = ["--kdf-time-ms", "30", "--kdf-memory-mib", "8"]
PASSWORD = "a long test password"


def run_cli(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def run_process(
    *args: str | Path,
    input_text: str | None = None,
    pass_fds: tuple[int, ...] = (),
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [KRYPTVAULT, *map(str, args)],
        env=env,
        input=input_text,
        capture_output=True,
        text=True,
        pass_fds=pass_fds,
        stdin=None if input_text is not None else subprocess.DEVNULL,
        timeout=120,
    )


def run_process_in(env: dict[str, str], *args: str | Path) -> subprocess.CompletedProcess[str]:
    """The command as another session would run it: `env` instead of the suite's own."""
    return run_process(*args, env=env)


@dataclass
class VaultFixture:
    dir: Path
    container: Path
    token: Path
    password_file: Path
    uuid: str

    def pw(self) -> list[str]:
        return ["--token", str(self.token), "--password-file", str(self.password_file)]


def make_vault(tmp: Path, password: str = PASSWORD, name: str = "vault.kv") -> VaultFixture:
    token = tmp / "token"
    token.mkdir(exist_ok=True)
    pw = tmp / f"pw-{name}"
    pw.write_text(password + "\n")
    container = tmp / name
    result = run_cli("init", container, "--token", token, "--password-file", pw, *FAST_KDF)
    assert result.exit_code == 0, result.output
    uuid = result.output.split()[2]
    return VaultFixture(tmp, container, token, pw, uuid)


def vault_and_dest(tmp: Path) -> tuple[VaultFixture, Path, Path]:
    """A fresh vault, an empty tmp/mnt to mount it on and an empty tmp/dest directory."""
    vault = make_vault(tmp)
    mnt = tmp / "mnt"
    mnt.mkdir()
    dest = tmp / "dest"
    dest.mkdir()
    return vault, mnt, dest


def mounted_vault_and_dest(tmp: Path) -> tuple[VaultFixture, Path, Path]:
    """A fresh vault mounted on tmp/mnt with the real CLI, and an empty tmp/dest directory.
    Without FUSE the test skips (fails under CI=true); with it, a mount that fails is a
    failure. The caller locks (`run_process("lock", mnt)`)."""
    require_fuse()
    vault, mnt, dest = vault_and_dest(tmp)
    mounted = run_process("mount", vault.container, mnt, *vault.pw())
    assert mounted.returncode == 0, mounted.stderr
    return vault, mnt, dest


def assert_clean_error(stderr: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("kryptvault: ")
    assert "Traceback" not in stderr


def write_password_file(path: Path, password: str) -> Path:
    path.write_text(password + "\n")
    os.chmod(path, 0o600)
    return path

"""The FIDO2 token through CTAPHID framing: python-fido2's own `CtapHidDevice` (INIT,
channels, fragmentation, keep-alive, cancel) in front of the software key, in-process
through the library's `CtapHidConnection` extension point; and, where the kernel has
uhid, as a real /dev/hidrawN found by the library's Linux backend and unplugged by the
kernel destroying it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import fido2_uhid
import pytest
from cli_helpers import FAST_KDF, PASSWORD, run_cli
from fido2.hid import CtapHidDevice
from fido2_hid import SoftHid, SoftHidConnection, descriptor_for
from fido2_soft import SoftAuthenticator

from kryptvault.crypto.secret import Secret
from kryptvault.session.unlock import unlock_container


@pytest.fixture
def hid_keys(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[SoftAuthenticator]]:
    keys: list[SoftAuthenticator] = []

    def listed(cls: type[CtapHidDevice]) -> Iterator[CtapHidDevice]:
        for key in list(keys):
            yield cls(descriptor_for(key), SoftHidConnection(SoftHid(key)))

    monkeypatch.setattr(CtapHidDevice, "list_devices", classmethod(listed))
    yield keys


def _vault(tmp_path: Path, spec: str = "fido2") -> tuple[Path, Path]:
    container, pw = tmp_path / "vault.kv", tmp_path / "pw"
    pw.write_text(PASSWORD + "\n")
    result = run_cli("init", container, "--token", spec, "--password-file", pw, *FAST_KDF)
    assert result.exit_code == 0, result.output
    return container, pw


def _open(container: Path) -> int:
    with unlock_container(
        container, token_spec=None, ask_password=lambda: Secret.from_bytes(PASSWORD.encode()),
        notice=lambda line: None,
    ) as unlocked:
        return unlocked.slot


def test_enrol_and_unlock_through_ctaphid_framing(tmp_path: Path, hid_keys: list[SoftAuthenticator]) -> None:
    key = SoftAuthenticator(pin="2468")
    hid_keys.append(key)
    container, pw = tmp_path / "vault.kv", tmp_path / "pw"
    pw.write_text(PASSWORD + "\n")
    pin = tmp_path / "pin"
    pin.write_text("2468\n")
    result = run_cli(
        "init", container, "--token", "fido2", "--password-file", pw, "--pin-file", pin, *FAST_KDF
    )
    assert result.exit_code == 0, result.output
    changed = run_cli(
        "passwd", container, "--password-file", pw, "--new-password-file", pw, "--pin-file", pin
    )
    assert changed.exit_code == 0, changed.output
    assert key.touches_wanted == 3


def test_an_untouched_key_is_cancelled_over_ctaphid_at_the_timeout(
    tmp_path: Path, hid_keys: list[SoftAuthenticator], monkeypatch: pytest.MonkeyPatch
) -> None:
    key = SoftAuthenticator()
    hid_keys.append(key)
    container, pw = _vault(tmp_path)
    key.auto_touch = False
    monkeypatch.setenv("KRYPTVAULT_TOUCH_TIMEOUT", "0.6")
    started = time.monotonic()
    result = run_cli("passwd", container, "--password-file", pw, "--new-password-file", pw)
    assert result.exit_code != 0
    last = result.output.strip().splitlines()[-1]
    assert last == "kryptvault: the security key was not touched within 0.6 s"
    assert time.monotonic() - started < 5
    # Touched while it waits (keep-alives flowing): it opens.
    monkeypatch.setenv("KRYPTVAULT_TOUCH_TIMEOUT", "10")
    threading.Timer(0.5, key.touch.set).start()
    assert _open(container) == 0


@pytest.mark.skipif(not fido2_uhid.available(), reason="needs /dev/uhid (the QEMU guest's kernel has it)")
def test_a_uhid_key_is_found_by_the_hidraw_backend_and_its_unplug_locks(tmp_path: Path) -> None:
    from kryptvault.token.fido2token import Fido2Token
    from kryptvault.watcher.watcher import TokenWatcher

    uhid = fido2_uhid.UhidKey(SoftAuthenticator())
    try:
        node = uhid.hidraw()
        assert any(str(d.descriptor.path) == node for d in CtapHidDevice.list_devices())
        container, _ = _vault(tmp_path, f"fido2:{node}")
        assert _open(container) == 0
        fired = threading.Event()
        routes: list[str] = []

        def on_removed(route: str) -> None:
            routes.append(route)
            fired.set()

        with TokenWatcher(Fido2Token(node), on_removed) as watcher:
            assert "uevent" in watcher.active_routes
            pulled = time.monotonic()
            uhid.destroy()
            assert fired.wait(2)
            assert time.monotonic() - pulled < 0.25
        # The kernel deletes /dev/hidrawN before it sends the remove uevent, so the poll
        # route may legitimately see it first (measured in the QEMU guest: 1-2 of 20).
        assert len(routes) == 1 and routes[0] in ("uevent", "poll")
    finally:
        uhid.destroy()

"""A FIDO2 security key as the token, against the software authenticator in fido2_soft.py.

The authenticator sits at python-fido2's own extension point (`CtapDevice`); the tests
plug it in where the library's HID discovery (`CtapHidDevice.list_devices`) would find a
real key, so everything from there on - `Fido2Client`, PIN protocol 2, hmac-secret, our
unlock, the keyslot, the CLI - is the real code.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_helpers import FAST_KDF, PASSWORD, run_cli
from fido2.hid import CtapHidDevice
from fido2_soft import SoftAuthenticator

from kryptvault.container.vault import read_container_header
from kryptvault.crypto.secret import Secret
from kryptvault.errors import AuthenticationError, TokenError
from kryptvault.session.unlock import fido2_identities, unlock_container
from kryptvault.token.fido2key import MAX_CREDENTIAL_ID, Fido2Identity


class Plugged:
    """The keys python-fido2's discovery reports; tests plug and unplug them."""

    def __init__(self) -> None:
        self.keys: list[SoftAuthenticator] = []

    def plug(self, *keys: SoftAuthenticator) -> None:
        self.keys.extend(keys)

    def unplug(self, key: SoftAuthenticator) -> None:
        self.keys.remove(key)


@pytest.fixture
def plugged(monkeypatch: pytest.MonkeyPatch) -> Iterator[Plugged]:
    state = Plugged()
    monkeypatch.setattr(CtapHidDevice, "list_devices", classmethod(lambda cls: iter(list(state.keys))))
    yield state


def _files(tmp_path: Path, pin: str | None = None) -> tuple[Path, Path, Path | None]:
    container = tmp_path / "vault.kv"
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD + "\n")
    pin_file = None
    if pin is not None:
        pin_file = tmp_path / "pin"
        pin_file.write_text(pin + "\n")
    return container, pw, pin_file


def _init(container: Path, pw: Path, pin_file: Path | None = None, spec: str = "fido2") -> None:
    extra = ["--pin-file", str(pin_file)] if pin_file else []
    result = run_cli("init", container, "--token", spec, "--password-file", pw, *FAST_KDF, *extra)
    assert result.exit_code == 0, result.output
    assert "Touch your security key" in result.output


def _open(container: Path, password: str = PASSWORD, pin: str | None = None) -> int:
    lines: list[str] = []
    with unlock_container(
        container,
        token_spec=None,
        ask_password=lambda: Secret.from_bytes(bytearray(password.encode())),
        ask_pin=(lambda: Secret.from_bytes(bytearray(pin.encode()))) if pin is not None else None,
        notice=lines.append,
    ) as unlocked:
        assert unlocked.fido2 is not None and unlocked.token is None
        assert lines == ["Touch your security key"]
        return unlocked.slot


def test_identity_encodes_canonically_and_refuses_what_is_not() -> None:
    identity = Fido2Identity(b"\x01" * 48, b"\x02" * 32, True)
    encoded = identity.encode()
    assert encoded.startswith(b"fido2:") and len(encoded) <= 200
    assert Fido2Identity.decode(encoded) == identity
    assert Fido2Identity(b"\x01" * 48, b"\x02" * 32, False).encode() != encoded  # the policy counts
    raw = Fido2Identity(b"\xff" * MAX_CREDENTIAL_ID, b"\0" * 32, False).encode()
    assert len(raw) <= 200
    with pytest.raises(TokenError):
        Fido2Identity(b"\xff" * (MAX_CREDENTIAL_ID + 1), b"\0" * 32, False)
    def b64(raw: bytes) -> bytes:
        return b"fido2:" + base64.urlsafe_b64encode(raw).rstrip(b"=")

    unknown_flag = b64(b"\x02" + bytes(32) + b"cred")
    no_credential = b64(b"\x01" + bytes(32))
    padded = b64(b"\x01" + bytes(32) + b"cred") + b"="
    loose_bits = b64(b"\x01" + bytes(32) + b"c")[:-1] + b"R"  # the same byte, unused bits set
    for bad in (padded, encoded[:-1] + b"*", unknown_flag, no_credential, loose_bits, b"fido2:", b"usb:x"):
        with pytest.raises(TokenError):
            Fido2Identity.decode(bad)


def test_init_with_a_key_opens_with_password_and_that_key_only(tmp_path: Path, plugged: Plugged) -> None:
    key = SoftAuthenticator()
    plugged.plug(key)
    container, pw, _ = _files(tmp_path)
    _init(container, pw)
    identity = fido2_identities(read_container_header(container).header)[0]
    assert not identity.uv  # no PIN on the key: presence only, fixed in the slot
    before = key.touches_wanted
    assert _open(container) == 0
    assert key.touches_wanted == before + 1 and key.silent_probes >= 1
    with pytest.raises(AuthenticationError):
        _open(container, password="not the password at all")
    # Another key (other device secret) cannot answer for the credential, even when told its id.
    plugged.unplug(key)
    plugged.plug(SoftAuthenticator())
    with pytest.raises(TokenError, match="none of the plugged security keys"):
        _open(container)
    plugged.keys.clear()
    with pytest.raises(TokenError, match="no FIDO2 security key is plugged in"):
        _open(container)


def test_slot_list_and_passwd_work_on_a_fido2_slot(tmp_path: Path, plugged: Plugged) -> None:
    plugged.plug(SoftAuthenticator())
    container, pw, _ = _files(tmp_path)
    _init(container, pw)
    listed = run_cli("slot", "list", container, "--json")
    assert listed.exit_code == 0, listed.output
    assert "FIDO2 key, credential" in listed.output
    new_pw = tmp_path / "pw2"
    new_pw.write_text("another long password 42\n")
    changed = run_cli("passwd", container, "--password-file", pw, "--new-password-file", new_pw)
    assert changed.exit_code == 0, changed.output
    assert _open(container, password="another long password 42") == 0
    with pytest.raises(AuthenticationError):
        _open(container)


def test_a_backup_key_is_found_by_a_silent_probe_and_opens_alone(tmp_path: Path, plugged: Plugged) -> None:
    first, backup = SoftAuthenticator(path="/dev/hidraw-a"), SoftAuthenticator(path="/dev/hidraw-b")
    plugged.plug(first)
    container, pw, _ = _files(tmp_path)
    _init(container, pw)
    plugged.plug(backup)
    # Both plugged: the new one is the key that holds none of the vault's credentials.
    added = run_cli("token", "add", container, "--new-token", "fido2", "--password-file", pw, "--json")
    assert added.exit_code == 0, added.output
    record = json.loads(added.output.strip().splitlines()[-1])
    assert record["slot"] == 1 and "/dev/hidraw-b" in record["authenticator"]
    # With both plugged, the unlock asks only the key that holds a credential to be touched.
    touches = (first.touches_wanted, backup.touches_wanted)
    assert _open(container) in (0, 1)
    assert first.touches_wanted + backup.touches_wanted == sum(touches) + 1
    plugged.unplug(first)
    assert _open(container) == 1
    again = run_cli("token", "add", container, "--new-token", "fido2", "--password-file", pw)
    assert again.exit_code != 0 and "already enrolled" in again.output
    named = run_cli("token", "add", container, "--new-token", "fido2:/dev/hidraw-b", "--password-file", pw)
    assert named.exit_code != 0 and "is already enrolled in this vault" in named.output
    removed = run_cli("token", "remove", container, "0", "--password-file", pw)
    assert removed.exit_code == 0, removed.output
    assert "FIDO2 key" in removed.output
    plugged.plug(first)
    plugged.unplug(backup)
    with pytest.raises(TokenError, match="none of the plugged security keys"):
        _open(container)


def test_a_key_with_a_pin_binds_the_pin_policy_and_a_wrong_pin_is_a_clear_error(
    tmp_path: Path, plugged: Plugged
) -> None:
    key = SoftAuthenticator(pin="4711")
    plugged.plug(key)
    container, pw, pin_file = _files(tmp_path, pin="4711")
    _init(container, pw, pin_file)
    assert fido2_identities(read_container_header(container).header)[0].uv
    assert _open(container, pin="4711") == 0
    wrong = tmp_path / "wrong-pin"
    wrong.write_text("0000\n")
    result = run_cli("passwd", container, "--password-file", pw, "--new-password-file", pw,
                     "--pin-file", wrong)
    assert result.exit_code != 0
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("kryptvault: wrong PIN for the security key")
    assert "attempts left" in last and "0000" not in result.output
    assert "Traceback" not in result.output
    no_pin = run_cli("passwd", container, "--password-file", pw, "--new-password-file", pw,
                     "--pin-file", tmp_path / "missing")
    assert no_pin.exit_code != 0 and "Traceback" not in no_pin.output


def test_a_key_that_is_not_touched_times_out_cleanly(
    tmp_path: Path, plugged: Plugged, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = SoftAuthenticator()
    plugged.plug(key)
    container, pw, _ = _files(tmp_path)
    _init(container, pw)
    key.auto_touch = False
    monkeypatch.setenv("KRYPTVAULT_TOUCH_TIMEOUT", "0.5")
    started = time.monotonic()
    result = run_cli("passwd", container, "--password-file", pw, "--new-password-file", pw)
    took = time.monotonic() - started
    assert result.exit_code != 0
    assert result.output.strip().splitlines()[-1] == (
        "kryptvault: the security key was not touched within 0.5 s"
    )
    assert took < 10
    # A touch in time opens it.
    monkeypatch.setenv("KRYPTVAULT_TOUCH_TIMEOUT", "10")
    key.touch.set()
    assert _open(container) == 0


def test_the_slot_key_needs_the_key_output_the_password_and_the_recorded_identity(
    tmp_path: Path, plugged: Plugged
) -> None:
    """Editing the identity recorded in the slot (here: dropping the PIN requirement)
    makes it open nothing: the identity is in the slot's AAD and in the KEK."""
    plugged.plug(SoftAuthenticator())
    container, pw, _ = _files(tmp_path)
    _init(container, pw)
    header = read_container_header(container).header
    slot = header.slots[0]
    assert slot is not None
    identity = Fido2Identity.decode(slot.token_identity)
    forged = Fido2Identity(identity.credential_id, identity.salt, not identity.uv).encode()
    data = bytearray(container.read_bytes())
    for copy in (0, 16384):
        at = data.index(slot.token_identity, copy)
        data[at : at + len(forged)] = forged
        body = bytes(data[copy : copy + 16352])
        data[copy + 16352 : copy + 16384] = hashlib.sha256(body).digest()
    container.write_bytes(bytes(data))
    with pytest.raises((AuthenticationError, TokenError)):
        _open(container)


def test_token_list_shows_fido2_keys_and_which_vault_they_open(tmp_path: Path, plugged: Plugged) -> None:
    enrolled, other = SoftAuthenticator(path="/dev/hidraw-e"), SoftAuthenticator(path="/dev/hidraw-o")
    plugged.plug(enrolled)
    container, pw, _ = _files(tmp_path)
    _init(container, pw)
    plugged.plug(other)
    vault = str(read_container_header(container).header.vault_uuid)
    listed = run_cli("token", "list", "--json", "--vault", container)
    assert listed.exit_code == 0, listed.output
    keys = {k["path"]: k for k in json.loads(listed.output) if k["kind"] == "fido2"}
    assert keys["/dev/hidraw-e"]["vaults"] == [vault]
    assert keys["/dev/hidraw-o"]["vaults"] == []
    assert keys["/dev/hidraw-e"]["vendor_id"] == "1209"
    text = run_cli("token", "list", "--vault", container)
    assert "/dev/hidraw-e" in text.output and vault in text.output
    assert enrolled.touches_wanted == 2  # enrolment's two; listing needs none


def test_enrolment_asks_the_pin_once_and_derives_what_the_key_computes_inside(plugged: Plugged) -> None:
    from kryptvault.cli.fido2_support import enrol_factor
    from kryptvault.token.fido2key import list_authenticators

    key = SoftAuthenticator(pin="13579")
    plugged.plug(key)
    asked: list[int] = []

    def ask_pin() -> Secret:
        asked.append(1)
        return Secret.from_bytes(bytearray(b"13579"))

    (auth,) = list_authenticators()
    factor = enrol_factor(auth, "label", ask_pin)
    identity = Fido2Identity.decode(factor.identity)
    with factor.secret, factor.secret.view() as view:
        assert bytes(view) == key.expected_hmac_secret(identity.credential_id, identity.salt, uv=True)
        assert bytes(view) != key.expected_hmac_secret(identity.credential_id, identity.salt, uv=False)
    assert asked == [1] and identity.uv and key.touches_wanted == 2
    assert factor.binding == identity.encode()


def test_rekey_keeps_the_key_slot_with_new_master_key_and_password(tmp_path: Path, plugged: Plugged) -> None:
    key, backup = SoftAuthenticator(path="/dev/hidraw-a"), SoftAuthenticator(path="/dev/hidraw-b")
    plugged.plug(key)
    container, pw, _ = _files(tmp_path)
    _init(container, pw)
    plugged.plug(backup)
    assert run_cli("token", "add", container, "--new-token", "fido2", "--password-file", pw).exit_code == 0
    plugged.unplug(backup)
    old_header = container.read_bytes()[:32768]
    new_pw = tmp_path / "pw2"
    new_pw.write_text("another long password 42\n")
    result = run_cli("rekey", container, "--password-file", pw, "--new-password-file", new_pw)
    assert result.exit_code == 0, result.output
    assert "kept slot 0" in result.output and "FIDO2 key" in result.output
    assert "dropped slot 1" in result.output  # the backup key: enrol it again
    assert _open(container, password="another long password 42") == 0
    with pytest.raises(AuthenticationError):
        _open(container)
    assert container.read_bytes()[:32768] != old_header


class U2fOnlyKey(SoftAuthenticator):
    """A key that answers no CTAP2 command (an old U2F-only key)."""

    def call(self, cmd: int, data: bytes = b"", event: object = None, on_keepalive: object = None) -> bytes:
        return bytes([0x01])  # CTAP1_ERR_INVALID_COMMAND


def test_a_key_that_cannot_answer_is_passed_over_and_named_when_it_is_the_only_one(
    tmp_path: Path, plugged: Plugged
) -> None:
    good = SoftAuthenticator(path="/dev/hidraw-good")
    plugged.plug(good)
    container, pw, _ = _files(tmp_path)
    _init(container, pw)
    plugged.keys.insert(0, U2fOnlyKey(path="/dev/hidraw-u2f"))
    assert _open(container) == 0
    listed = run_cli("token", "list", "--vault", container)
    assert listed.exit_code == 0 and "does not speak FIDO2" in listed.output
    plugged.unplug(good)
    with pytest.raises(TokenError, match="does not speak FIDO2"):
        _open(container)

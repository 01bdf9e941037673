"""A software CTAP2 authenticator behind python-fido2's own extension point (`CtapDevice`).

It is what a FIDO2 key is to the library: CBOR commands in, CBOR answers out. It does
make credential, get assertion (with `up=False` for the silent probe), hmac-secret over
PIN/UV auth protocol 2 (real P-256 ECDH, HKDF, AES-CBC, HMAC from `cryptography`, through
the library's own `PinProtocolV2`), and clientPIN (set, PIN token, retries). Like real
keys it keeps no per-credential state: a credential id is a random nonce with a MAC over
the relying party, and the credential's keys are derived from the device secret, so the
hmac-secret output is a function of the device secret, the credential, UV and the salt.
User presence is a `threading.Event` (`touch`) or `auto_touch`; without one the device
sends UPNEEDED keep-alives until the caller cancels (the client's timeout).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from fido2 import cbor
from fido2.cose import ES256
from fido2.ctap import STATUS, CtapDevice, CtapError
from fido2.ctap2.pin import PinProtocolV2
from fido2.hid import CAPABILITY, CTAPHID
from fido2.hid.base import HidDescriptor
from fido2.webauthn import AttestedCredentialData, AuthenticatorData

ERR = CtapError.ERR
FLAG = AuthenticatorData.FLAG
AAGUID = bytes.fromhex("6b76736f66742d6669646f322d746573")  # "kvsoft-fido2-tes"
PIN_RETRIES = 8
KeepAlive = Callable[[STATUS], None] | None


def _ecdh_public(x: bytes, y: bytes) -> ec.EllipticCurvePublicKey:
    numbers = ec.EllipticCurvePublicNumbers(
        int.from_bytes(x, "big"), int.from_bytes(y, "big"), ec.SECP256R1()
    )
    return numbers.public_key()


class SoftAuthenticator(CtapDevice):
    """One emulated security key. `device_secret` fixes its keys (for known answers)."""

    def __init__(
        self,
        *,
        device_secret: bytes | None = None,
        pin: str | None = None,
        auto_touch: bool = True,
        path: str = "/dev/hidraw-soft0",
        vid: int = 0x1209,
        pid: int = 0x4B56,
        product: str = "kryptvault soft key",
    ) -> None:
        self._secret = device_secret or os.urandom(32)
        self.auto_touch = auto_touch
        self.touch = threading.Event()
        self.descriptor = HidDescriptor(path, vid, pid, 64, 64, product, None)
        self._pin_hash: bytes | None = None
        self.pin_retries = PIN_RETRIES
        self._consecutive_bad_pins = 0
        self._pin_token: bytes | None = None
        self._protocol = PinProtocolV2()
        self._agreement = ec.generate_private_key(ec.SECP256R1())
        self.touches_wanted = 0  # how many operations asked for presence (for tests)
        self.silent_probes = 0
        self.calls: list[int] = []
        if pin is not None:
            self._pin_hash = hashlib.sha256(pin.encode()).digest()[:16]

    # ------------------------------------------------------------- CtapDevice
    @property
    def capabilities(self) -> int:
        return CAPABILITY.CBOR | CAPABILITY.NMSG

    @classmethod
    def list_devices(cls) -> Iterator[CtapDevice]:
        return iter(())  # the tests hand instances to the library's discovery

    def call(
        self,
        cmd: int,
        data: bytes = b"",
        event: threading.Event | None = None,
        on_keepalive: Callable[[STATUS], None] | None = None,
    ) -> bytes:
        if cmd != CTAPHID.CBOR:
            raise CtapError(ERR.INVALID_COMMAND)
        command = data[0]
        self.calls.append(command)
        args: dict[int, Any] = dict(cbor.decode(data[1:])) if len(data) > 1 else {}
        handlers: dict[int, Callable[..., dict[int, Any]]] = {
            0x01: self._make_credential,
            0x02: self._get_assertion,
            0x04: self._get_info,
            0x06: self._client_pin,
        }
        handler = handlers.get(command)
        try:
            if handler is None:
                raise CtapError(ERR.INVALID_COMMAND)
            answer = handler(args, event, on_keepalive)
        except CtapError as exc:
            return bytes([exc.code])
        return b"\x00" + (cbor.encode(answer) if answer else b"")

    # ------------------------------------------------------------- key material
    def _derive(self, label: bytes, data: bytes) -> bytes:
        return hmac.new(self._secret, label + data, hashlib.sha256).digest()

    def _credential_id(self, rp_id_hash: bytes) -> bytes:
        nonce = os.urandom(32)
        return nonce + self._derive(b"cred-mac", rp_id_hash + nonce)[:16]

    def _owns(self, cred_id: bytes, rp_id_hash: bytes) -> bool:
        if len(cred_id) != 48:
            return False
        mac = self._derive(b"cred-mac", rp_id_hash + cred_id[:32])[:16]
        return hmac.compare_digest(mac, cred_id[32:])

    def _private_key(self, cred_id: bytes) -> ec.EllipticCurvePrivateKey:
        scalar = int.from_bytes(self._derive(b"cred-key", cred_id), "big")
        return ec.derive_private_key(scalar % (2**255) + 1, ec.SECP256R1())

    def _cred_random(self, cred_id: bytes, uv: bool) -> bytes:
        # Two secrets per credential, as the spec requires: the output changes with UV.
        return self._derive(b"cred-random-uv" if uv else b"cred-random", cred_id)

    # ------------------------------------------------------------- presence, PIN
    def _wait_for_touch(
        self, event: threading.Event | None, on_keepalive: Callable[[STATUS], None] | None
    ) -> None:
        self.touches_wanted += 1
        if on_keepalive is not None:
            on_keepalive(STATUS.UPNEEDED)
        if self.auto_touch:
            return
        while not self.touch.wait(0.05):
            if event is not None and event.is_set():
                raise CtapError(ERR.KEEPALIVE_CANCEL)
        self.touch.clear()

    def _check_pin_auth(self, args: dict[int, Any], param_key: int, proto_key: int, cdh: bytes) -> bool:
        param = args.get(param_key)
        if param is None:
            return False
        if args.get(proto_key) != 2:
            raise CtapError(ERR.INVALID_PARAMETER)
        if self._pin_token is None:
            raise CtapError(ERR.PIN_AUTH_INVALID)
        expected = self._protocol.authenticate(self._pin_token, cdh)
        if not hmac.compare_digest(expected, param):
            raise CtapError(ERR.PIN_AUTH_INVALID)
        return True

    def _shared_secret(self, platform_key: dict[int, Any]) -> bytes:
        peer = _ecdh_public(platform_key[-2], platform_key[-3])
        return bytes(self._protocol.kdf(self._agreement.exchange(ec.ECDH(), peer)))

    # ------------------------------------------------------------- commands
    def _get_info(self, args: dict[int, Any], *_: object) -> dict[int, Any]:
        return {
            1: ["FIDO_2_0", "FIDO_2_1"],
            2: ["hmac-secret"],
            3: AAGUID,
            4: {"rk": False, "up": True, "clientPin": self._pin_hash is not None, "pinUvAuthToken": True},
            5: 1200,
            6: [2],
            7: 8,
            8: 128,
        }

    def _client_pin(self, args: dict[int, Any], *_: object) -> dict[int, Any]:
        if args.get(1) != 2:
            raise CtapError(ERR.INVALID_PARAMETER)
        sub = args.get(2)
        if sub == 0x01:
            return {3: self.pin_retries}
        if sub == 0x02:
            pn = self._agreement.public_key().public_numbers()
            return {1: {1: 2, 3: -25, -1: 1, -2: pn.x.to_bytes(32, "big"), -3: pn.y.to_bytes(32, "big")}}
        if sub == 0x03:
            if self._pin_hash is not None:
                raise CtapError(ERR.PIN_AUTH_INVALID)
            shared = self._shared_secret(args[3])
            if not hmac.compare_digest(self._protocol.authenticate(shared, args[5]), args[4]):
                raise CtapError(ERR.PIN_AUTH_INVALID)
            padded = self._protocol.decrypt(shared, args[5])
            self._pin_hash = hashlib.sha256(padded.rstrip(b"\0")).digest()[:16]
            return {}
        if sub in (0x05, 0x09):
            if self._pin_hash is None:
                raise CtapError(ERR.PIN_NOT_SET)
            if self.pin_retries == 0:
                raise CtapError(ERR.PIN_BLOCKED)
            if self._consecutive_bad_pins >= 3:
                raise CtapError(ERR.PIN_AUTH_BLOCKED)
            shared = self._shared_secret(args[3])
            given = self._protocol.decrypt(shared, args[6])
            if not hmac.compare_digest(given, self._pin_hash):
                self.pin_retries -= 1
                self._consecutive_bad_pins += 1
                if self.pin_retries == 0:
                    raise CtapError(ERR.PIN_BLOCKED)
                raise CtapError(ERR.PIN_AUTH_BLOCKED if self._consecutive_bad_pins >= 3 else ERR.PIN_INVALID)
            self.pin_retries = PIN_RETRIES
            self._consecutive_bad_pins = 0
            self._pin_token = os.urandom(32)
            return {2: self._protocol.encrypt(shared, self._pin_token)}
        raise CtapError(ERR.INVALID_SUBCOMMAND)

    def _make_credential(
        self, args: dict[int, Any], event: threading.Event | None, on_keepalive: KeepAlive
    ) -> dict[int, Any]:
        cdh, rp = args[1], args[2]
        if not any(p.get("alg") == -7 for p in args[4]):
            raise CtapError(ERR.UNSUPPORTED_ALGORITHM)
        uv = self._check_pin_auth(args, 8, 9, cdh)
        if self._pin_hash is not None and not uv:
            raise CtapError(ERR.PUAT_REQUIRED)
        rp_id_hash = hashlib.sha256(rp["id"].encode()).digest()
        for excluded in args.get(5) or []:
            if self._owns(excluded["id"], rp_id_hash):
                self._wait_for_touch(event, on_keepalive)
                raise CtapError(ERR.CREDENTIAL_EXCLUDED)
        self._wait_for_touch(event, on_keepalive)
        cred_id = self._credential_id(rp_id_hash)
        public = ES256.from_cryptography_key(self._private_key(cred_id).public_key())
        extensions = {"hmac-secret": True} if (args.get(6) or {}).get("hmac-secret") else None
        flags = FLAG.UP | FLAG.AT | (FLAG.UV if uv else 0) | (FLAG.ED if extensions else 0)
        auth_data = AuthenticatorData.create(
            rp_id_hash, flags, 0, AttestedCredentialData.create(AAGUID, cred_id, public), extensions
        )
        return {1: "none", 2: auth_data, 3: {}}

    def _get_assertion(
        self, args: dict[int, Any], event: threading.Event | None, on_keepalive: KeepAlive
    ) -> dict[int, Any]:
        rp_id, cdh = args[1], args[2]
        rp_id_hash = hashlib.sha256(rp_id.encode()).digest()
        options = args.get(5) or {}
        up = options.get("up", True)
        uv = self._check_pin_auth(args, 6, 7, cdh)
        mine = [c["id"] for c in args.get(3) or [] if self._owns(c["id"], rp_id_hash)]
        if not up:
            self.silent_probes += 1
        if not mine:
            if up:
                self._wait_for_touch(event, on_keepalive)
            raise CtapError(ERR.NO_CREDENTIALS)
        cred_id = mine[0]
        extensions: dict[str, Any] | None = None
        hmac_input = (args.get(4) or {}).get("hmac-secret")
        if hmac_input is not None:
            if not up:
                raise CtapError(ERR.UNSUPPORTED_OPTION)  # hmac-secret needs presence
            shared = self._shared_secret(hmac_input[1])
            if hmac_input.get(4) != 2:
                raise CtapError(ERR.INVALID_PARAMETER)
            if not hmac.compare_digest(self._protocol.authenticate(shared, hmac_input[2]), hmac_input[3]):
                raise CtapError(ERR.EXTENSION_FIRST)
            salts = self._protocol.decrypt(shared, hmac_input[2])
            if len(salts) not in (32, 64):
                raise CtapError(ERR.INVALID_LENGTH)
            key = self._cred_random(cred_id, uv)
            output = b"".join(
                hmac.new(key, salts[i : i + 32], hashlib.sha256).digest() for i in range(0, len(salts), 32)
            )
            extensions = {"hmac-secret": self._protocol.encrypt(shared, output)}
        if up:
            self._wait_for_touch(event, on_keepalive)
        flags = (FLAG.UP if up else 0) | (FLAG.UV if uv else 0) | (FLAG.ED if extensions else 0)
        auth_data = AuthenticatorData.create(rp_id_hash, flags, 1, b"", extensions)
        signature = self._private_key(cred_id).sign(auth_data + cdh, ec.ECDSA(hashes.SHA256()))
        return {1: {"type": "public-key", "id": cred_id}, 2: auth_data, 3: signature}

    # ------------------------------------------------------------- for known answers
    def expected_hmac_secret(self, cred_id: bytes, salt: bytes, uv: bool) -> bytes:
        """What the key computes inside (HMAC-SHA256(CredRandom, salt)): for asserting
        that what came out of the client, through the encrypted channel, is that."""
        return hmac.new(self._cred_random(cred_id, uv), salt, hashlib.sha256).digest()


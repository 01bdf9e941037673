"""A FIDO2 security key as the token: its `hmac-secret` output is the token's secret.

The key computes HMAC-SHA256(CredRandom, salt) inside; CredRandom never leaves it, so
unlike a stick's share file the token factor cannot be copied. A keyslot records a
`Fido2Identity` (credential id, salt, whether user verification - the PIN - is required);
docs/TOKEN.md and docs/FORMAT.md give its bytes. Everything CTAP goes through
python-fido2 (`Fido2Client` for the touch and the hmac-secret, `Ctap2` for the silent
probe): no CTAP or CBOR of our own.

The library hands the PIN on as `str` and the hmac-secret output as `bytes` (immutable,
not wipeable); we keep both only as long as the call needs them and copy the output into
a `Secret` at once.
"""

from __future__ import annotations

import base64
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from fido2.client import ClientError, DefaultClientDataCollector, Fido2Client, UserInteraction
from fido2.ctap import CtapDevice, CtapError
from fido2.ctap2.base import Ctap2
from fido2.ctap2.extensions import HmacSecretExtension
from fido2.ctap2.pin import ClientPin
from fido2.hid import ConnectionFailure, CtapHidDevice

from kryptvault.crypto.secret import Secret
from kryptvault.errors import TokenError
from kryptvault.token.base import MAX_ENCODED_IDENTITY, printable

RP_ID = "kryptvault"
ORIGIN = "https://kryptvault"
PREFIX = b"fido2:"
FIDO2_SPEC = "fido2"
SALT_LEN = 32
FLAG_UV = 0x01
# 194 base64url characters fit after the prefix: 145 bytes, 33 of them flags and salt.
MAX_CREDENTIAL_ID = (MAX_ENCODED_IDENTITY - len(PREFIX)) * 3 // 4 - 1 - SALT_LEN
DEFAULT_TOUCH_TIMEOUT = 30.0
TOUCH_PROMPT = "Touch your security key"

AskPin = Callable[[], Secret]
Notice = Callable[[str], None]


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _unb64(text: bytes) -> bytes:
    if not text or len(text) % 4 == 1:
        raise ValueError("bad base64url length")
    raw = base64.urlsafe_b64decode(text + b"=" * (-len(text) % 4))
    if _b64(raw) != text:
        raise ValueError("not canonical base64url")
    return raw


@dataclass(frozen=True)
class Fido2Identity:
    """What a FIDO2 keyslot records: public, but bound into the slot (AAD and KEK)."""

    credential_id: bytes
    salt: bytes
    uv: bool  # the PIN (user verification) is required: the key was enrolled with it

    def __post_init__(self) -> None:
        if len(self.salt) != SALT_LEN:
            raise TokenError("a FIDO2 salt is 32 bytes")
        if not 1 <= len(self.credential_id) <= MAX_CREDENTIAL_ID:
            raise TokenError(
                f"the security key's credential id is {len(self.credential_id)} bytes; "
                f"a keyslot holds at most {MAX_CREDENTIAL_ID}"
            )

    @property
    def kind(self) -> str:
        return "fido2"

    def encode(self) -> bytes:
        return PREFIX + _b64(bytes([FLAG_UV if self.uv else 0]) + self.salt + self.credential_id)

    @classmethod
    def decode(cls, data: bytes) -> Fido2Identity:
        bad = TokenError("the FIDO2 identity recorded in the keyslot is not valid")
        if not data.startswith(PREFIX) or len(data) > MAX_ENCODED_IDENTITY:
            raise bad
        try:
            raw = _unb64(data[len(PREFIX) :])
        except (ValueError, TypeError):
            raise bad
        if len(raw) < 1 + SALT_LEN + 1 or raw[0] & ~FLAG_UV:
            raise bad
        identity = cls(raw[1 + SALT_LEN :], raw[1 : 1 + SALT_LEN], bool(raw[0] & FLAG_UV))
        if identity.encode() != data:
            raise bad
        return identity

    @staticmethod
    def recorded(data: bytes) -> bool:
        """Whether a keyslot's identity field is a FIDO2 one (valid or not)."""
        return data.startswith(PREFIX)

    def binding(self) -> bytes:
        """Mixed into the KEK: the whole identity, so credential, salt and policy all count."""
        return self.encode()

    def describe(self) -> str:
        policy = "PIN and touch" if self.uv else "touch"
        return f"FIDO2 key, credential {self.credential_id[:4].hex()}… ({policy})"


@dataclass
class Authenticator:
    """One plugged FIDO2 key, as python-fido2 found it."""

    device: CtapDevice
    path: str
    vendor_id: int | None
    product_id: int | None
    product: str | None

    def describe(self) -> str:
        ids = (
            f"{self.vendor_id:04x}:{self.product_id:04x} "
            if self.vendor_id is not None and self.product_id is not None
            else ""
        )
        return printable(f"{ids}{self.product or 'FIDO2 key'} at {self.path}")

    def has_pin(self) -> bool:
        return bool(_ctap2(self).info.options.get("clientPin"))

    def holds(self, identity: Fido2Identity) -> bool:
        """Whether this key made `identity`'s credential: an assertion without user
        presence (no touch, no PIN), which a key answers only for its own credentials."""
        try:
            _ctap2(self).get_assertion(
                RP_ID,
                bytes(32),
                [{"type": "public-key", "id": identity.credential_id}],
                options={"up": False},
            )
        except CtapError as exc:
            if exc.code == CtapError.ERR.NO_CREDENTIALS:
                return False
            raise TokenError(f"the security key {self.describe()} failed: {_ctap_reason(exc)}")
        except OSError as exc:
            raise TokenError(f"the security key {self.describe()} stopped answering: {exc.strerror or exc}")
        except ConnectionFailure as exc:
            raise TokenError(f"the security key {self.describe()} stopped answering: {exc}")
        return True

    def close(self) -> None:
        """Let go of the key: every open handle of a hidraw node gets a copy of each
        reply, so a handle left open confuses the next one opened on the same key."""
        close = getattr(self.device, "close", None)
        if close is not None:
            close()


def _ctap2(auth: Authenticator) -> Ctap2:
    try:
        return Ctap2(auth.device)
    except (CtapError, ValueError) as exc:
        raise TokenError(f"{auth.describe()} does not speak FIDO2 (CTAP2): {exc}")


def list_authenticators() -> list[Authenticator]:
    """The plugged FIDO2 keys (python-fido2's HID discovery: /dev/hidraw* on Linux)."""
    found = []
    try:
        devices = list(CtapHidDevice.list_devices())
    except OSError as exc:
        raise TokenError(f"cannot list FIDO2 security keys: {exc.strerror or exc}")
    except ConnectionFailure as exc:
        raise TokenError(f"a FIDO2 security key did not answer: {exc}")
    for device in devices:
        descriptor = getattr(device, "descriptor", None)
        path = getattr(descriptor, "path", "?")
        found.append(
            Authenticator(
                device,
                path.decode(errors="replace") if isinstance(path, bytes) else str(path),
                getattr(descriptor, "vid", None),
                getattr(descriptor, "pid", None),
                getattr(descriptor, "product_name", None),
            )
        )
    return found


def is_fido2_spec(spec: str | None) -> bool:
    """`--token fido2` (any plugged key) or `--token fido2:/dev/hidrawN` (that one)."""
    return spec is not None and (spec == FIDO2_SPEC or spec.startswith(FIDO2_SPEC + ":/"))


def authenticators_for(spec: str | None) -> list[Authenticator]:
    """The plugged keys `spec` allows: all of them, or the one at the path it names."""
    plugged = list_authenticators()
    if spec is None or spec == FIDO2_SPEC:
        return plugged
    path = spec[len(FIDO2_SPEC) + 1 :]
    chosen = [a for a in plugged if a.path == path]
    if not chosen:
        others = "; ".join(a.describe() for a in plugged) or "none is plugged in"
        raise TokenError(f"no FIDO2 security key at {printable(path)} ({others})")
    return chosen


def find_holder(
    authenticators: Iterable[Authenticator], identities: Iterable[Fido2Identity]
) -> tuple[Authenticator, Fido2Identity] | None:
    """The first plugged key that holds one of the credentials, found without a touch.
    A key that cannot answer (a U2F-only key, one that stopped answering) is passed
    over; if no key holds one and some could not answer, the first such error is raised."""
    wanted = list(identities)
    errors: list[TokenError] = []
    for auth in authenticators:
        try:
            for identity in wanted:
                if auth.holds(identity):
                    return auth, identity
        except TokenError as exc:
            errors.append(exc)
    if errors:
        raise errors[0]
    return None


def touch_timeout() -> float:
    """KRYPTVAULT_TOUCH_TIMEOUT (seconds, 1..600), else 30 s."""
    text = os.environ.get("KRYPTVAULT_TOUCH_TIMEOUT")
    if not text:
        return DEFAULT_TOUCH_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        raise TokenError("KRYPTVAULT_TOUCH_TIMEOUT must be a number of seconds")
    if not 0.1 <= value <= 600:
        raise TokenError("KRYPTVAULT_TOUCH_TIMEOUT must be between 0.1 and 600 seconds")
    return value


class _Interaction(UserInteraction):
    """Says when to touch, and asks for the PIN only when the library needs it."""

    def __init__(self, ask_pin: AskPin | None, notice: Notice | None) -> None:
        self._ask_pin = ask_pin
        self._notice = notice
        self.prompted = False

    def prompt_up(self) -> None:
        if self._notice is not None and not self.prompted:
            self._notice(TOUCH_PROMPT)
        self.prompted = True

    def request_pin(self, permissions: ClientPin.PERMISSION, rp_id: str | None) -> str | None:
        if self._ask_pin is None:
            return None
        # python-fido2 takes the PIN as str; it lives only for this call.
        with self._ask_pin() as pin, pin.view() as view:
            try:
                return str(view, "utf-8")
            except UnicodeDecodeError:
                raise TokenError("the PIN is not valid UTF-8") from None

    def request_uv(self, permissions: ClientPin.PERMISSION, rp_id: str | None) -> bool:
        return True


def _ctap_reason(exc: CtapError) -> str:
    code = exc.code
    reasons = {
        CtapError.ERR.PIN_INVALID: "wrong PIN",
        CtapError.ERR.PIN_BLOCKED: "the PIN is blocked (too many wrong PINs; the key must be reset)",
        CtapError.ERR.PIN_AUTH_BLOCKED: "too many wrong PINs: unplug the key and plug it in again",
        CtapError.ERR.PIN_NOT_SET: "the key has no PIN",
        CtapError.ERR.PUAT_REQUIRED: "the key needs its PIN",
        CtapError.ERR.OPERATION_DENIED: "the key refused",
        CtapError.ERR.NO_CREDENTIALS: "the key does not hold this vault's credential",
        CtapError.ERR.KEEPALIVE_CANCEL: "cancelled",
    }
    return reasons.get(code, f"CTAP error 0x{int(code):02x}")


def _client_error(exc: ClientError, auth: Authenticator, timeout: float) -> TokenError:
    if exc.code == ClientError.ERR.TIMEOUT:
        return TokenError(f"the security key was not touched within {timeout:g} s")
    cause = exc.cause
    if isinstance(cause, CtapError):
        if cause.code == CtapError.ERR.PIN_INVALID:
            retries = _pin_retries(auth)
            left = f" ({retries} attempts left before the key blocks its PIN)" if retries is not None else ""
            return TokenError(f"wrong PIN for the security key{left}")
        return TokenError(f"the security key {auth.describe()} failed: {_ctap_reason(cause)}")
    if exc.code == ClientError.ERR.BAD_REQUEST and "PIN required" in str(cause):
        return TokenError("the security key needs its PIN, and none was given")
    if exc.code == ClientError.ERR.CONFIGURATION_UNSUPPORTED:
        return TokenError(f"the security key {auth.describe()} cannot do this: {printable(str(cause))}")
    return TokenError(f"the security key {auth.describe()} failed ({exc.code.name.lower()})")


def _pin_retries(auth: Authenticator) -> int | None:
    try:
        return ClientPin(_ctap2(auth)).get_pin_retries()[0]
    except (CtapError, ValueError, TokenError, OSError):
        return None


def _client(auth: Authenticator, interaction: _Interaction) -> Fido2Client:
    return Fido2Client(
        auth.device,
        client_data_collector=DefaultClientDataCollector(ORIGIN),
        user_interaction=interaction,
        extensions=[HmacSecretExtension(allow_hmac_secret=True)],  # type: ignore[no-untyped-call]
    )


def _run(auth: Authenticator, timeout: float, call: Callable[[threading.Event], object]) -> object:
    """Run one client call that may wait for a touch; cancel it after `timeout`."""
    cancel = threading.Event()
    timer = threading.Timer(timeout, cancel.set)
    timer.daemon = True
    timer.start()
    try:
        return call(cancel)
    except ClientError as exc:
        raise _client_error(exc, auth, timeout)
    except CtapError as exc:
        raise TokenError(f"the security key {auth.describe()} failed: {_ctap_reason(exc)}")
    except OSError as exc:
        raise TokenError(f"the security key {auth.describe()} stopped answering: {exc.strerror or exc}")
    except ConnectionFailure as exc:
        raise TokenError(f"the security key {auth.describe()} stopped answering: {exc}")
    finally:
        timer.cancel()


def enroll(
    auth: Authenticator,
    *,
    ask_pin: AskPin | None,
    notice: Notice | None,
    vault_label: str = "vault",
    timeout: float | None = None,
) -> Fido2Identity:
    """Make a non-resident credential with hmac-secret on `auth` (one touch; the PIN
    when the key has one, which then becomes the slot's policy)."""
    timeout = touch_timeout() if timeout is None else timeout
    info = _ctap2(auth).info
    if HmacSecretExtension.NAME not in info.extensions:
        raise TokenError(f"the security key {auth.describe()} has no hmac-secret extension")
    uv = bool(info.options.get("clientPin"))
    interaction = _Interaction(ask_pin, notice)
    client = _client(auth, interaction)
    options = {
        "rp": {"id": RP_ID, "name": "kryptvault"},
        "user": {"id": os.urandom(16), "name": vault_label[:64] or "vault"},
        "challenge": os.urandom(32),
        "pubKeyCredParams": [{"type": "public-key", "alg": -7}, {"type": "public-key", "alg": -8}],
        "authenticatorSelection": {
            "residentKey": "discouraged",
            "userVerification": "required" if uv else "discouraged",
        },
        "extensions": {"hmacCreateSecret": True},
    }

    def make(cancel: threading.Event) -> object:
        return client.make_credential(options, event=cancel)  # type: ignore[arg-type]

    result = _run(auth, timeout, make)
    response = getattr(result, "response", None)
    outputs = getattr(result, "client_extension_results", None)
    if outputs is None or not outputs.get("hmacCreateSecret"):
        raise TokenError(f"the security key {auth.describe()} did not enable hmac-secret for the credential")
    auth_data = response.attestation_object.auth_data if response is not None else None
    credential = auth_data.credential_data if auth_data is not None else None
    if credential is None:
        raise TokenError(f"the security key {auth.describe()} returned no credential")
    return Fido2Identity(bytes(credential.credential_id), os.urandom(SALT_LEN), uv)


def hmac_secret(
    auth: Authenticator,
    identity: Fido2Identity,
    *,
    ask_pin: AskPin | None,
    notice: Notice | None,
    timeout: float | None = None,
) -> Secret:
    """The key's HMAC of the slot's salt under the credential (a touch; the PIN if the
    slot requires it). Returned in a `Secret`; wipe it."""
    timeout = touch_timeout() if timeout is None else timeout
    interaction = _Interaction(ask_pin if identity.uv else None, notice)
    client = _client(auth, interaction)
    options = {
        "rpId": RP_ID,
        "challenge": os.urandom(32),
        "allowCredentials": [{"type": "public-key", "id": identity.credential_id}],
        # The key answers with a different secret with and without UV (CredRandomWithUV):
        # the policy recorded at enrolment is what is asked, never the key's current mood.
        "userVerification": "required" if identity.uv else "discouraged",
        "extensions": {"hmacGetSecret": {"salt1": identity.salt}},
    }

    def get(cancel: threading.Event) -> object:
        return client.get_assertion(options, event=cancel)  # type: ignore[arg-type]

    selection = _run(auth, timeout, get)
    try:
        response = selection.get_response(0)  # type: ignore[attr-defined]
    except (IndexError, ValueError) as exc:
        raise TokenError(f"the security key {auth.describe()} gave no assertion: {exc}")
    flags = response.response.authenticator_data.flags
    if identity.uv and not flags & 0x04:
        raise TokenError("the security key did not verify the PIN, which this keyslot requires")
    if not identity.uv and flags & 0x04:
        # hmac-secret differs with UV: this output would not open the slot.
        raise TokenError("the security key verified a PIN this keyslot was enrolled without; "
                         "it derives another secret then (remove the key's alwaysUv setting)")
    output = response.client_extension_results.hmac_get_secret
    value = getattr(output, "output1", None)
    if not isinstance(value, bytes) or len(value) != 32:
        raise TokenError(f"the security key {auth.describe()} returned no hmac-secret")
    buffer = bytearray(value)
    del value
    try:
        return Secret.from_bytes(buffer)
    finally:
        buffer[:] = bytes(len(buffer))

"""TokenIdentity: the public description of a token that a keyslot records."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kryptvault.errors import KryptvaultError, TokenError
from kryptvault.token import TokenIdentity

SAFE = st.text(alphabet="ABCDEFabcdef0123456789-._", min_size=1, max_size=40)

identities = st.one_of(
    st.just(TokenIdentity("dir")),
    st.builds(lambda u: TokenIdentity("fs", fs_uuid=u), SAFE),
    st.builds(
        lambda v, p, s, u: TokenIdentity("usb", vendor_id=v, product_id=p, serial=s, fs_uuid=u),
        st.integers(0, 0xFFFF),
        st.integers(0, 0xFFFF),
        st.text(min_size=1, max_size=30),
        st.none() | SAFE,
    ),
)


def test_usb_identity_encodes_to_the_documented_form() -> None:
    ident = TokenIdentity("usb", vendor_id=0x46F4, product_id=1, serial="TOKEN-1234", fs_uuid="1234-ABCD")
    assert ident.encode() == b"usb:46f4:0001:TOKEN-1234:1234-ABCD"
    assert ident.describe() == "USB 46f4:0001 serial TOKEN-1234 (fs 1234-ABCD)"
    assert ident.binding() == b"usb-serial:TOKEN-1234"


def test_fs_and_dir_identities_encode_and_bind_as_documented() -> None:
    fs = TokenIdentity("fs", fs_uuid="0f1e2d3c-aaaa-bbbb-cccc-000011112222")
    assert fs.encode() == b"fs:0f1e2d3c-aaaa-bbbb-cccc-000011112222"
    assert fs.binding() == b"fs-uuid:0f1e2d3c-aaaa-bbbb-cccc-000011112222"
    d = TokenIdentity("dir", path="/media/stick/keys")
    assert d.encode() == b"dir"
    assert d.binding() == b""
    assert "/media/stick/keys" in d.describe()


@given(identities)
def test_every_identity_round_trips_through_its_encoding(ident: TokenIdentity) -> None:
    try:
        data = ident.encode()
    except TokenError:
        return  # too long: refused, checked below
    assert len(data) <= 200
    assert TokenIdentity.decode(data) == ident


def test_a_serial_with_separators_cannot_shift_the_fields() -> None:
    ident = TokenIdentity("usb", vendor_id=1, product_id=2, serial="A:B%C\n")
    data = ident.encode()
    assert data.count(b":") == 3
    assert TokenIdentity.decode(data).serial == "A:B%C\n"
    assert "\n" not in ident.describe()


def test_an_identity_longer_than_200_bytes_is_refused() -> None:
    ident = TokenIdentity("usb", vendor_id=1, product_id=2, serial="é" * 40)
    with pytest.raises(TokenError, match="too long"):
        ident.encode()


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"dir:x",
        b"usb:46F4:0001:S",  # upper-case hex is not canonical
        b"usb:46f4:1:S",
        b"usb:46f4:0001:",
        b"usb:46f4:0001:S:U:extra",
        b"usb:46f4:0001:A%3a",  # lower-case escape is not canonical
        b"usb:46f4:0001:A%Z1",
        b"fs:",
        b"fs:a b",
        b"nfc:1234",
        b"\xff\xfe",
        b"fs:" + b"a" * 300,
    ],
)
def test_malformed_recorded_identities_are_a_token_error(data: bytes) -> None:
    with pytest.raises(TokenError, match="not valid"):
        TokenIdentity.decode(data)


@given(st.binary(max_size=80))
def test_decoding_arbitrary_bytes_never_raises_anything_but_token_error(data: bytes) -> None:
    try:
        ident = TokenIdentity.decode(data)
    except KryptvaultError as exc:
        assert isinstance(exc, TokenError)
    else:
        assert ident.encode() == data


def test_identity_fields_are_checked_on_construction() -> None:
    with pytest.raises(TokenError):
        TokenIdentity("usb", vendor_id=1, product_id=2, serial="")
    with pytest.raises(TokenError):
        TokenIdentity("usb", vendor_id=0x10000, product_id=2, serial="S")
    with pytest.raises(TokenError):
        TokenIdentity("fs", fs_uuid="a/b")
    with pytest.raises(TokenError):
        TokenIdentity("floppy")


def test_matching_ignores_the_usb_filesystem_hint_and_fs_uuid_case() -> None:
    a = TokenIdentity("usb", vendor_id=1, product_id=2, serial="S", fs_uuid="1234-ABCD")
    b = TokenIdentity("usb", vendor_id=1, product_id=2, serial="S", fs_uuid=None)
    assert a.matches(b)
    assert not a.matches(TokenIdentity("usb", vendor_id=1, product_id=2, serial="T"))
    assert TokenIdentity("fs", fs_uuid="1234-abcd").matches(TokenIdentity("fs", fs_uuid="1234-ABCD"))

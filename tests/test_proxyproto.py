"""The PROXY protocol parser, without I/O: examples from the specification,
and hypothesis over any bytes, cut anywhere."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_upper.proxyproto import (
    MAX_V1_LENGTH,
    MAX_V2_LENGTH,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyProtocolError,
    parse,
)


def v2(
    command: int = 0x1,
    family: int = 0x1,
    transport: int = 0x1,
    addresses: bytes = b"",
    tlvs: bytes = b"",
    version: int = 2,
) -> bytes:
    """A version 2 header, built from the specification's fields."""
    body = addresses + tlvs
    return (
        V2_SIGNATURE
        + struct.pack("!BBH", version << 4 | command, family << 4 | transport, len(body))
        + body
    )


def inet(source: str, destination: str, source_port: int, destination_port: int) -> bytes:
    return (
        ipaddress.ip_address(source).packed
        + ipaddress.ip_address(destination).packed
        + struct.pack("!HH", source_port, destination_port)
    )


# --- Examples --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (
            b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 12000\r\n",
            ProxyHeader(1, ("192.0.2.1", 56324), ("198.51.100.2", 12000), 47),
        ),
        (
            b"PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n",
            ProxyHeader(1, ("2001:db8::1", 1), ("2001:db8::2", 65535), 44),
        ),
        (b"PROXY UNKNOWN\r\n", ProxyHeader(1, None, None, 15)),
        (
            b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n",
            ProxyHeader(1, None, None, 59),
        ),
        (
            v2(addresses=inet("192.0.2.1", "198.51.100.2", 56324, 12000)),
            ProxyHeader(2, ("192.0.2.1", 56324), ("198.51.100.2", 12000), 28),
        ),
        (
            v2(family=0x2, addresses=inet("2001:db8::1", "2001:db8::2", 7, 8)),
            ProxyHeader(2, ("2001:db8::1", 7), ("2001:db8::2", 8), 52),
        ),
        (
            # UDP over IPv4, with a TLV (type 0x04, NOOP) after the addresses.
            v2(
                transport=0x2,
                addresses=inet("192.0.2.1", "198.51.100.2", 1, 2),
                tlvs=b"\x04\x00\x03abc",
            ),
            ProxyHeader(2, ("192.0.2.1", 1), ("198.51.100.2", 2), 34),
        ),
        # LOCAL: the balancer's own health check; no addresses to use.
        (v2(command=0x0, family=0x0, transport=0x0), ProxyHeader(2, None, None, 16)),
        (
            v2(command=0x0, addresses=inet("192.0.2.1", "198.51.100.2", 1, 2)),
            ProxyHeader(2, None, None, 28),
        ),
        # A Unix socket's addresses: a header, but nothing we can use.
        (v2(family=0x3, addresses=bytes(216)), ProxyHeader(2, None, None, 232)),
    ],
    ids=[
        "v1-tcp4",
        "v1-tcp6",
        "v1-unknown",
        "v1-unknown-with-addresses",
        "v2-tcp4",
        "v2-tcp6",
        "v2-udp4-tlv",
        "v2-local",
        "v2-local-with-addresses",
        "v2-unix",
    ],
)
def test_headers_from_the_specification(header: bytes, expected: ProxyHeader) -> None:
    assert parse(header) == expected
    assert expected.length == len(header)
    # What follows is data, never looked at.
    assert parse(header + b"hello\r\n" + V2_SIGNATURE) == expected


@pytest.mark.parametrize(
    "data",
    [
        b"hello",
        b"GET / HTTP/1.1\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.2 56324\r\n",  # a field missing
        b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 12000 extra\r\n",
        b"PROXY TCP4 2001:db8::1 198.51.100.2 1 2\r\n",  # v6 address in TCP4
        b"PROXY TCP6 192.0.2.1 2001:db8::2 1 2\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.2 65536 1\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.2 +1 1\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.2 1_0 1\r\n",
        b"PROXY TCP4 192.0.2.1  198.51.100.2 1 2\r\n",  # two spaces
        b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2\n",  # LF alone
        b"PROXY UDP4 192.0.2.1 198.51.100.2 1 2\r\n",
        b"PROXY \xff\r\n",
        b"PROXY " + b"A" * (MAX_V1_LENGTH - 6),  # no CRLF within 107 bytes
        v2(version=1, addresses=inet("192.0.2.1", "198.51.100.2", 1, 2)),
        v2(command=0x2, addresses=inet("192.0.2.1", "198.51.100.2", 1, 2)),
        v2(addresses=b"\x00" * 11),  # IPv4 addresses cut short
        v2(family=0x2, addresses=b"\x00" * 35),
        V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, MAX_V2_LENGTH),  # too long
    ],
)
def test_what_is_not_a_header_is_an_error(data: bytes) -> None:
    with pytest.raises(ProxyProtocolError):
        parse(data)


def test_the_longest_v1_line_is_accepted_and_one_byte_more_is_not() -> None:
    # The specification's worst case: UNKNOWN, with the longest addresses.
    longest = (
        b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
        b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n"
    )
    assert len(longest) == MAX_V1_LENGTH
    header = parse(longest)
    assert header is not None
    assert header.length == MAX_V1_LENGTH
    with pytest.raises(ProxyProtocolError):
        parse(longest[:-2] + b" \r\n")


def test_the_v2_length_limit_holds_without_waiting_for_the_bytes() -> None:
    # A peer announcing 64 KiB is refused at once, before it sends them.
    huge = V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, 0xFFFF)
    with pytest.raises(ProxyProtocolError, match="more than"):
        parse(huge)
    limit = V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, MAX_V2_LENGTH - 16)
    assert parse(limit) is None  # allowed; its bytes have not come yet


# --- Properties ------------------------------------------------------------------------

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)


@st.composite
def headers(draw: st.DrawFn) -> tuple[bytes, ProxyHeader]:
    """Any valid header, and what it must parse to."""
    version = draw(st.sampled_from([1, 2]))
    family = draw(st.sampled_from([4, 6]))
    addresses = ipv4 if family == 4 else ipv6
    source = (draw(addresses), draw(ports))
    destination = (draw(addresses), draw(ports))
    if version == 1:
        raw = (
            f"PROXY TCP{family} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n"
        ).encode()
    else:
        tlvs = draw(st.binary(max_size=64))
        raw = v2(
            family=0x1 if family == 4 else 0x2,
            transport=draw(st.sampled_from([0x1, 0x2])),
            addresses=inet(source[0], destination[0], source[1], destination[1]),
            tlvs=tlvs,
        )
    canonical = (str(ipaddress.ip_address(source[0])), source[1])
    canonical_destination = (str(ipaddress.ip_address(destination[0])), destination[1])
    return raw, ProxyHeader(version, canonical, canonical_destination, len(raw))


@settings(max_examples=300)
@given(headers(), st.binary(max_size=200))
def test_a_header_cut_anywhere_needs_more_then_parses_and_stops_at_its_end(
    case: tuple[bytes, ProxyHeader], payload: bytes
) -> None:
    raw, expected = case
    for cut in range(len(raw)):
        assert parse(raw[:cut]) is None, cut
    assert parse(raw + payload) == expected
    assert expected.length == len(raw)


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_any_bytes_give_a_header_none_or_the_error_never_anything_else(data: bytes) -> None:
    try:
        header = parse(data)
    except ProxyProtocolError:
        return
    if header is not None:
        assert 0 < header.length <= len(data)
        assert header.length <= max(MAX_V1_LENGTH, MAX_V2_LENGTH)
        # Never past the header: the same bytes with anything after them
        # give the same header.
        assert parse(data[: header.length]) == header


@settings(max_examples=300)
@given(st.binary(min_size=1, max_size=64), st.binary(max_size=64))
def test_bytes_after_the_v2_signature_never_crash_the_parser(tail: bytes, more: bytes) -> None:
    data = V2_SIGNATURE + tail + more
    try:
        header = parse(data)
    except ProxyProtocolError:
        return
    assert header is None or header.length <= len(data)

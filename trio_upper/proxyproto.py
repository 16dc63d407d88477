"""The PROXY protocol (HAProxy's, versions 1 and 2), with no I/O in it.

A load balancer that forwards a connection (or a datagram) puts a header in
front of it saying who the real client is, since the connection itself comes
from the balancer. Version 1 is a line of text::

    PROXY TCP4 192.0.2.1 198.51.100.2 56324 12000\\r\\n

version 2 a binary block that starts with a fixed 12-byte signature. See
https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt.

:func:`parse` looks at the first bytes of a connection (or datagram) and says
one of three things: more bytes are needed; here is the header and how many
bytes it took; or this cannot be a header. It never looks past the header,
and it bounds what it will wait for: a version 1 line is at most 107 bytes,
a version 2 block at most :data:`MAX_V2_LENGTH`. Like
:mod:`trio_upper.transform`, this knows nothing of sockets, so it is tested on
every input hypothesis can think of.

No library is used: the ones on PyPI read from sockets themselves (asyncio or
blocking) rather than from bytes handed to them, and the format is short.
"""

from __future__ import annotations

import functools
import ipaddress
import struct
from dataclasses import dataclass

__all__ = [
    "MAX_V1_LENGTH",
    "MAX_V2_LENGTH",
    "V2_SIGNATURE",
    "ProxyHeader",
    "ProxyProtocolError",
    "parse",
]

# The longest version 1 line the specification allows, CRLF included
# ("PROXY TCP6 " and two full IPv6 addresses and ports).
MAX_V1_LENGTH = 107

# The fixed start of every version 2 header.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

# Version 2 headers carry a 16-bit length, so up to 64 KiB of addresses and
# TLVs. The addresses take at most 216 bytes (two Unix paths); what load
# balancers add (TLS details, a unique ID, a checksum) a few hundred more. A
# cap keeps a hostile peer from making us buffer 64 KiB before it is refused.
MAX_V2_LENGTH = 2048

_V2_FIXED = 16  # signature, version and command, family, length
_V1_PREFIX = b"PROXY "

# Version 2 address blocks: family and transport byte -> (address family
# name, address length, port length).
_V2_INET, _V2_INET6, _V2_UNIX = 0x1, 0x2, 0x3
_V2_ADDRESS_SIZES = {_V2_INET: 12, _V2_INET6: 36, _V2_UNIX: 216}


class ProxyProtocolError(ValueError):
    """The bytes are not, and cannot become, a PROXY protocol header."""


@dataclass(frozen=True)
class ProxyHeader:
    """A parsed header.

    Attributes:
      version: 1 or 2.
      source: The client's (address, port), or None when the header carries
          none: version 1 ``UNKNOWN``, a version 2 ``LOCAL`` command (the
          balancer's own health check), or an address family other than
          IPv4 and IPv6. The connection's own addresses apply then.
      destination: The address the client connected to, likewise.
      length: How many bytes the header took; the data starts after them.
    """

    version: int
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    length: int


def parse(data: bytes | bytearray | memoryview) -> ProxyHeader | None:
    """Parse the PROXY protocol header at the start of ``data``.

    Args:
      data: The first bytes of a connection or a datagram, as many as have
          come.

    Returns:
      The header, if ``data`` holds all of it; None if ``data`` is the start
      of a header (or too short to tell) and more bytes are needed. Bytes
      after the header are never looked at.

    Raises:
      ProxyProtocolError: ``data`` does not start with a header, or starts
          with a malformed one, or one past the length limits.
    """
    head = bytes(data[:MAX_V2_LENGTH])
    if head.startswith(V2_SIGNATURE):
        return _parse_v2(head)
    if head.startswith(_V1_PREFIX):
        return _parse_v1(head)
    if V2_SIGNATURE.startswith(head) or _V1_PREFIX.startswith(head):
        return None  # too short to tell yet
    raise ProxyProtocolError("no PROXY protocol header")


def _parse_v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, MAX_V1_LENGTH)
    if end < 0:
        if len(data) >= MAX_V1_LENGTH or b"\n" in data[:MAX_V1_LENGTH]:
            raise ProxyProtocolError("PROXY v1 line without CRLF within 107 bytes")
        return None
    line = data[:end]
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise ProxyProtocolError("PROXY v1 line is not ASCII") from None
    fields = text.split(" ")
    length = end + 2
    if len(fields) >= 2 and fields[1] == "UNKNOWN":
        # The rest of the line, if any, is to be ignored.
        return ProxyHeader(1, None, None, length)
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        raise ProxyProtocolError(f"malformed PROXY v1 line: {text[:60]!r}")
    _, protocol, source, destination, source_port, destination_port = fields
    version = 4 if protocol == "TCP4" else 6
    return ProxyHeader(
        1,
        (_v1_address(source, version), _v1_port(source_port)),
        (_v1_address(destination, version), _v1_port(destination_port)),
        length,
    )


# How many addresses' parses to remember. A balancer's headers name the same
# clients again and again, and ipaddress takes microseconds to parse one,
# more than the server takes to answer a datagram. Bounded, so that a peer
# naming ever new addresses only churns it.
_ADDRESS_CACHE = 1024


@functools.lru_cache(maxsize=_ADDRESS_CACHE)
def _v1_address(text: str, version: int) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyProtocolError(f"not an IP address in a PROXY v1 line: {text[:45]!r}") from None
    if address.version != version:
        raise ProxyProtocolError(f"not an IPv{version} address: {text!r}")
    return str(address)


def _v1_port(text: str) -> int:
    # Decimal digits only: int() would also take "+1", " 1" and "1_000".
    if not (text.isascii() and text.isdigit()) or len(text) > 5 or int(text) > 65535:
        raise ProxyProtocolError(f"not a port number in a PROXY v1 line: {text[:8]!r}")
    return int(text)


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if len(data) < _V2_FIXED:
        return None
    version_command, family_transport, size = struct.unpack_from("!BBH", data, 12)
    if version_command >> 4 != 2:
        raise ProxyProtocolError(f"PROXY v2 header of version {version_command >> 4}")
    command = version_command & 0xF
    if command not in (0x0, 0x1):
        raise ProxyProtocolError(f"PROXY v2 header with unknown command {command}")
    length = _V2_FIXED + size
    if length > MAX_V2_LENGTH:
        raise ProxyProtocolError(
            f"PROXY v2 header of {length} bytes, more than the {MAX_V2_LENGTH} accepted"
        )
    if len(data) < length:
        return None
    family = family_transport >> 4
    needed = _V2_ADDRESS_SIZES.get(family, 0)
    if size < needed:
        raise ProxyProtocolError(f"PROXY v2 addresses cut short: {size} of {needed} bytes")
    if command == 0x0 or family not in (_V2_INET, _V2_INET6):
        # LOCAL (the balancer's own connection), or addresses we cannot use.
        return ProxyHeader(2, None, None, length)
    block = data[_V2_FIXED : _V2_FIXED + needed]
    if family == _V2_INET:
        source, destination = block[0:4], block[4:8]
        ports = block[8:12]
    else:
        source, destination = block[0:16], block[16:32]
        ports = block[32:36]
    source_port, destination_port = struct.unpack("!HH", ports)
    return ProxyHeader(
        2,
        (_packed_address(source), source_port),
        (_packed_address(destination), destination_port),
        length,
    )


@functools.lru_cache(maxsize=_ADDRESS_CACHE)
def _packed_address(packed: bytes) -> str:
    """An address of 4 or 16 bytes as text."""
    return str(ipaddress.ip_address(packed))

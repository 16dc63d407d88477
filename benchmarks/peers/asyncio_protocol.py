"""asyncio Protocols (TCP Protocol and DatagramProtocol); ``--uvloop`` runs the
very same code on uvloop's event loop.

With ``--certfile`` and ``--keyfile``, TCP is TLS: ``create_server(ssl=...)``
(on uvloop, uvloop's own TLS transport).

Run as ``python asyncio_protocol.py --port P [--uvloop] [--certfile FILE --keyfile FILE]``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import ssl
from typing import cast


class UpperProtocol(asyncio.Protocol):
    """One TCP connection: uppercase each chunk as it arrives."""

    transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's transports are not
        # subclasses of asyncio's.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data.upper())

    # Flow control, as a Protocol should do it: a client that stops reading
    # stops being read, so the write buffer cannot grow without bound.
    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()


class UpperDatagramProtocol(asyncio.DatagramProtocol):
    """The UDP socket: each datagram's uppercase goes back to its sender."""

    transport: asyncio.DatagramTransport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's own datagram transport is not a DatagramTransport subclass.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        self.transport.sendto(data.upper(), addr)


async def serve(host: str, port: int, label: str, tls: ssl.SSLContext | None) -> None:
    """Serve TCP (over TLS with ``tls``) and UDP until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    server = await loop.create_server(UpperProtocol, host, port, ssl=tls)
    transport, _ = await loop.create_datagram_endpoint(
        UpperDatagramProtocol, local_addr=(host, port)
    )
    print(f"Serving uppercase on tcp {host}:{port}, udp {host}:{port} ({label})", flush=True)
    try:
        async with server:
            await stop.wait()
    finally:
        transport.close()


def main() -> None:
    """Parse the command line and serve, on uvloop if asked."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    parser.add_argument("--certfile", help="serve TCP over TLS with this certificate")
    parser.add_argument("--keyfile", help="and this key")
    args = parser.parse_args()
    tls = None
    if args.certfile:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.certfile, args.keyfile)
    if args.uvloop:
        # Imported here so that the asyncio variant runs where uvloop is not
        # installed.
        import uvloop

        uvloop.run(serve(args.host, args.port, "uvloop Protocol", tls))
    else:
        asyncio.run(serve(args.host, args.port, "asyncio Protocol", tls))


if __name__ == "__main__":
    main()

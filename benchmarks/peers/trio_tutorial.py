"""The trio tutorial's echo server, uppercasing: ``trio.serve_tcp`` with one
task per connection, and the plain ``recvfrom``/``sendto`` loop for UDP.

With ``--certfile`` and ``--keyfile``, TCP is TLS, as the trio documentation
does it: ``trio.serve_ssl_over_tcp`` and the same handler.

Run as ``python trio_tutorial.py --port P [--certfile FILE --keyfile FILE]``.
"""

from __future__ import annotations

import argparse
import signal
import socket
import ssl
from functools import partial

import trio


async def handle(stream: trio.abc.Stream) -> None:
    """Uppercase everything the client sends until it closes."""
    try:
        async for data in stream:
            await stream.send_all(data.upper())
    except trio.BrokenResourceError:
        # The tutorial lets this crash the server; a reset client should not.
        pass


async def serve_udp(sock: trio.socket.SocketType) -> None:
    """Answer each datagram with its uppercase, forever."""
    while True:
        data, addr = await sock.recvfrom(65536)
        await sock.sendto(data.upper(), addr)


async def serve(host: str, port: int, tls: ssl.SSLContext | None) -> None:
    """Serve TCP (over TLS with ``tls``) and UDP until SIGINT or SIGTERM."""
    # Signals are received explicitly rather than left to trio's
    # KeyboardInterrupt, which never comes when SIGINT was ignored at startup
    # (as for a background job of a non-interactive shell).
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            if tls is None:
                await nursery.start(partial(trio.serve_tcp, handle, port, host=host))
            else:
                await nursery.start(partial(trio.serve_ssl_over_tcp, handle, port, tls, host=host))
            sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            await sock.bind((host, port))
            nursery.start_soon(serve_udp, sock)
            print(
                f"Serving uppercase on tcp {host}:{port}, udp {host}:{port} (trio tutorial)",
                flush=True,
            )
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def main() -> None:
    """Parse the command line and serve."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--certfile", help="serve TCP over TLS with this certificate")
    parser.add_argument("--keyfile", help="and this key")
    args = parser.parse_args()
    tls = None
    if args.certfile:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.certfile, args.keyfile)
    trio.run(serve, args.host, args.port, tls)


if __name__ == "__main__":
    main()

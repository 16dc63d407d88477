"""asyncio streams, as the asyncio documentation's echo server: TCP only.

With ``--certfile`` and ``--keyfile``, over TLS: ``start_server(ssl=...)``.

Run as ``python asyncio_streams.py --port P [--certfile FILE --keyfile FILE]``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import ssl


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Uppercase everything the client sends until it closes."""
    try:
        while data := await reader.read(65536):
            writer.write(data.upper())
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def serve(host: str, port: int, tls: ssl.SSLContext | None) -> None:
    """Serve (over TLS with ``tls``) until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    server = await asyncio.start_server(handle, host, port, ssl=tls)
    print(f"Serving uppercase on tcp {host}:{port} (asyncio streams)", flush=True)
    async with server:
        await stop.wait()


def main() -> None:
    """Parse the command line and serve."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--certfile", help="serve over TLS with this certificate")
    parser.add_argument("--keyfile", help="and this key")
    args = parser.parse_args()
    tls = None
    if args.certfile:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.certfile, args.keyfile)
    asyncio.run(serve(args.host, args.port, tls))


if __name__ == "__main__":
    main()

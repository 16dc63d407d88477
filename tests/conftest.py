"""Shared test helpers: an in-process server on loopback, an in-memory
listener, and the command line run as a user runs it (a subprocess)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import pytest
import trio
import trio.testing

from trio_upper.server import Endpoint, ServerConfig, UpperServer

LECTURE = Path(__file__).parent / "lecture"

# Generous bounds for a subprocess on a loaded 2-core machine: they only stop
# a hung test, they are never what a test checks.
PROCESS_TIMEOUT = 60


async def receive_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    """Read until ``size`` bytes have come; fail on an early end of stream."""
    data = bytearray()
    while len(data) < size:
        chunk = await stream.receive_some()
        assert chunk, f"EOF after {len(data)} of {size} bytes"
        data += chunk
    return bytes(data)


async def receive_until_eof(stream: trio.abc.ReceiveStream) -> bytes:
    """Read everything until the other side closes."""
    data = bytearray()
    while chunk := await stream.receive_some():
        data += chunk
    return bytes(data)


class ChannelListener(trio.abc.Listener[trio.abc.Stream]):
    """A listener whose accept() takes the server's end of each connection
    from a memory channel; subclasses' connect() methods put them there."""

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[trio.abc.Stream](0)

    async def accept(self) -> trio.abc.Stream:
        try:
            return await self._receive.receive()
        except trio.EndOfChannel:
            raise trio.ClosedResourceError from None

    async def aclose(self) -> None:
        self._receive.close()
        await trio.lowlevel.checkpoint()


class MemoryListener(ChannelListener):
    """A listener whose connections are in-memory stream pairs, so the whole
    server (accept loop, handlers, shutdown) runs under the mock clock."""

    async def connect(self) -> trio.abc.HalfCloseableStream:
        """Open a connection to the server; raises BrokenResourceError once
        the server has stopped accepting."""
        client, server = trio.testing.memory_stream_pair()
        await self._send.send(server)
        return client


class LoopbackServer:
    """An UpperServer running in the test's nursery on 127.0.0.1, port 0."""

    def __init__(self, server: UpperServer, endpoints: Sequence[Endpoint]) -> None:
        self.server = server
        self.endpoints = list(endpoints)
        self.port = self.endpoints[0].port

    async def connect(self) -> trio.SocketStream:
        return await trio.open_tcp_stream("127.0.0.1", self.port)

    def udp_socket(self) -> trio.socket.SocketType:
        return trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)


@pytest.fixture
async def loopback(nursery: trio.Nursery) -> AsyncIterator[LoopbackServer]:
    server = UpperServer(ServerConfig(host="127.0.0.1", port=0))
    endpoints = await nursery.start(server.run)
    yield LoopbackServer(server, endpoints)
    server.shutdown(grace=0)


def cli(*args: str) -> list[str]:
    """The command line a user types: python -m trio_upper ARGS."""
    return [sys.executable, "-m", "trio_upper", *args]


def run_cli(*args: str, input: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        cli(*args), input=input, capture_output=True, timeout=PROCESS_TIMEOUT, check=False
    )


class ServerProcess:
    """``python -m trio_upper serve`` (or a lecture server) as a subprocess;
    learns its port from the line it prints when ready."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env
        )
        assert self.proc.stdout is not None
        self.first_line = self.proc.stdout.readline().decode()
        found = re.search(r"(?::|port )(\d+)\b", self.first_line)
        if found is None:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=PROCESS_TIMEOUT)
            raise AssertionError(f"server did not start: {self.first_line!r} {err!r}")
        self.port = int(found.group(1))

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str, str]:
        """Send ``sig``, wait, and return (exit status, rest of stdout, stderr)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        out, err = self.proc.communicate(timeout=PROCESS_TIMEOUT)
        return self.proc.returncode, out.decode(), err.decode()


@pytest.fixture
def server_process() -> Iterator[ServerProcess]:
    """Our server on 127.0.0.1, a port of the OS's choosing."""
    server = ServerProcess(cli("serve", "--host", "127.0.0.1", "--port", "0"))
    yield server
    server.stop(signal.SIGKILL)


def lecture_program(name: str, *args: str) -> list[str]:
    return [sys.executable, str(LECTURE / f"{name}.py"), *args]

"""A real server process whose socket calls fail on purpose.

``tests/faultinject/faultinject.c``, loaded with LD_PRELOAD, makes the server's
accept, receive and send calls on its TCP and UDP sockets fail now and then
with the errors a loaded kernel gives (ENOBUFS, ENOMEM, EAGAIN, ECONNABORTED),
instead of reaching the kernel. The server must keep serving TCP and UDP all
the while: a fault may end the one connection it hit (the client then tries
again, as a real one would), never the server; every byte that comes back is
the exact transform; and SIGTERM still ends it with status 0.

Needs Linux and a C compiler; skipped otherwise.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from trio_upper.transform import upper_bytes

from .helpers import PROCESS_TIMEOUT, ServerProcess, cli

SOURCE = Path(__file__).parent / "faultinject" / "faultinject.c"

# CALL:ERRNO:EVERY: every EVERY-th call of CALL on a TCP or UDP socket fails.
# Prime intervals, so the faults fall on every kind of call in turn.
# Each failed receive and failed accept costs the server a 0.1 s pause, and
# each dropped reply the client a 0.1 s wait: sparse enough to keep the test
# to a few seconds, dense enough that each kind comes several times.
FAULTS = {
    "accept4": {"ECONNABORTED": 5, "ENOMEM": 11, "ENOBUFS": 13, "EAGAIN": 3},
    "recvfrom": {"ENOBUFS": 11, "ENOMEM": 13, "EAGAIN": 3},
    "sendto": {"ENOBUFS": 11, "ENOMEM": 13, "EAGAIN": 3},
    "recv": {"EAGAIN": 3, "ENOMEM": 23},
    "send": {"EAGAIN": 3, "ENOBUFS": 19},
}

EXCHANGES = 40


@pytest.fixture(scope="module")
def faultinject(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not sys.platform.startswith("linux"):
        pytest.skip("LD_PRELOAD fault injection is written for Linux")
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("needs a C compiler (cc) to build the fault injector")
    library = tmp_path_factory.mktemp("faultinject") / "faultinject.so"
    subprocess.run(
        [compiler, "-shared", "-fPIC", "-O2", "-o", str(library), str(SOURCE), "-ldl"],
        check=True,
        timeout=PROCESS_TIMEOUT,
    )
    return library


@pytest.fixture
def faulty_server(faultinject: Path, tmp_path: Path) -> Iterator[tuple[ServerProcess, Path]]:
    report = tmp_path / "faults.txt"
    spec = ",".join(
        f"{call}:{error}:{every}"
        for call, errors in FAULTS.items()
        for error, every in errors.items()
    )
    env = {
        **os.environ,
        "LD_PRELOAD": str(faultinject),
        "TRIO_UPPER_FAULTS": spec,
        "TRIO_UPPER_FAULTS_REPORT": str(report),
    }
    server = ServerProcess(cli("serve", "--host", "127.0.0.1", "--port", "0"), env=env)
    yield server, report
    server.stop(signal.SIGKILL)


def tcp_exchange(port: int, request: bytes) -> tuple[bytes, int]:
    """Send ``request``, half-close, read to the end; try again on a new
    connection until the whole reply comes back. Returns it and how many
    connections were cut short on the way, each checked: what came back on
    it is the start of the exact reply."""
    expected = upper_bytes(request)
    cut = 0
    while True:
        with socket.create_connection(("127.0.0.1", port), timeout=PROCESS_TIMEOUT) as conn:
            reply = b""
            try:
                conn.sendall(request)
                conn.shutdown(socket.SHUT_WR)
                while chunk := conn.recv(65536):
                    reply += chunk
            except TimeoutError:
                raise
            except OSError:
                pass  # reset, or not connected any more: cut short
        if reply == expected:
            return reply, cut
        assert expected.startswith(reply), (reply, expected)
        cut += 1


def udp_exchange(sock: socket.socket, port: int, request: bytes) -> bytes:
    """Send ``request`` until its reply comes; a late reply to an earlier
    request is skipped (it is checked against the earlier one's)."""
    expected = upper_bytes(request)
    for _ in range(100):
        sock.sendto(request, ("127.0.0.1", port))
        try:
            while (reply := sock.recv(70000)) != expected:
                assert reply.startswith(b"UDP "), reply
        except TimeoutError:
            continue
        return reply
    pytest.fail(f"no reply to {request!r} in 100 tries")


def test_the_server_rides_out_faults_on_every_socket_call(
    faulty_server: tuple[ServerProcess, Path],
) -> None:
    server, report = faulty_server
    cut = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(0.1)
        for n in range(EXCHANGES):
            request = f"tcp {n}: straße ΐ {'x' * (n * 997 % 20_000)}".encode()
            reply, cuts = tcp_exchange(server.port, request)
            assert reply == upper_bytes(request)
            cut += cuts
            request = f"udp {n}: straße ΐ".encode()
            assert udp_exchange(udp, server.port, request) == upper_bytes(request)

    status, out, err = server.stop(signal.SIGTERM)
    assert status == 0, err
    assert "Traceback" not in err
    assert "internal error" not in err
    assert out.splitlines()[-1].startswith("Stopped: served ")
    # Each kind of fault happened, in the server, while it served.
    injected = {
        kind: int(count)
        for kind, count in (line.rsplit(" ", 1) for line in report.read_text().splitlines())
    }
    expected = {f"{call}:{error}" for call, errors in FAULTS.items() for error in errors}
    assert set(injected) == expected
    never = sorted(kind for kind, count in injected.items() if count == 0)
    assert never == [], f"faults never injected: {never}; {injected}"
    # Only a failed read or write on a connection can cut it short, and
    # then only that one connection.
    assert cut <= injected["recv:ENOMEM"] + injected["send:ENOBUFS"]
    # The logs name the resource runs, once each.
    assert "cannot accept with" in err
    assert "cannot receive" in err
    assert "cannot send replies" in err

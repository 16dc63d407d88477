"""The lecture's four programs (tests/lecture, Python 3 ports) against
trio-upper, and trio-upper's clients against the lecture's servers, all as
subprocesses on this machine."""

from __future__ import annotations

import re
import subprocess

import pytest

from .helpers import PROCESS_TIMEOUT, PipedProcess, ServerProcess, cli, lecture_program, run_cli

# The lecture servers read at most this much per connection or datagram.
LECTURE_RECEIVE_SIZE = 2048


def lecture_server(name: str) -> ServerProcess:
    """The lecture's TCPServer or UDPServer on a port of the OS's choosing
    (IPv4, all interfaces); killed at the end of its ``with``."""
    return ServerProcess(lecture_program(name, "0"))


def run_lecture(name: str, port: int, input: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        lecture_program(name, str(port)),
        input=input,
        capture_output=True,
        timeout=PROCESS_TIMEOUT,
        check=False,
    )


# --- The lecture's clients against our server -------------------------------------


@pytest.mark.parametrize(
    ("program", "reply", "summary"),
    [
        ("TCPClient", b"From Server: HELLO LECTURE", "1 TCP connection and 0 datagrams"),
        ("UDPClient", b"HELLO LECTURE", "0 TCP connections and 1 datagram"),
    ],
)
def test_lecture_client_against_our_server(
    server_process: ServerProcess, program: str, reply: bytes, summary: str
) -> None:
    result = run_lecture(program, server_process.port, b"hello lecture\n")
    assert result.returncode == 0, result.stderr
    assert reply in result.stdout

    status, out, err = server_process.stop()
    assert status == 0
    assert err == ""
    assert out.splitlines()[-1] == f"Stopped: served {summary}."


# --- Our clients against the lecture's servers -------------------------------------


def test_our_tcp_client_against_lecture_server_gets_the_reply() -> None:
    with lecture_server("TCPServer") as server:
        result = run_cli("tcp", "localhost", "-p", str(server.port), input=b"hello\n")
    assert result.stdout == b"HELLO\n"
    assert result.stderr == b""
    assert result.returncode == 0


def test_our_tcp_client_judges_only_input_it_has_read() -> None:
    with lecture_server("TCPServer") as server:
        # A timeout no run can reach: the client waits for the end of its
        # input however slowly this test delivers it.
        argv = cli("tcp", "localhost", "-p", str(server.port), "--timeout", "600")
        with PipedProcess(argv) as client:
            client.stdin.write(b"hello\n")
            client.stdin.flush()
            # The lecture server has answered (and is closing); the input has
            # had no more lines, but its end has not come yet.
            reply = client.stdout.readline()
            assert client.proc.poll() is None  # still waiting to see the input end
            client.stdin.close()
            client.proc.wait(timeout=PROCESS_TIMEOUT)
            out, err = client.stdout.read(), client.stderr.read()
    assert reply + out == b"HELLO\n"
    assert err == b""
    assert client.proc.returncode == 0


def test_our_tcp_client_reports_lecture_server_closing_early() -> None:
    # 200 lines of 50 bytes: the lecture server reads 2048 of them, answers,
    # and closes.
    lines = [b"line %03d " % n + b"x" * 40 + b"\n" for n in range(200)]
    assert {len(line) for line in lines} == {50}
    sent = b"".join(lines)
    with lecture_server("TCPServer") as server:
        result = run_cli("tcp", "localhost", "-p", str(server.port), input=sent)

    assert result.returncode == 1
    assert sent.upper().startswith(result.stdout)
    assert len(result.stdout) <= LECTURE_RECEIVE_SIZE
    assert b"Traceback" not in result.stderr
    errors = result.stderr.decode().splitlines()
    assert len(errors) == 1, errors
    found = re.fullmatch(
        r"trio-upper: error: the server closed the connection "
        r"(?:early; (\d+) of 200 lines|before all input was sent; (\d+) lines?) answered",
        errors[0],
    )
    assert found is not None, errors[0]
    answered = int(found.group(1) or found.group(2))
    assert answered == result.stdout.count(b"\n")


def test_our_udp_client_against_lecture_server_via_localhost() -> None:
    # The lecture server is IPv4 only; localhost may resolve to ::1 first,
    # and the client must then fall back to 127.0.0.1.
    with lecture_server("UDPServer") as server:
        result = run_cli("udp", "localhost", "-p", str(server.port), input=b"hello\nworld\n")
    assert result.stdout == b"HELLO\nWORLD\n"
    assert result.stderr == b""
    assert result.returncode == 0


def test_our_udp_client_gets_lecture_servers_truncated_reply() -> None:
    # The lecture server's recvfrom(2048) cuts a longer datagram: the reply is
    # the uppercase of its first 2048 bytes. That is the lecture's behaviour;
    # our client prints what came back, as one line.
    line = bytes(ord("a") + n % 26 for n in range(3000))
    with lecture_server("UDPServer") as server:
        result = run_cli("udp", "localhost", "-p", str(server.port), input=line + b"\n")
    assert result.stdout == line[:LECTURE_RECEIVE_SIZE].upper() + b"\n"
    assert result.stderr == b""
    assert result.returncode == 0

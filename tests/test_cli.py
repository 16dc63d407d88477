"""The command line as a user runs it: ``python -m trio_upper ...`` in a
subprocess, the clients fed through a pipe, against a server subprocess on
127.0.0.1. Every wait is bounded by PROCESS_TIMEOUT; no test checks timing."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import trio_upper
from trio_upper.cli import _exit_status
from trio_upper.errors import UserError

from .helpers import (
    PROCESS_TIMEOUT,
    OutputReader,
    PipedProcess,
    ServerProcess,
    cli,
    entry_for,
    help_entries,
    recv_exactly,
    recv_until_eof,
    run_cli,
    serving,
    usage_error_line,
)

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup, ExceptionGroup

# --- Helpers ------------------------------------------------------------------


def free_port(kind: socket.SocketKind) -> int:
    """A port nothing listens on (for ``kind``): bound, then let go."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def error_line(result: subprocess.CompletedProcess[bytes]) -> str:
    """The one line a failed client or server prints: exactly one line on
    stderr, in the CLI's format, and no traceback."""
    assert b"Traceback" not in result.stderr
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("trio-upper: error: "), lines
    return lines[0]


def assert_refused(port: int) -> None:
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=PROCESS_TIMEOUT).close()


# --- Version, help and usage ----------------------------------------------------


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout == f"trio-upper {trio_upper.__version__}\n".encode()
    assert re.fullmatch(rb"trio-upper \d+\.\d+\.\d+\n", result.stdout)


def test_top_level_help_lists_the_commands() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    assert result.stderr == b""
    text = result.stdout.decode()
    assert text.startswith("usage: trio-upper")
    entries = help_entries(text)
    entry_for(entries, "--help")
    entry_for(entries, "--version")
    for command in ("serve", "tcp", "udp"):
        assert re.search(rf"^\s+{command}\s+\S", text, re.MULTILINE), command


# Every option of each command, and the default its help must state (None: a
# flag, which has no default worth stating).
EVERY_COMMAND: dict[str, str | None] = {
    "-h": None,
    "--help": None,
    "-v": None,
    "--verbose": None,
    "-q": None,
    "--quiet": None,
}
EVERY_CLIENT: dict[str, str | None] = {
    **EVERY_COMMAND,
    "HOST": "(default: localhost)",
    "-p": "(default: 12000)",
    "--port": "(default: 12000)",
}
HELP_DEFAULTS: dict[str, dict[str, str | None]] = {
    "serve": {
        **EVERY_COMMAND,
        "--host": "(default: all interfaces",
        "-p": "(default: 12000)",
        "--port": "(default: 12000)",
        "--tcp-only": None,
        "--udp-only": None,
        "--ascii": "(default: all of Unicode",
        "--grace": "(default: 5.0)",
    },
    "tcp": {
        **EVERY_CLIENT,
        "--timeout": "(default: 5.0)",
        "--connect-timeout": "(default: 5.0)",
    },
    "udp": {
        **EVERY_CLIENT,
        "--timeout": "(default: 1.0)",
        "--retries": "(default: 2)",
    },
}


@pytest.mark.parametrize("command", sorted(HELP_DEFAULTS))
def test_command_help_states_every_option_and_default(command: str) -> None:
    result = run_cli(command, "--help")
    assert result.returncode == 0
    assert result.stderr == b""
    text = result.stdout.decode()
    assert text.startswith(f"usage: trio-upper {command}")
    entries = help_entries(text)
    for option, default in HELP_DEFAULTS[command].items():
        help_text = entry_for(entries, option)
        if default is not None:
            assert default in help_text, (option, help_text)
            assert help_text.count("(default:") == 1, (option, help_text)
    # Nothing argparse would add on its own that tells the user nothing.
    assert "(default: False)" not in text
    assert "(default: None)" not in text


def test_no_command_is_a_usage_error() -> None:
    result = run_cli()
    line = usage_error_line(result, "")
    assert "COMMAND" in line


@pytest.mark.parametrize(
    "args",
    [
        ("serve", "--port", "70000"),
        ("serve", "--grace", "nan"),
        ("tcp", "--port", "http"),
        ("tcp", "--timeout", "-1"),
        ("tcp", "--connect-timeout", "inf"),
        ("udp", "--retries", "x"),
        ("udp", "--timeout", "0"),
    ],
    ids=" ".join,
)
def test_bad_value_is_one_usage_error_line(args: tuple[str, str, str]) -> None:
    command, option, value = args
    line = usage_error_line(run_cli(*args), command)
    assert option in line
    assert value in line


def test_negative_timeout_error_states_the_real_limit() -> None:
    for value in ("-1", "0"):
        line = usage_error_line(run_cli("tcp", "--timeout", value), "tcp")
        assert "0 or more" not in line
        assert "more than 0" in line


# --- serve: what it says it serves ------------------------------------------------


def test_serve_names_every_address_it_serves(server_process: ServerProcess) -> None:
    line = server_process.first_line
    port = server_process.port
    assert port != 0
    assert line.endswith("\n")
    assert line.count("\n") == 1
    assert f"tcp 127.0.0.1:{port}" in line
    assert f"udp 127.0.0.1:{port}" in line
    assert re.findall(r"\b(tcp|udp) (\S+?):(\d+)", line) == [
        ("tcp", "127.0.0.1", str(port)),
        ("udp", "127.0.0.1", str(port)),
    ]


def test_serve_on_all_interfaces_names_each_with_one_port() -> None:
    with ServerProcess(cli("serve", "--port", "0")) as server:
        found = re.findall(r"\b(tcp|udp) (\S+?):(\d+)", server.first_line)
        assert {port for _, _, port in found} == {str(server.port)}
        tcp_hosts = {host for protocol, host, _ in found if protocol == "tcp"}
        udp_hosts = {host for protocol, host, _ in found if protocol == "udp"}
        assert "0.0.0.0" in tcp_hosts
        assert tcp_hosts == udp_hosts


# --- tcp client over a pipe -------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        ("hello straße\nsecond line\n".encode(), b"HELLO STRASSE\nSECOND LINE\n"),
        (b"no final newline", b"NO FINAL NEWLINE"),
        (b"", b""),
        (b"\xff\xfeabc\n", b"\xff\xfeABC\n"),
    ],
    ids=["utf8-lines", "no-final-newline", "empty", "invalid-utf8"],
)
def test_tcp_client_pipes_stdin_through_the_server(
    server_process: ServerProcess, sent: bytes, expected: bytes
) -> None:
    result = run_cli("tcp", "127.0.0.1", "-p", str(server_process.port), input=sent)
    assert result.stdout == expected
    assert result.stderr == b""
    assert result.returncode == 0


# --- udp client over a pipe -------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        (b"hello\nstra\xc3\x9fe\nlast", b"HELLO\nSTRASSE\nLAST\n"),
        (b"crlf\r\nline\r\n", b"CRLF\nLINE\n"),
        (b"before\n\nafter\n", b"BEFORE\n\nAFTER\n"),
    ],
    ids=["one-reply-per-line", "crlf-stripped", "empty-line"],
)
def test_udp_client_sends_one_datagram_per_line(
    server_process: ServerProcess, sent: bytes, expected: bytes
) -> None:
    result = run_cli("udp", "127.0.0.1", "-p", str(server_process.port), input=sent)
    assert result.stdout == expected
    assert result.stderr == b""
    assert result.returncode == 0


# --- serve flags ----------------------------------------------------------------


def test_serve_ascii_changes_only_a_to_z() -> None:
    every_byte = bytes(range(256))
    with serving("--ascii") as server:
        port = str(server.port)
        tcp = run_cli("tcp", "127.0.0.1", "-p", port, input=every_byte + "\ncafé ß\n".encode())
        udp = run_cli("udp", "127.0.0.1", "-p", port, input="café straße\n".encode())
    assert tcp.returncode == 0
    assert tcp.stdout == every_byte.upper() + "\nCAFé ß\n".encode()
    assert udp.returncode == 0
    assert udp.stdout == "CAFé STRAßE\n".encode()


@pytest.mark.parametrize(
    ("flag", "served", "missing", "refusal"),
    [
        ("--tcp-only", "tcp", "udp", "no UDP server at 127.0.0.1 port {}: connection refused"),
        (
            "--udp-only",
            "udp",
            "tcp",
            "cannot connect to 127.0.0.1 port {}: Connection refused",
        ),
    ],
)
def test_serve_one_protocol_only(flag: str, served: str, missing: str, refusal: str) -> None:
    with serving(flag) as server:
        assert missing not in server.first_line
        port = str(server.port)
        works = run_cli(served, "127.0.0.1", "-p", port, input=b"works\n")
        refused = run_cli(missing, "127.0.0.1", "-p", port, input=b"refused\n")
    assert (works.returncode, works.stdout) == (0, b"WORKS\n")
    assert refused.returncode == 1
    assert refused.stdout == b""
    assert error_line(refused) == "trio-upper: error: " + refusal.format(port)


# --- errors --------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
@pytest.mark.parametrize(
    ("command", "kind", "message"),
    [
        ("tcp", socket.SOCK_STREAM, "cannot connect to {host} port {port}: Connection refused"),
        ("udp", socket.SOCK_DGRAM, "no UDP server at {host} port {port}: connection refused"),
    ],
    ids=["tcp", "udp"],
)
def test_client_without_server_is_one_error_line(
    command: str, kind: socket.SocketKind, message: str, host: str
) -> None:
    port = free_port(kind)
    result = run_cli(command, host, "-p", str(port), input=b"hello\n")
    assert result.returncode == 1
    assert result.stdout == b""
    assert error_line(result) == "trio-upper: error: " + message.format(host=host, port=port)


@pytest.mark.parametrize(
    "args",
    [
        ("tcp", "no-such-host.invalid", "-p", "12000"),
        ("udp", "no-such-host.invalid", "-p", "12000"),
        ("serve", "--host", "no-such-host.invalid", "--port", "0"),
    ],
    ids=["tcp", "udp", "serve"],
)
def test_unresolvable_host_is_one_error_line(args: tuple[str, ...]) -> None:
    result = run_cli(*args, input=b"hello\n")
    assert result.returncode == 1
    assert result.stdout == b""
    line = error_line(result)
    assert line.startswith("trio-upper: error: cannot resolve host 'no-such-host.invalid'")


@pytest.mark.parametrize(
    "args",
    [
        ("tcp", "a..b", "-p", "12000"),
        ("udp", "a..b", "-p", "12000"),
        ("serve", "--host", "x" * 64 + ".example", "--port", "0"),
    ],
    ids=["tcp", "udp", "serve"],
)
def test_malformed_host_name_is_one_error_line(args: tuple[str, ...]) -> None:
    # Python's IDNA codec rejects these before any lookup, with UnicodeError.
    result = run_cli(*args, input=b"hello\n")
    assert result.returncode == 1
    line = error_line(result)
    assert line.startswith("trio-upper: error: cannot resolve host ")
    assert line.endswith(": not a valid host name")


def test_port_in_use_is_one_error_line(server_process: ServerProcess) -> None:
    port = str(server_process.port)
    second = run_cli("serve", "--host", "127.0.0.1", "--port", port)
    assert second.returncode == 1
    assert second.stdout == b""
    line = error_line(second)
    assert f"127.0.0.1 port {port}" in line
    assert "Address already in use" in line
    # The first server is untouched.
    still = run_cli("tcp", "127.0.0.1", "-p", port, input=b"still here\n")
    assert (still.returncode, still.stdout) == (0, b"STILL HERE\n")


# --- stopping the server -----------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_server_with_summary(
    server_process: ServerProcess, sig: signal.Signals
) -> None:
    port = str(server_process.port)
    tcp = run_cli("tcp", "127.0.0.1", "-p", port, input=b"one\n")
    udp = run_cli("udp", "127.0.0.1", "-p", port, input=b"two\nthree\n")
    assert (tcp.returncode, tcp.stdout) == (0, b"ONE\n")
    assert (udp.returncode, udp.stdout) == (0, b"TWO\nTHREE\n")

    status, out, err = server_process.stop(sig)
    assert status == 0
    assert "Traceback" not in err
    assert out.endswith("\n")
    assert out.splitlines()[-1] == "Stopped: served 1 TCP connection and 2 datagrams."


# A grace period that no run reaches by accident: a pause of the machine must
# not end it. These tests end it with a second signal, never by waiting it out;
# that it ends by itself is test_server's, under the mock clock.
LONG_GRACE = "3600"


def test_sigterm_lets_open_connection_finish_and_refuses_new_ones() -> None:
    with (
        serving("--grace", LONG_GRACE) as server,
        socket.create_connection(("127.0.0.1", server.port), timeout=PROCESS_TIMEOUT) as conn,
    ):
        conn.sendall(b"abc")
        # The reply proves the server accepted the connection before SIGTERM.
        received = recv_exactly(conn, 3)
        server.proc.send_signal(signal.SIGTERM)
        notice = server.stdout.read_until(b"\n").decode()
        assert notice.startswith("SIGTERM: refusing new connections")
        assert "1 open connection" in notice
        assert_refused(server.port)  # the notice is printed once listening has stopped
        # Still within the grace period: the open connection works on.
        conn.sendall(b"def")
        conn.shutdown(socket.SHUT_WR)
        received += recv_until_eof(conn)
        assert received == b"ABCDEF"
        status, out, err = server.wait_for_exit()
    assert status == 0
    assert "Traceback" not in err
    summary = out.splitlines()[-1]
    assert summary.startswith("Stopped: served ")
    assert "cut off" not in summary


def test_sigterm_holds_an_idle_connection_in_the_grace_and_a_second_signal_cuts_it_off() -> None:
    with (
        serving("--grace", LONG_GRACE) as server,
        socket.create_connection(("127.0.0.1", server.port), timeout=PROCESS_TIMEOUT) as conn,
    ):
        conn.sendall(b"x")
        assert recv_exactly(conn, 1) == b"X"
        server.proc.send_signal(signal.SIGTERM)
        server.stdout.read_until(b"Ctrl-C again to stop now")
        # The grace period runs: the idle connection is still served.
        conn.sendall(b"y")
        assert recv_exactly(conn, 1) == b"Y"
        server.proc.send_signal(signal.SIGINT)
        # The second signal ends the grace at once: the server closes it.
        assert recv_until_eof(conn) == b""
        status, out, err = server.wait_for_exit()
    assert status == 0
    assert "Traceback" not in err
    lines = out.splitlines()
    assert lines[0].startswith(f"SIGTERM: refusing new connections; waiting up to {LONG_GRACE} s")
    assert "Stopping now." in lines
    assert lines[-1] == (
        "Stopped: served 1 TCP connection and 0 datagrams; "
        "1 connection cut off at the end of the grace period."
    )


# --- a big input through the tcp client ----------------------------------------------

BIG_INPUT_SIZE = 200_000_000
PATTERN = b"hello world\n"
READ_SIZE = 1 << 20
# Peak resident memory the client may reach (ru_maxrss is in KiB on Linux): a
# Python with trio is about 35 MiB; holding the input or output would be 200.
MAX_CLIENT_RSS_KIB = 150 * 1024


def test_tcp_client_streams_200_mb_in_bounded_memory(server_process: ServerProcess) -> None:
    block = PATTERN * (READ_SIZE // len(PATTERN))
    expected = PATTERN.upper() * (READ_SIZE // len(PATTERN) + 2)
    with PipedProcess(cli("tcp", "127.0.0.1", "-p", str(server_process.port))) as client:
        proc, stdin = client.proc, client.stdin

        def feed() -> None:
            # A client that dies early breaks the pipe: the reader side reports it.
            with contextlib.suppress(BrokenPipeError), stdin:
                left = BIG_INPUT_SIZE
                while left:
                    chunk = block[:left]
                    stdin.write(chunk)
                    left -= len(chunk)

        feeder = threading.Thread(target=feed, daemon=True)
        total = 0
        mismatch_at: int | None = None
        try:
            feeder.start()
            fd = client.stdout.fileno()
            while data := os.read(fd, READ_SIZE):
                offset = total % len(PATTERN)
                if data != expected[offset : offset + len(data)]:
                    mismatch_at = total
                    break
                total += len(data)
            _, wait_status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(wait_status)
            errors = client.stderr.read()
        finally:
            if proc.returncode is None:
                proc.kill()  # so that the feeder, writing to it, ends too
            feeder.join(timeout=PROCESS_TIMEOUT)

    assert mismatch_at is None, f"output differs from the uppercase at byte {mismatch_at}"
    assert total == BIG_INPUT_SIZE
    assert errors == b""
    assert proc.returncode == 0
    assert usage.ru_maxrss < MAX_CLIENT_RSS_KIB, f"client peaked at {usage.ru_maxrss} KiB"


def test_verbose_server_logs_each_connection() -> None:
    with serving("-v") as server:
        result = run_cli("tcp", "127.0.0.1", "-p", str(server.port), input=b"hi\n")
        assert result.stdout == b"HI\n"
        status, _, err = server.stop(signal.SIGTERM)
    assert status == 0
    assert re.search(r"DEBUG trio_upper\.tcp: 127\.0\.0\.1:\d+: connected", err)
    assert re.search(r"DEBUG trio_upper\.tcp: 127\.0\.0\.1:\d+: closed after 3 bytes", err)


def first_udp_answer(
    server: subprocess.Popen[bytes], port: int
) -> subprocess.CompletedProcess[bytes]:
    """For a server that prints no ready line: run the UDP client with the
    line "q" (each run takes a good fraction of a second to start, so no
    sleep is needed) until the server answers; return that run, or the last."""
    for _ in range(100):
        assert server.poll() is None, "the server exited"
        result = run_cli("udp", "127.0.0.1", "-p", str(port), "--retries", "0", input=b"q\n")
        if result.returncode == 0:
            break
    return result


def test_quiet_server_prints_nothing_but_serves() -> None:
    port = free_port(socket.SOCK_STREAM)
    proc = subprocess.Popen(
        cli("serve", "-q", "--host", "127.0.0.1", "--port", str(port)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        result = first_udp_answer(proc, port)
        assert result.stdout == b"Q\n"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=PROCESS_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=PROCESS_TIMEOUT)
    assert proc.returncode == 0
    assert out == b""
    assert err == b""


def test_client_interrupted_by_ctrl_c_exits_130_quietly(server_process: ServerProcess) -> None:
    # A client in stream mode, its stdin open and idle, gets SIGINT.
    with PipedProcess(cli("tcp", "127.0.0.1", "-p", str(server_process.port))) as client:
        client.stdin.write(b"ready?\n")
        client.stdin.flush()
        stdout = OutputReader(client.stdout.fileno(), "the client's stdout")
        assert stdout.read_until(b"\n") == b"READY?\n"  # connected and running
        client.proc.send_signal(signal.SIGINT)
        out, err = client.proc.communicate(timeout=PROCESS_TIMEOUT)
    assert client.proc.returncode == 130
    assert out == b""
    assert b"Traceback" not in err
    assert err.strip() == b""


# --- a client at a terminal (a pseudo-terminal) ---------------------------------------

# Run the client as a shell in a terminal window would: in a session of its own
# with the pty as its controlling terminal, so the line discipline turns a
# typed Ctrl-C into SIGINT for it. A tiny launcher does the TIOCSCTTY and
# execs the real command (no preexec_fn: the test process has threads).
ACQUIRE_TTY_AND_EXEC = (
    "import fcntl, os, sys, termios; "
    "fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


class Terminal:
    """A client running on a pseudo-terminal; the test types on the master
    side and reads the screen from it."""

    def __init__(self, args: list[str]) -> None:
        self.master, slave = os.openpty()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", ACQUIRE_TTY_AND_EXEC, *args],
                stdin=slave,
                stdout=slave,
                stderr=slave,
                start_new_session=True,
            )
        except BaseException:
            os.close(self.master)
            raise
        finally:
            os.close(slave)  # the child's copies are the only ones left: EOF at its exit
        self.output = OutputReader(self.master, "the terminal")

    @property
    def screen(self) -> bytes:
        return self.output.seen

    def press(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def read_until(self, marker: bytes) -> None:
        self.output.read_until(marker)

    def wait(self) -> int:
        """Read the screen to the end; return the exit status."""
        self.output.read_to_end()
        return self.proc.wait(timeout=PROCESS_TIMEOUT)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=PROCESS_TIMEOUT)
        os.close(self.master)


@contextlib.contextmanager
def terminal(*args: str) -> Iterator[Terminal]:
    term = Terminal(cli(*args))
    try:
        yield term
    finally:
        term.close()


PROMPT = b"Input lowercase sentence: "


@pytest.mark.parametrize("command", ["tcp", "udp"])
def test_client_at_a_terminal_prompts_and_ends_at_ctrl_d(
    server_process: ServerProcess, command: str
) -> None:
    with terminal(command, "127.0.0.1", "-p", str(server_process.port)) as term:
        term.read_until(PROMPT)
        term.press("hello straße\n".encode())
        term.read_until(b"HELLO STRASSE\r\n")
        # The reply comes after the echoed line and before the next prompt.
        assert term.screen.index("hello straße".encode()) < term.screen.index(b"HELLO")
        term.read_until(b"HELLO STRASSE\r\n" + PROMPT)
        term.press(b"\x04")  # Ctrl-D at the start of a line: end of input
        status = term.wait()
    assert status == 0
    assert b"Traceback" not in term.screen
    assert b"error" not in term.screen
    assert term.screen.count(PROMPT) == 2
    # Ctrl-D leaves the cursor on a fresh line, not after the prompt.
    assert term.screen.endswith(b"\r\n")


@pytest.mark.parametrize("command", ["tcp", "udp"])
def test_client_at_a_terminal_ctrl_c_exits_130_quietly(
    server_process: ServerProcess, command: str
) -> None:
    with terminal(command, "127.0.0.1", "-p", str(server_process.port)) as term:
        term.read_until(PROMPT)
        term.press(b"\x03")  # Ctrl-C: the line discipline sends SIGINT
        status = term.wait()
    assert status == 130
    assert b"Traceback" not in term.screen
    assert b"KeyboardInterrupt" not in term.screen
    assert b"error" not in term.screen
    assert term.screen.endswith(b"\r\n")  # and the shell's prompt on a fresh line


# --- how an exit is reported (in-process) ---------------------------------------------


def test_internal_error_is_one_line_pointing_at_verbose(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    assert _exit_status(RuntimeError("boom"), verbose=False) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.endswith("\n")
    lines = err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("trio-upper: internal error: RuntimeError: boom")
    assert "-v" in lines[0]
    assert "Traceback" not in err
    assert caplog.records == []


def test_internal_error_with_verbose_logs_the_traceback(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    def buggy() -> None:
        raise RuntimeError("boom")

    try:
        buggy()
    except RuntimeError as exc:
        error = exc
    with caplog.at_level(logging.DEBUG, logger="trio_upper"):
        assert _exit_status(error, verbose=True) == 1
    _, err = capsys.readouterr()
    assert "trio-upper: internal error: RuntimeError: boom" in err
    [record] = caplog.records
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None
    assert record.exc_info[1] is error
    assert "Traceback (most recent call last)" in caplog.text
    assert "in buggy" in caplog.text


def test_keyboard_interrupt_inside_exception_groups_exits_130(
    capsys: pytest.CaptureFixture[str],
) -> None:
    group = BaseExceptionGroup(
        "outer", [ValueError("unrelated"), BaseExceptionGroup("inner", [KeyboardInterrupt()])]
    )
    assert _exit_status(group, verbose=False) == 130
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "\n"  # Ctrl-C leaves the terminal on a fresh line, nothing more


def test_user_error_inside_exception_groups_is_one_error_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    group = ExceptionGroup(
        "outer", [ExceptionGroup("inner", [UserError("no reply from the server within 5 s")])]
    )
    assert _exit_status(group, verbose=False) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "trio-upper: error: no reply from the server within 5 s\n"


# --- the installed command --------------------------------------------------------------


def test_console_script_is_the_same_command() -> None:
    script = Path(sys.executable).parent / "trio-upper"
    if not script.exists():
        pytest.skip(f"no trio-upper script next to {sys.executable}: not installed here")
    result = subprocess.run(
        [str(script), "--version"], capture_output=True, timeout=PROCESS_TIMEOUT, check=False
    )
    assert result.returncode == 0
    assert result.stdout == f"trio-upper {trio_upper.__version__}\n".encode()
    assert result.stderr == b""


# --- closed and vanished standard streams ---------------------------------------------------


def test_tcp_client_with_stdin_closed_reads_empty_input(server_process: ServerProcess) -> None:
    result = subprocess.run(
        [
            "sh",
            "-c",
            f'exec "$0" -m trio_upper tcp 127.0.0.1 -p {server_process.port} <&-',
            sys.executable,
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=PROCESS_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0
    assert result.stdout == b""
    assert result.stderr == b""


def test_server_whose_stdout_is_gone_keeps_serving() -> None:
    port = free_port(socket.SOCK_DGRAM)
    # A pipe nobody reads from: the server's first line already meets a broken pipe.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.Popen(
            cli("serve", "--host", "127.0.0.1", "--port", str(port), "--udp-only"),
            stdin=subprocess.DEVNULL,
            stdout=write_end,
            stderr=subprocess.PIPE,
        )
    finally:
        os.close(write_end)
    try:
        result = first_udp_answer(proc, port)
        assert (result.returncode, result.stdout, result.stderr) == (0, b"Q\n", b"")
        # Still serving after that.
        again = run_cli("udp", "127.0.0.1", "-p", str(port), input=b"again\n")
        assert (again.returncode, again.stdout) == (0, b"AGAIN\n")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=PROCESS_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=PROCESS_TIMEOUT)
    assert proc.returncode == 0
    assert b"Traceback" not in err
    assert err == b""

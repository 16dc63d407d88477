"""TLS from the command line, as a user runs it (subprocesses): the flags and
their help, usage errors, every TLS error as one line, a pipe of tens of MB
through ``tcp --tls``, mutual TLS, and interoperation with OpenSSL's own
client and server (skipped where ``openssl`` is not installed)."""

from __future__ import annotations

import hashlib
import os
import random
import re
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from trio_upper.transform import upper_bytes

from .helpers import PROCESS_TIMEOUT, ServerProcess, cli, run_cli
from .tls_certs import Certs, make_certs

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl is not installed")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def serve(*args: str | Path) -> ServerProcess:
    """``serve`` on 127.0.0.1, a port of the OS's choosing, TCP only unless
    ``args`` say otherwise; stop it with ``.stop()``."""
    return ServerProcess(cli("serve", "--host", "127.0.0.1", "--port", "0", *map(str, args)))


@pytest.fixture
def servers() -> Iterator[list[ServerProcess]]:
    """Servers a test starts; killed at its end if still running."""
    started: list[ServerProcess] = []
    yield started
    for server in started:
        server.stop(signal.SIGKILL)


def tls_serve(certs: Certs, *args: str | Path) -> ServerProcess:
    return serve("--certfile", certs.cert, "--keyfile", certs.key, *args)


def tls_client(
    port: int, *args: str | Path, input: bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    return run_cli("tcp", "localhost", "-p", str(port), "--tls", *map(str, args), input=input)


def one_error_line(result: subprocess.CompletedProcess[bytes]) -> str:
    """A runtime error: exit 1, one line on stderr in the CLI's format."""
    assert result.returncode == 1, result
    assert b"Traceback" not in result.stderr
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("trio-upper: error: "), lines
    return lines[0]


def usage_error(result: subprocess.CompletedProcess[bytes], command: str) -> str:
    """Bad usage: exit 2, argparse's usage, then one error line."""
    assert result.returncode == 2, result
    assert result.stdout == b""
    lines = result.stderr.decode().splitlines()
    assert lines[0].startswith(f"usage: trio-upper {command} ")
    errors = [line for line in lines if "error:" in line]
    assert errors == [lines[-1]], lines
    assert lines[-1].startswith(f"trio-upper {command}: error: ")
    return lines[-1]


def debug_only(stderr: str) -> list[str]:
    """A ``-v`` server's log: assert every line is at debug level; return
    the lines about failed handshakes."""
    lines = stderr.splitlines()
    assert all(" DEBUG " in line for line in lines), lines
    return [line for line in lines if "TLS handshake failed" in line]


# --- Help and usage ----------------------------------------------------------------


def help_entry(text: str, option: str) -> str:
    """The help text of ``option`` in argparse's output, on one line."""
    entries: dict[str, str] = {}
    current: str | None = None
    for line in text.splitlines():
        if re.match(r"  \S", line):
            current, _, rest = line.strip().partition("  ")
            entries[current] = rest.strip()
        elif current is not None and re.match(r"\s{3,}\S", line):
            entries[current] = f"{entries[current]} {line.strip()}".strip()
        else:
            current = None
    [found] = [help for names, help in entries.items() if option in re.split(r"[,\s]+", names)]
    return found


@pytest.mark.parametrize(
    ("command", "defaults"),
    [
        (
            "serve",
            {
                "--certfile": "(default: plain TCP)",
                "--keyfile": "(default: read from --certfile)",
                "--ca-certs": "(default: no client certificate asked for)",
            },
        ),
        (
            "tcp",
            {
                "--tls": "(default: plain TCP)",
                "--cafile": "(default: the system's trust store)",
                "--server-name": "(default: HOST)",
                "--certfile": "(default: none)",
                "--keyfile": "(default: read from --certfile)",
            },
        ),
    ],
)
def test_help_states_each_tls_flag_and_its_default(command: str, defaults: dict[str, str]) -> None:
    result = run_cli(command, "--help")
    assert result.returncode == 0
    text = result.stdout.decode()
    for option, default in defaults.items():
        entry = help_entry(text, option)
        assert default in entry, (option, entry)
        assert entry.count("(default:") == 1, (option, entry)
    if command == "serve":
        assert "UDP stays plain text" in " ".join(text.split())


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (("serve", "--keyfile", "k.pem"), "--keyfile and --ca-certs go with --certfile"),
        (("serve", "--ca-certs", "ca.pem"), "--keyfile and --ca-certs go with --certfile"),
        (("serve", "--certfile", "c.pem", "--udp-only"), "--udp-only serves none"),
        (("tcp", "--cafile", "ca.pem"), "go with --tls"),
        (("tcp", "--server-name", "example.com"), "go with --tls"),
        (("tcp", "--certfile", "c.pem"), "go with --tls"),
        (("tcp", "--tls", "--keyfile", "k.pem"), "--keyfile goes with --certfile"),
    ],
    ids=" ".join,
)
def test_flags_that_do_not_go_together_are_usage_errors(
    args: tuple[str, ...], complaint: str
) -> None:
    line = usage_error(run_cli(*args), args[0])
    assert complaint in line


def test_unusable_server_files_are_one_line(certs: Certs, tmp_path: Path) -> None:
    # Every kind of file problem is checked in process (test_tls.py); this is
    # what the user sees of them.
    result = run_cli("serve", "--port", "0", "--certfile", str(certs.cert))
    assert one_error_line(result) == (
        f"trio-upper: error: cannot use --certfile {certs.cert}: "
        f"no PEM private key in {certs.cert} (give it with --keyfile)"
    )
    missing = tmp_path / "missing.pem"
    result = run_cli("tcp", "--tls", "--cafile", str(missing))
    assert one_error_line(result) == (
        f"trio-upper: error: cannot read --cafile {missing}: No such file or directory"
    )


# --- The server and our client ----------------------------------------------------


def test_ready_line_names_tls_and_says_udp_is_plain(certs: Certs) -> None:
    server = tls_serve(certs)  # TCP and UDP
    try:
        assert re.match(
            r"Serving uppercase on tcp\+tls 127\.0\.0\.1:\d+, udp 127\.0\.0\.1:\d+; "
            r"UDP is not encrypted \(Ctrl-C to stop\)$",
            server.first_line,
        ), server.first_line
    finally:
        status, _, err = server.stop()
    assert (status, err) == (0, "")


def mixed_text(size: int, *, seed: int) -> bytes:
    """``size`` bytes of lines of UTF-8 text, much of it non-ASCII and some of
    it growing when uppercased; a block of odd length repeated, so that
    reads of 64 KiB split characters at ever different places."""
    rng = random.Random(seed)
    words = ["straße", "héllo", "ﬁn", "ΐ", "ǆ", "ёлка", "δέκα", "the", "fox", "\n"]
    block = " ".join(rng.choice(words) for _ in range(100_003)).encode()
    return (block * (size // len(block) + 1))[:size]


@pytest.mark.parametrize(
    ("size", "ending"),
    [(30_000_000, "ß".encode()[:1]), (12_000_000, b"\n")],
    ids=["30MB-ending-mid-character", "12MB-final-newline"],
)
def test_pipe_of_tens_of_mb_through_tcp_tls_is_exact(
    certs: Certs, servers: list[ServerProcess], size: int, ending: bytes
) -> None:
    servers.append(server := tls_serve(certs, "--tcp-only"))
    data = mixed_text(size - len(ending), seed=size) + ending
    result = tls_client(server.port, "--cafile", certs.ca, input=data)
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    expected = upper_bytes(data)
    assert len(result.stdout) == len(expected)
    assert hashlib.sha256(result.stdout).digest() == hashlib.sha256(expected).digest()


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("untrusted", "certificate verify failed: unable to get local issuer certificate"),
        ("wrong name", "certificate verify failed: Hostname mismatch"),
        ("expired", "certificate verify failed: certificate has expired"),
        ("TLS client, plain server", "the other side does not speak TLS"),
        ("plain client, TLS server", "(if it serves TLS, use --tls)"),
    ],
)
def test_tls_errors_are_one_line_on_the_client_and_a_debug_line_on_the_server(
    certs: Certs, servers: list[ServerProcess], case: str, message: str
) -> None:
    if case == "expired":
        server = serve("--tcp-only", "-v", "--certfile", certs.expired)
    elif case == "TLS client, plain server":
        server = serve("--tcp-only", "-v")
    else:
        server = tls_serve(certs, "--tcp-only", "-v")
    servers.append(server)
    port = ["-p", str(server.port)]
    args: list[str | Path] = ["tcp", *port, "--tls", "--cafile", certs.ca]
    if case == "untrusted":
        # No --cafile: the system's trust store, which does not know our CA.
        args = ["tcp", *port, "--tls"]
    elif case == "wrong name":
        args += ["--server-name", "example.com"]
    elif case == "plain client, TLS server":
        args = ["tcp", *port]
    line = one_error_line(run_cli(*map(str, args), input=b"hello\n"))
    assert message in line
    status, _, log = server.stop()
    assert status == 0
    if case == "TLS client, plain server":
        # To it, a ClientHello is bytes to uppercase like any other.
        assert debug_only(log) == []
    else:
        [failure] = debug_only(log)
        if case == "plain client, TLS server":
            assert failure.endswith("TLS handshake failed: the other side does not speak TLS")


def test_server_says_nothing_of_a_failed_handshake_without_v(
    certs: Certs, servers: list[ServerProcess]
) -> None:
    servers.append(server := tls_serve(certs, "--tcp-only"))
    assert one_error_line(run_cli("tcp", "-p", str(server.port), input=b"hello\n"))
    assert one_error_line(tls_client(server.port, input=b"hello\n"))
    assert server.stop() == (0, "Stopped: served 2 TCP connections and 0 datagrams.\n", "")


def test_mutual_tls_from_the_command_line(certs: Certs, servers: list[ServerProcess]) -> None:
    servers.append(server := tls_serve(certs, "--tcp-only", "--ca-certs", certs.ca))
    ok = tls_client(server.port, "--cafile", certs.ca, "--certfile", certs.client, input=b"hi\n")
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, b"HI\n", b"")
    refused = tls_client(server.port, "--cafile", certs.ca, input=b"hi\n")
    assert "requires a client certificate" in one_error_line(refused)
    stranger = tls_client(
        server.port, "--cafile", certs.ca, "--certfile", certs.stranger_client, input=b"hi\n"
    )
    assert "requires a client certificate" in one_error_line(stranger)


# --- OpenSSL's client against our server, our client against OpenSSL's server ---------


def read_exactly(fd: int, size: int, what: str) -> bytes:
    """Read ``size`` bytes from a child's pipe, failing rather than hanging."""
    data = b""
    deadline = time.monotonic() + PROCESS_TIMEOUT
    while len(data) < size:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"{what}: got only {data!r}"
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            chunk = os.read(fd, size - len(data))
            assert chunk, f"{what}: EOF after {data!r}"
            data += chunk
    return data


def s_client(port: int, certs: Certs, *args: str | Path) -> subprocess.Popen[bytes]:
    assert OPENSSL is not None
    return subprocess.Popen(
        [
            OPENSSL,
            "s_client",
            "-connect",
            f"127.0.0.1:{port}",
            "-CAfile",
            str(certs.ca),
            "-verify_return_error",
            "-verify_hostname",
            "localhost",
            "-quiet",  # only the server's bytes on stdout
            "-no_ign_eof",  # stdin's end: close_notify, and exit
            *map(str, args),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@needs_openssl
@pytest.mark.parametrize("mutual", [False, True], ids=["server-auth", "mutual"])
def test_openssl_s_client_gets_the_exact_reply(
    certs: Certs, servers: list[ServerProcess], mutual: bool
) -> None:
    extra = ("--ca-certs", certs.ca) if mutual else ()
    servers.append(server := tls_serve(certs, "--tcp-only", *extra))
    request = "héllo straße from openssl ﬁn\n".encode()
    client = s_client(server.port, certs, *(("-cert", certs.client) if mutual else ()))
    assert client.stdin is not None
    assert client.stdout is not None
    try:
        client.stdin.write(request)
        client.stdin.flush()
        reply = read_exactly(client.stdout.fileno(), len(upper_bytes(request)), "s_client")
        client.stdin.close()
        status = client.wait(timeout=PROCESS_TIMEOUT)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
        client.stdout.close()
        assert client.stderr is not None
        client.stderr.close()
    assert status == 0
    assert reply == "HÉLLO STRASSE FROM OPENSSL FIN\n".encode()
    status, _, err = server.stop()
    assert (status, err) == (0, "")


class SServer:
    """``openssl s_server -rev``: an echo server that sends each line back
    reversed (it has no uppercase mode). A palindrome in capitals is its own
    uppercase and its own reverse, so it answers those as trio-upper would."""

    def __init__(self, certfile: Path) -> None:
        assert OPENSSL is not None
        self.proc = subprocess.Popen(
            [OPENSSL, "s_server", "-accept", "127.0.0.1:0", "-cert", str(certfile), "-rev"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        seen = b""
        while (found := re.search(rb"ACCEPT 127\.0\.0\.1:(\d+)\n", seen)) is None:
            seen += read_exactly(self.proc.stdout.fileno(), 1, "s_server's ACCEPT line")
        self.port = int(found.group(1))

    def stop(self) -> None:
        self.proc.kill()
        self.proc.communicate(timeout=PROCESS_TIMEOUT)


@pytest.fixture
def s_servers() -> Iterator[list[SServer]]:
    started: list[SServer] = []
    yield started
    for server in started:
        server.stop()


@needs_openssl
def test_our_client_against_openssl_s_server(certs: Certs, s_servers: list[SServer]) -> None:
    s_servers.append(server := SServer(certs.combined))
    palindromes = b"ABA\nXYZZYX\nRACECAR\n"
    # A whole session: handshake, replies checked, close_notify, exit 0.
    ok = tls_client(server.port, "--cafile", certs.ca, input=palindromes)
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, palindromes, b"")
    # A reply that is not the uppercase is an error, not silently printed.
    wrong = tls_client(server.port, "--cafile", certs.ca, input=b"abc\n")
    assert one_error_line(wrong) == (
        "trio-upper: error: the server's reply is not the uppercase of what was sent"
    )
    untrusted = tls_client(server.port, input=b"ABA\n")
    assert "unable to get local issuer certificate" in one_error_line(untrusted)


@needs_openssl
def test_our_client_rejects_an_expired_openssl_s_server(
    certs: Certs, s_servers: list[SServer]
) -> None:
    s_servers.append(server := SServer(certs.expired))
    result = tls_client(server.port, "--cafile", certs.ca, input=b"ABA\n")
    assert "certificate verify failed: certificate has expired" in one_error_line(result)

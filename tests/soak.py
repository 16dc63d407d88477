"""A soak test: the real server under mixed TCP and UDP load, with faults, for minutes.

Run it from the repository root (pytest does not collect it)::

    python -m tests.soak --minutes 2

It starts ``python -m trio_upper serve --host 127.0.0.1 --port 0
--udp-rate-limit 0`` as a subprocess, then runs TCP and UDP clients against it
until the time is up. Each TCP connection plays one scenario, picked at random:
a plain exchange, a half-close before reading, a slow reader, a reset (SO_LINGER
0) mid-request or mid-reply, or a connect-and-vanish. Requests are random mixes
of ASCII, UTF-8 that grows or shrinks when uppercased, invalid bytes and raw
random bytes, sent in random chunks. Every byte that comes back is checked
against :func:`trio_upper.transform.upper_bytes`: the whole reply of every
exchange that completes, and the part received before a reset.

The server's resident memory (VmRSS) is read after the warm-up and at the end,
under the same load. The run fails (exit status 1) on any mismatch, a server
that dies or exits badly or logs an error, a client that stalls or meets an
error it did not cause, or RSS growth beyond ``--max-rss-growth`` MiB.
"""

from __future__ import annotations

import argparse
import collections
import math
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import trio

from trio_upper.transform import upper_bytes

# The server as the nox session and a user would start it. No rate limit:
# every UDP client here shares one source address.
SERVER_ARGS = ["serve", "--host", "127.0.0.1", "--port", "0", "--udp-rate-limit", "0"]

# Real seconds any one connection or datagram may take before the run counts
# it as stalled: far beyond anything a healthy server on loopback needs.
STALL = 30.0

# How long a UDP client waits for a reply before counting the datagram lost.
# Loopback does not lose datagrams unless a buffer overflows, so losses are
# reported but are not a failure.
UDP_WAIT = 2.0

# Building blocks of requests: ASCII; UTF-8 that grows ("ΐ" triples, "ß" and
# "ﬁ" double), shrinks or keeps its length; characters split across pieces;
# invalid bytes.
PIECES = [
    b"hello ",
    b"lecture ",
    b"\n",
    b"\r\n",
    b"\x00",
    "straße ".encode(),
    "ΐ".encode(),
    "ŉ".encode(),
    "ﬁ".encode(),
    "çà ".encode(),
    "日本語 ".encode(),
    "🙂".encode(),
    "ǅ".encode(),
    b"\xff",
    b"\xfe\xfd",
    b"\xe2\x82",
    b"\xc3",
    b"\xed\xa0\x80",  # an encoded surrogate: invalid
]

SCENARIOS = {
    # name: weight
    "exchange": 40,
    "half_close_then_read": 15,
    "slow_reader": 10,
    "reset_mid_reply": 10,
    "reset_mid_request": 10,
    "connect_and_vanish": 10,
}
FAULTS = frozenset(SCENARIOS) - {"exchange"}


@dataclass
class Counts:
    connections: int = 0
    exchanges_checked: int = 0
    partial_replies_checked: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    scenarios: collections.Counter[str] = field(default_factory=collections.Counter)
    datagrams_sent: int = 0
    datagrams_checked: int = 0
    datagrams_lost: int = 0
    datagrams_abandoned: int = 0
    mismatches: int = 0
    stalls: int = 0
    errors: int = 0
    problems: list[str] = field(default_factory=list)

    def problem(self, text: str) -> None:
        # The first few, so that a broken server does not flood the report.
        if len(self.problems) < 10:
            self.problems.append(text)


def random_payload(rng: random.Random, size: int) -> bytes:
    if rng.random() < 0.1:
        return rng.randbytes(size)  # mostly invalid UTF-8
    data = b"".join(rng.choices(PIECES, k=max(1, size // 4)))
    return data[:size] if rng.random() < 0.5 else data  # sometimes cut mid-character


def random_size(rng: random.Random, largest: int) -> int:
    """Log-uniform from 1 to ``largest``: mostly small, now and then large."""
    return int(math.exp(rng.uniform(0, math.log(largest))))


def random_cuts(rng: random.Random, data: bytes) -> list[bytes]:
    pieces = []
    start = 0
    while start < len(data):
        size = rng.choice([1, 2, 3, 7, 100, 1000, 4096, 16384, 65536])
        pieces.append(data[start : start + size])
        start += size
    return pieces


def first_difference(got: bytes, expected: bytes) -> int:
    return next(
        (i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b),
        min(len(got), len(expected)),
    )


class Worker:
    """One TCP client that plays scenarios back to back until the end."""

    def __init__(self, port: int, rng: random.Random, counts: Counts) -> None:
        self.port = port
        self.rng = rng
        self.counts = counts

    async def connect(self) -> trio.SocketStream:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Tens of thousands of our connections end in TIME_WAIT, each holding
        # an ephemeral port for a minute. With SO_REUSEADDR set, they do not
        # stop a bind with SO_REUSEADDR of that port (the test suite's, run
        # right after this, say); without it they would.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            await sock.connect(("127.0.0.1", self.port))
        except BaseException:
            sock.close()
            raise
        self.counts.connections += 1
        return trio.SocketStream(sock)

    async def send(self, stream: trio.SocketStream, data: bytes, eof: bool = True) -> None:
        for piece in random_cuts(self.rng, data):
            await stream.send_all(piece)
            self.counts.bytes_sent += len(piece)
            if self.rng.random() < 0.05:
                await trio.sleep(0.001)
        if eof:
            await stream.send_eof()

    async def receive_all(self, stream: trio.SocketStream, slow: bool = False) -> bytes:
        reply = bytearray()
        while True:
            size = self.rng.randint(1, 512) if slow else self.rng.choice([1, 100, 65536])
            chunk = await stream.receive_some(size)
            if not chunk:
                return bytes(reply)
            reply += chunk
            self.counts.bytes_received += len(chunk)
            if slow:
                await trio.sleep(self.rng.uniform(0, 0.002))

    def check(self, scenario: str, data: bytes, reply: bytes, *, whole: bool) -> None:
        expected = upper_bytes(data)
        good = reply == expected if whole else expected.startswith(reply)
        if whole:
            self.counts.exchanges_checked += 1
        else:
            self.counts.partial_replies_checked += 1
        if not good:
            self.counts.mismatches += 1
            at = first_difference(reply, expected)
            self.counts.problem(
                f"{scenario}: {len(reply)} bytes back for {len(data)} sent "
                f"({len(expected)} expected{'' if whole else ' at most'}); first difference "
                f"at byte {at}: {reply[at : at + 12]!r} != {expected[at : at + 12]!r}"
            )

    async def exchange(self, *, slow: bool) -> None:
        # Send and read at once, as a pipe through ``trio-upper tcp`` does.
        largest = 16_384 if slow else 262_144
        data = random_payload(self.rng, random_size(self.rng, largest))
        async with await self.connect() as stream:
            reply: list[bytes] = []

            async def collect() -> None:
                reply.append(await self.receive_all(stream, slow))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(collect)
                await self.send(stream, data)
        self.check("slow_reader" if slow else "exchange", data, reply[0], whole=True)

    async def half_close_then_read(self) -> None:
        data = random_payload(self.rng, random_size(self.rng, 131_072))
        async with await self.connect() as stream:
            await self.send(stream, data)
            if self.rng.random() < 0.5:
                await trio.sleep(self.rng.uniform(0, 0.05))
            reply = await self.receive_all(stream)
        self.check("half_close_then_read", data, reply, whole=True)

    async def reset_mid_reply(self) -> None:
        data = random_payload(self.rng, self.rng.randint(4096, 524_288))
        # Never wait for more than the server must send before our end of
        # stream: it may hold back an incomplete character at the end.
        owed = len(upper_bytes(data)) - 3
        if owed < 1:
            return
        want = self.rng.randint(1, owed)
        stream = await self.connect()
        got = bytearray()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.send, stream, data, False)
            while len(got) < want:
                chunk = await stream.receive_some(want - len(got))
                if not chunk:
                    break
                got += chunk
                self.counts.bytes_received += len(chunk)
            nursery.cancel_scope.cancel()
        if len(got) < want:
            self.counts.mismatches += 1
            self.counts.problem(f"reset_mid_reply: end of stream after {len(got)} of {want}")
        self.check("reset_mid_reply", data, bytes(got), whole=False)
        await reset(stream)

    async def reset_mid_request(self) -> None:
        data = random_payload(self.rng, random_size(self.rng, 131_072))
        stream = await self.connect()
        sent = data[: self.rng.randint(0, len(data))]
        await self.send(stream, sent, eof=False)
        await reset(stream)

    async def connect_and_vanish(self) -> None:
        stream = await self.connect()
        if self.rng.random() < 0.5:
            await self.send(stream, random_payload(self.rng, self.rng.randint(1, 100)), eof=False)
        if self.rng.random() < 0.5:
            await reset(stream)
        else:
            await stream.aclose()

    async def run(self, until: float) -> None:
        plays: dict[str, Callable[[], Awaitable[None]]] = {
            "exchange": lambda: self.exchange(slow=False),
            "slow_reader": lambda: self.exchange(slow=True),
            "half_close_then_read": self.half_close_then_read,
            "reset_mid_reply": self.reset_mid_reply,
            "reset_mid_request": self.reset_mid_request,
            "connect_and_vanish": self.connect_and_vanish,
        }
        names, weights = list(SCENARIOS), list(SCENARIOS.values())
        while trio.current_time() < until:
            scenario = self.rng.choices(names, weights)[0]
            self.counts.scenarios[scenario] += 1
            try:
                with trio.fail_after(STALL):
                    await plays[scenario]()
            except trio.TooSlowError:
                self.counts.stalls += 1
                self.counts.problem(f"{scenario}: no progress for {STALL:g} s")
            except (OSError, trio.BrokenResourceError) as exc:
                # The faults are ours: the server never resets or refuses.
                self.counts.errors += 1
                self.counts.problem(f"{scenario}: {exc!r} (cause: {exc.__cause__!r})")


async def reset(stream: trio.SocketStream) -> None:
    """Close with a TCP reset instead of a FIN: SO_LINGER with a zero timeout."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await stream.aclose()


async def udp_client(port: int, rng: random.Random, counts: Counts, until: float) -> None:
    """Datagrams one at a time, each reply checked. A fresh socket after a
    loss, so that a late reply cannot be taken for the next one's."""
    while trio.current_time() < until:
        try:
            await udp_session(port, rng, counts, until)
        except OSError as exc:  # refused: nothing listens on the port any more
            counts.errors += 1
            counts.problem(f"udp: {exc!r}")


async def udp_session(port: int, rng: random.Random, counts: Counts, until: float) -> None:
    """Datagrams from one socket until one is lost or abandoned, or the end."""
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        await sock.connect(("127.0.0.1", port))
        while trio.current_time() < until:
            # Under 21,836 bytes: even tripled, the reply fits in a datagram,
            # so it is always exactly upper_bytes of the request.
            request = random_payload(rng, random_size(rng, 16_384)) if rng.random() > 0.02 else b""
            await sock.send(request)
            counts.datagrams_sent += 1
            if rng.random() < 0.05:
                # A sender that vanishes before its reply: the server gets
                # an ICMP port unreachable for it.
                counts.datagrams_abandoned += 1
                counts.scenarios["udp_vanish"] += 1
                return
            with trio.move_on_after(UDP_WAIT):
                reply = await sock.recv(70_000)
                counts.datagrams_checked += 1
                if reply != upper_bytes(request):
                    counts.mismatches += 1
                    counts.problem(f"udp: {len(reply)} bytes back for {len(request)}")
                continue
            counts.datagrams_lost += 1
            return


def rss_kib(pid: int) -> int | None:
    """The process's resident set size in KiB, from /proc (None without it)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None


@dataclass
class Memory:
    after_warm_up: int | None = None
    at_end: int | None = None
    peak: int | None = None


async def soak(
    proc: subprocess.Popen[bytes], port: int, args: argparse.Namespace, counts: Counts
) -> tuple[Memory, bool]:
    """Run the load; returns the server's memory and whether it died."""
    master = random.Random(args.seed)
    start = trio.current_time()
    warm_up_end = start + args.warm_up
    until = start + args.minutes * 60
    memory = Memory()
    died = False

    async def watch(cancel: trio.CancelScope) -> None:
        nonlocal died
        while True:
            now = trio.current_time()
            if proc.poll() is not None:
                died = True
                cancel.cancel()
                return
            rss = rss_kib(proc.pid)
            if rss is not None:
                memory.peak = max(memory.peak or 0, rss)
                if now >= warm_up_end and memory.after_warm_up is None:
                    memory.after_warm_up = rss
                # Read while the load still runs, like the first reading.
                if now < until:
                    memory.at_end = rss
            await trio.sleep(0.25)

    async with trio.open_nursery() as outer:
        outer.start_soon(watch, outer.cancel_scope)
        async with trio.open_nursery() as load:
            for _ in range(args.tcp_clients):
                worker = Worker(port, random.Random(master.getrandbits(64)), counts)
                load.start_soon(worker.run, until)
            for _ in range(args.udp_clients):
                rng = random.Random(master.getrandbits(64))
                load.start_soon(udp_client, port, rng, counts, until)
        outer.cancel_scope.cancel()
    return memory, died


def start_server(stderr: IO[bytes]) -> tuple[subprocess.Popen[bytes], int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "trio_upper", *SERVER_ARGS],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=stderr,
    )
    assert proc.stdout is not None
    first_line = proc.stdout.readline().decode()
    port = first_line.partition("tcp 127.0.0.1:")[2].split(",")[0].split(" ")[0]
    if not port.isdigit():
        proc.kill()
        proc.wait()
        raise SystemExit(f"soak: the server did not start: {first_line!r}")
    return proc, int(port)


def mib(kib: int | None) -> str:
    return "n/a" if kib is None else f"{kib / 1024:.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--minutes", type=float, default=2.0, help="how long (default: 2)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument("--tcp-clients", type=int, default=16, help="TCP clients at once (16)")
    parser.add_argument("--udp-clients", type=int, default=4, help="UDP clients at once (4)")
    parser.add_argument(
        "--warm-up",
        type=float,
        default=None,
        metavar="SECONDS",
        help="load before the first memory reading (default: a sixth of the run, 5 to 30 s)",
    )
    parser.add_argument(
        "--max-rss-growth",
        type=float,
        default=10.0,
        metavar="MIB",
        help="fail if the server's RSS grows more than this after the warm-up (default: 10)",
    )
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.randrange(1 << 32)
    if args.warm_up is None:
        args.warm_up = min(30.0, max(5.0, args.minutes * 60 / 6))

    counts = Counts()
    failures: list[str] = []
    with tempfile.TemporaryFile() as stderr:
        proc, port = start_server(stderr)
        print(
            f"soak: {args.minutes:g} min against server pid {proc.pid} on port {port} "
            f"(seed {args.seed}, {args.tcp_clients} TCP + {args.udp_clients} UDP clients, "
            f"warm-up {args.warm_up:g} s)",
            flush=True,
        )
        started = time.monotonic()
        try:
            memory, died = trio.run(soak, proc, port, args, counts)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                out, _ = proc.communicate(timeout=STALL)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
                failures.append("the server did not stop within 30 s of SIGTERM")
        elapsed = time.monotonic() - started
        stderr.seek(0)
        log = stderr.read().decode(errors="replace")

    summary = out.decode(errors="replace").strip().splitlines()
    if died:
        failures.append(f"the server died during the run (exit status {proc.returncode})")
    elif proc.returncode != 0:
        failures.append(f"the server exited with status {proc.returncode} after SIGTERM")
    bad_lines = [line for line in log.splitlines() if "ERROR" in line or "Traceback" in line]
    if bad_lines:
        failures.append(f"the server logged {len(bad_lines)} errors, first: {bad_lines[0]}")
    if counts.mismatches:
        failures.append(f"{counts.mismatches} replies differ from upper_bytes of the request")
    if counts.stalls or counts.errors:
        failures.append(f"{counts.stalls} stalled and {counts.errors} failed client operations")
    growth: int | None = None
    if memory.after_warm_up is not None and memory.at_end is not None:
        growth = memory.at_end - memory.after_warm_up
        if growth > args.max_rss_growth * 1024:
            failures.append(f"RSS grew {mib(growth)}, more than {args.max_rss_growth:g} MiB")

    faults = sum(n for name, n in counts.scenarios.items() if name in FAULTS | {"udp_vanish"})
    scenario_list = ", ".join(f"{name} {n}" for name, n in sorted(counts.scenarios.items()))
    print(f"ran:         {elapsed:.0f} s")
    print(
        f"tcp:         {counts.connections} connections, "
        f"{counts.bytes_sent / 1e6:.1f} MB sent, {counts.bytes_received / 1e6:.1f} MB received"
    )
    print(
        f"checked:     {counts.exchanges_checked} whole replies, "
        f"{counts.partial_replies_checked} replies cut short by a reset"
    )
    print(f"scenarios:   {scenario_list}")
    print(f"faults:      {faults} injected")
    print(
        f"udp:         {counts.datagrams_sent} datagrams, {counts.datagrams_checked} replies "
        f"checked, {counts.datagrams_lost} lost, {counts.datagrams_abandoned} abandoned"
    )
    print(f"mismatches:  {counts.mismatches}")
    print(f"client errs: {counts.stalls} stalls, {counts.errors} errors")
    print(
        f"server RSS:  {mib(memory.after_warm_up)} after warm-up, {mib(memory.at_end)} at the "
        f"end, change {'n/a' if growth is None else ('+' if growth >= 0 else '') + mib(growth)} "
        f"(bound +{args.max_rss_growth:g} MiB), peak {mib(memory.peak)}"
    )
    print(
        f"server:      exit status {proc.returncode}; {summary[-1] if summary else 'no summary'}"
    )
    for problem in counts.problems:
        print(f"  problem: {problem}")
    if failures:
        for failure in failures:
            print(f"FAIL: {failure}")
        return 1
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())

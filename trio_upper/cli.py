"""The command line: ``python -m trio_upper serve|tcp|udp`` (or ``trio-upper``).

This module only plugs things together: it parses flags, sets up logging,
connects the server to signals and the clients to stdin/stdout, and turns
every failure into one line on stderr and an exit status. No traceback
reaches the user unless they ask for one with ``-v``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import signal
import socket
import sys
import textwrap
from collections.abc import Awaitable, Callable, Sequence

import trio

from . import __version__, metrics, proxy, systemd, tls, workers
from .errors import UserError, leaves, plural
from .proxy import DEFAULT_ALLOW
from .ratelimit import DEFAULT_RATE
from .server import (
    DEFAULT_GRACE,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_PORT,
    Bound,
    Endpoint,
    ServerConfig,
    ServerStats,
    UpperServer,
    adopt_and_bind_metrics,
    bind,
    listener_endpoint,
    listener_socket,
)
from .stdio import (
    DEFAULT_HOST,
    FdReceiveStream,
    FdSendStream,
    LineSource,
    pipe_line_reader,
    read_terminal_line,
)
from .tcp_client import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_TCP_TIMEOUT,
    connect_tcp,
    tcp_interactive,
    tcp_stream,
)
from .udp import MAX_PAYLOAD_IPV6
from .udp_client import DEFAULT_RETRIES, DEFAULT_UDP_TIMEOUT, resolve_udp, udp_session

__all__ = ["build_parser", "main"]

# Exit statuses: 1 for any error, 2 for bad usage (argparse's own), and the
# shell's 128 + SIGINT for a client interrupted with Ctrl-C.
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130

_STDIN, _STDOUT = 0, 1


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0-65535, not {port}")
    return port


def _seconds(text: str, *, zero_ok: bool = True) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"seconds must be a finite number, not {text}")
    if value < 0 or (value == 0 and not zero_ok):
        limit = "0 or more" if zero_ok else "more than 0"
        raise argparse.ArgumentTypeError(f"seconds must be {limit}, not {text}")
    return value


def _positive_seconds(text: str) -> float:
    return _seconds(text, zero_ok=False)


def _count(text: str, *, least: int = 0) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be {least} or more, not {value}")
    return value


def _positive_count(text: str) -> int:
    return _count(text, least=1)


def _host_port(text: str) -> tuple[str | None, int]:
    """``HOST:PORT``, ``[IPv6]:PORT`` or ``:PORT`` (every interface)."""
    host, colon, port_text = text.rpartition(":")
    if not colon:
        raise argparse.ArgumentTypeError(f"not HOST:PORT: {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return (host or None), _port(port_text)


def _allow_list(text: str) -> list[proxy.Network]:
    try:
        return proxy.parse_allow_list(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number per second: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (off) or a positive number, not {text}")
    return value


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's, but never wrapping a line at a hyphen: help names options
    and commands (``--udp-only``, ``pip install 'trio-upper[metrics]'``)
    that must stay whole to be copied."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return textwrap.fill(
            " ".join(text.split()),
            width,
            initial_indent=indent,
            subsequent_indent=indent,
            break_on_hyphens=False,
        )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every command."""
    common = argparse.ArgumentParser(add_help=False)
    noise = common.add_mutually_exclusive_group()
    noise.add_argument(
        "-v", "--verbose", action="store_true", help="log each connection and error (debug)"
    )
    noise.add_argument("-q", "--quiet", action="store_true", help="print errors only")

    parser = argparse.ArgumentParser(
        prog="trio-upper",
        formatter_class=_HelpFormatter,
        description="The lecture's uppercase service over TCP and UDP, built on trio.",
        epilog="Run 'trio-upper COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"trio-upper {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        formatter_class=_HelpFormatter,
        parents=[common],
        help="run the server (TCP and UDP on one port)",
        description="Serve uppercase on TCP and UDP. Ctrl-C or SIGTERM stops it: "
        "new connections are refused at once, open ones get the grace period.",
    )
    serve.add_argument(
        "--host",
        default=None,
        help="address or name to listen on (default: all interfaces, IPv4 and IPv6)",
    )
    serve.add_argument(
        "-p",
        "--port",
        type=_port,
        default=None,
        help=f"port for both TCP and UDP; 0 lets the OS choose (default: {DEFAULT_PORT})",
    )
    only = serve.add_mutually_exclusive_group()
    only.add_argument("--tcp-only", action="store_true", help="serve TCP only")
    only.add_argument("--udp-only", action="store_true", help="serve UDP only")
    serve.add_argument(
        "--ascii",
        action="store_true",
        help="uppercase only a-z, byte for byte, as the lecture did "
        "(default: all of Unicode in UTF-8 text)",
    )
    serve.add_argument(
        "--grace",
        type=_seconds,
        default=DEFAULT_GRACE,
        metavar="SECONDS",
        help="on Ctrl-C or SIGTERM, seconds open connections may take to finish "
        "(default: %(default)s)",
    )
    serve.add_argument(
        "--max-connections",
        type=_positive_count,
        default=DEFAULT_MAX_CONNECTIONS,
        metavar="N",
        help="TCP connections handled at once; more wait in the kernel's queue "
        "until one closes (default: %(default)s)",
    )
    serve.add_argument(
        "--idle-timeout",
        type=_seconds,
        default=DEFAULT_IDLE_TIMEOUT,
        metavar="SECONDS",
        help="close a TCP connection that sends nothing for this long; 0 never does "
        "(default: %(default)g)",
    )
    serve.add_argument(
        "--udp-rate-limit",
        type=_rate,
        default=DEFAULT_RATE,
        metavar="N",
        help="UDP replies per second to any one network (a /24, or an IPv6 /56), so "
        "that forged requests cannot aim a flood at a victim; 0 turns it off "
        "(default: %(default)g, with a burst of 2 seconds' worth)",
    )
    tls = serve.add_argument_group(
        "TLS", "TLS on every TCP connection; UDP stays plain text (there is no DTLS)."
    )
    tls.add_argument(
        "--certfile",
        metavar="FILE",
        help="serve TCP over TLS with this PEM certificate chain (default: plain TCP)",
    )
    tls.add_argument(
        "--keyfile",
        metavar="FILE",
        help="the certificate's PEM private key (default: read from --certfile)",
    )
    tls.add_argument(
        "--ca-certs",
        metavar="FILE",
        help="require client certificates signed by these PEM CAs: mutual TLS "
        "(default: no client certificate asked for)",
    )
    serve.add_argument(
        "--workers",
        type=_positive_count,
        default=1,
        metavar="N",
        help="serve from N worker processes on the one port, supervised by this one; "
        "limits apply to each worker (default: %(default)s, this process alone)",
    )
    serve.add_argument(
        "--reuse-port",
        action="store_true",
        help="set SO_REUSEPORT, so that other servers started with it share the port "
        "and the kernel spreads clients over them (default: a port in use is an error)",
    )
    proxy = serve.add_argument_group(
        "behind a load balancer",
        "The PROXY protocol (v1 or v2), as nginx, HAProxy and cloud load balancers send it.",
    )
    proxy.add_argument(
        "--proxy-protocol",
        action="store_true",
        help="TCP connections from --proxy-allow-from must begin with a PROXY protocol "
        "header, and their datagrams may; the client it names is the peer (logs, rate "
        "limit) (default: off)",
    )
    proxy.add_argument(
        "--proxy-allow-from",
        type=_allow_list,
        metavar="ADDR[/BITS],...",
        help=f"who may send PROXY headers; from anyone else the bytes are data (default: "
        f"{DEFAULT_ALLOW})",
    )
    serve.add_argument(
        "--metrics",
        type=_host_port,
        metavar="HOST:PORT",
        help="serve Prometheus metrics over HTTP at http://HOST:PORT/metrics; needs "
        "pip install 'trio-upper[metrics]' (default: off)",
    )
    serve.set_defaults(run=_serve, command_parser=serve)

    tcp = commands.add_parser(
        "tcp",
        formatter_class=_HelpFormatter,
        parents=[common],
        help="TCP client: prompt for lines, or copy stdin like nc",
        description="Send lines to the server over TCP and print the replies. "
        "On a terminal it prompts for each line; with a pipe or file on stdin "
        "it streams stdin to the server and the replies to stdout.",
    )
    _client_target(tcp)
    tcp.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=DEFAULT_TCP_TIMEOUT,
        metavar="SECONDS",
        help="seconds to wait for the server to reply or to read (default: %(default)s)",
    )
    tcp.add_argument(
        "--connect-timeout",
        type=_positive_seconds,
        default=DEFAULT_CONNECT_TIMEOUT,
        metavar="SECONDS",
        help="seconds to wait for the connection and the TLS handshake (default: %(default)s)",
    )
    tcp.add_argument(
        "--tls",
        action="store_true",
        help="speak TLS, verifying the server's certificate and name (default: plain TCP)",
    )
    tcp.add_argument(
        "--cafile",
        metavar="FILE",
        help="with --tls, trust the CAs in this PEM file (default: the system's trust store)",
    )
    tcp.add_argument(
        "--server-name",
        metavar="NAME",
        help="with --tls, the name the server's certificate must carry (default: HOST)",
    )
    tcp.add_argument(
        "--certfile",
        metavar="FILE",
        help="with --tls, present this PEM certificate chain to a server that asks for "
        "one (serve --ca-certs) (default: none)",
    )
    tcp.add_argument(
        "--keyfile",
        metavar="FILE",
        help="the client certificate's PEM private key (default: read from --certfile)",
    )
    tcp.set_defaults(run=_tcp, command_parser=tcp)

    udp = commands.add_parser(
        "udp",
        formatter_class=_HelpFormatter,
        parents=[common],
        help="UDP client: one datagram per line, with retries",
        description="Send each line (without its line ending) as one datagram "
        "and print each reply on a line. A lost datagram is sent again.",
    )
    _client_target(udp)
    udp.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=DEFAULT_UDP_TIMEOUT,
        metavar="SECONDS",
        help="seconds to wait for a reply to the first try; each retry waits "
        "twice as long as the one before (default: %(default)s)",
    )
    udp.add_argument(
        "--retries",
        type=_count,
        default=DEFAULT_RETRIES,
        metavar="N",
        help="tries after the first before giving up on a line (default: %(default)s)",
    )
    udp.set_defaults(run=_udp, command_parser=udp)
    return parser


def _client_target(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "host",
        nargs="?",
        default=DEFAULT_HOST,
        metavar="HOST",
        help="server name or address (default: %(default)s)",
    )
    command.add_argument(
        "-p", "--port", type=_port, default=DEFAULT_PORT, help="server port (default: %(default)s)"
    )


def _say(args: argparse.Namespace, message: str) -> None:
    """Print a status line unless -q, or in a worker (whose stdout is its
    parent's). A server whose stdout has gone (a closed pipe, a full disk)
    keeps serving: it just stops saying so."""
    if args.quiet or getattr(args, "worker", None):
        return
    try:
        print(message, flush=True)
    except OSError:
        # Point fd 1 at /dev/null so that no later write, nor the flush at
        # exit, fails again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, _STDOUT)
        os.close(devnull)


def _usage_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with flags that argparse accepts one by one but that do
    not go together, if anything."""
    if args.command == "serve":
        if args.certfile is None and (args.keyfile is not None or args.ca_certs is not None):
            return "--keyfile and --ca-certs go with --certfile"
        if args.certfile is not None and args.udp_only:
            return "--certfile is for TCP, and --udp-only serves none (UDP has no TLS)"
        if args.proxy_allow_from is not None and not args.proxy_protocol:
            return "--proxy-allow-from goes with --proxy-protocol"
    elif args.command == "tcp":
        with_tls = (args.cafile, args.server_name, args.certfile)
        if not args.tls and any(value is not None for value in with_tls):
            return "--cafile, --server-name and --certfile go with --tls"
        if args.certfile is None and args.keyfile is not None:
            return "--keyfile goes with --certfile"
    return None


def _server_config(args: argparse.Namespace) -> ServerConfig:
    """The server's configuration from the flags.

    Raises:
      UserError: a file named by a flag cannot be used.
    """
    if args.metrics is not None:
        metrics.require()
    proxy_allow = None
    if args.proxy_protocol:
        allowed = args.proxy_allow_from or proxy.parse_allow_list(DEFAULT_ALLOW)
        proxy_allow = proxy.AllowList(allowed)
    return ServerConfig(
        host=args.host,
        port=DEFAULT_PORT if args.port is None else args.port,
        tcp=not args.udp_only,
        udp=not args.tcp_only,
        ascii_only=args.ascii,
        grace=args.grace,
        udp_rate_limit=args.udp_rate_limit,
        max_connections=args.max_connections,
        idle_timeout=args.idle_timeout,
        tls=tls.server_context(args.certfile, args.keyfile, args.ca_certs)
        if args.certfile is not None
        else None,
        metrics=args.metrics,
        proxy_allow=proxy_allow,
        reuse_port=args.reuse_port,
    )


def _inherited_sockets(args: argparse.Namespace) -> list[systemd.ListenFd] | None:
    """The sockets systemd passed us (socket activation), if any."""
    inherited = systemd.listen_fds()
    if inherited is None:
        return None
    if args.host is not None or args.port is not None:
        for passed in inherited:
            passed.socket.close()
        raise UserError(
            "--host and --port cannot be used with sockets from systemd (LISTEN_FDS): "
            "the socket unit says where to listen"
        )
    if not inherited:
        raise UserError("systemd passed no sockets (LISTEN_FDS=0)")
    return inherited


def _ready_line(served: list[Endpoint], inherited: bool) -> str:
    uppercase = [str(e) for e in served if e.protocol != "metrics"]
    line = f"Serving uppercase on {', '.join(uppercase)}"
    if inherited:
        line += " (sockets from systemd)"
    if any(e.protocol == "tcp+tls" for e in served) and any(e.protocol == "udp" for e in served):
        line += "; UDP is not encrypted"
    if where := [str(e) for e in served if e.protocol == "metrics"]:
        line += f"; metrics at {', '.join(where)}"
    return line


async def _serve(args: argparse.Namespace) -> None:
    if args.workers > 1:
        await _serve_with_workers(args)
        return
    inherited = _inherited_sockets(args)
    config = _server_config(args)
    server = UpperServer(config)
    # Whoever passed us sockets holds them too: once we close ours, new
    # connections wait in their queues (for the next start) and are not
    # refused.
    refusing = "refusing new connections" if inherited is None else "not accepting new connections"
    # Signals are caught from before binding, so that a Ctrl-C at any moment
    # is a shutdown and never a KeyboardInterrupt traceback.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def run(task_status: trio.TaskStatus[list[Endpoint]]) -> None:
                await server.run(inherited=inherited, task_status=task_status)
                nursery.cancel_scope.cancel()

            served: list[Endpoint] = await nursery.start(run)
            if args.worker:
                workers.report("ready", served=[list(endpoint) for endpoint in served])
                nursery.start_soon(workers.watch_parent, server.shutdown)
                nursery.start_soon(workers.report_stats, server.stats)
            _announce(args, _ready_line(served, inherited is not None), nursery)
            async for signum in signals:
                if server.stopping:
                    _say(args, "Stopping now.")
                    server.shutdown(grace=0)
                    continue
                server.shutdown()
                systemd.notify("STOPPING=1", f"STATUS=Stopping: {refusing}")
                await server.stopped_accepting()
                name = signal.Signals(signum).name
                if server.stats.active:
                    waiting = (
                        f"waiting up to {config.grace:g} s "
                        f"for {plural(server.stats.active, 'open connection')}"
                    )
                    systemd.notify(f"STATUS=Stopping: {waiting}")
                    _say(args, f"{name}: {refusing}; {waiting} (Ctrl-C again to stop now)")
    if args.worker:
        workers.report("stopped", stats=workers.stats_fields(server.stats))
    _say(args, _summary(server.stats))


def _announce(args: argparse.Namespace, ready: str, nursery: trio.Nursery) -> None:
    """Say that the server is ready: on stdout, to systemd, and from now on
    to its watchdog."""
    _say(args, f"{ready} (Ctrl-C to stop)")
    systemd.notify("READY=1", f"STATUS={ready}")
    if (interval := systemd.watchdog_interval()) is not None:
        # In this nursery, beside the server: a stuck event loop stops the
        # pings, and systemd restarts us.
        nursery.start_soon(systemd.watchdog, interval)


async def _serve_with_workers(args: argparse.Namespace) -> None:
    """The parent of --workers: bind, run the workers, say what they do
    together. See :mod:`trio_upper.workers`."""
    inherited = _inherited_sockets(args)
    config = _server_config(args)
    sets: list[Bound] = []
    # As in _serve: from before binding, a signal is a shutdown.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        try:
            await _bind_for_workers(args.workers, config, inherited, sets)
            handed_down = [
                [systemd.ListenFd(listener_socket(tcp), "tcp") for tcp in bound.tcp]
                + [systemd.ListenFd(sock.socket, "udp") for sock in bound.udp]
                for bound in sets
            ]
            supervisor = workers.Supervisor(
                args.workers, _worker_args(args), handed_down, config.grace
            )
            async with trio.open_nursery() as nursery:

                async def run(task_status: trio.TaskStatus[list[Endpoint]]) -> None:
                    await supervisor.run(task_status=task_status)
                    nursery.cancel_scope.cancel()

                served: list[Endpoint] = list(await nursery.start(run))
                if http := sets[0].metrics:
                    await nursery.start(metrics.serve_metrics, http, supervisor.stats)
                    served += [listener_endpoint(listener, "metrics") for listener in http]
                ready = _ready_line(served, inherited is not None)
                _announce(args, f"{ready}; {plural(args.workers, 'worker')}", nursery)
                async for signum in signals:
                    if supervisor.stopping:
                        _say(args, "Stopping now.")
                        supervisor.stop()
                        continue
                    supervisor.stop()
                    systemd.notify("STOPPING=1", "STATUS=Stopping: workers refuse new connections")
                    name = signal.Signals(signum).name
                    _say(
                        args,
                        f"{name}: stopping {plural(args.workers, 'worker')}; open connections "
                        f"get up to {config.grace:g} s (Ctrl-C again to stop now)",
                    )
        finally:
            for bound in {id(bound): bound for bound in sets}.values():
                await bound.aclose()
    _say(args, _summary(supervisor.stats, workers=args.workers))


async def _bind_for_workers(
    count: int, config: ServerConfig, inherited: list[systemd.ListenFd] | None, sets: list[Bound]
) -> None:
    """Fill ``sets`` with the sockets of each worker (see workers.py for
    why each gets its own where it can). ``sets`` holds what was bound so
    far if this raises, for the caller to close."""
    if inherited is not None:
        # systemd's one set: every worker waits on it.
        sets += [await adopt_and_bind_metrics(inherited, config)] * count
        return
    if not hasattr(socket, "SO_REUSEPORT"):
        sets += [await bind(config)] * count
        return
    config = dataclasses.replace(config, reuse_port=True)
    sets.append(await bind(config))
    # The others on the port the first found (with --port 0), without metrics.
    first = sets[0]
    port = first.udp[0].getsockname()[1] if first.udp else listener_endpoint(first.tcp[0]).port
    again = dataclasses.replace(config, port=port, metrics=None)
    for _ in range(count - 1):
        sets.append(await bind(again))


def _worker_args(args: argparse.Namespace) -> list[str]:
    """The flags every worker gets: the server's own. --host, --port and
    --reuse-port were for the parent's binding, --metrics the parent serves,
    --workers is the parent's."""
    forwarded = [
        "--grace", repr(args.grace),
        "--max-connections", str(args.max_connections),
        "--idle-timeout", repr(args.idle_timeout),
        "--udp-rate-limit", repr(args.udp_rate_limit),
    ]  # fmt: skip
    for flag, on in [
        ("--tcp-only", args.tcp_only),
        ("--udp-only", args.udp_only),
        ("--ascii", args.ascii),
        ("--proxy-protocol", args.proxy_protocol),
        ("--verbose", args.verbose),
        ("--quiet", args.quiet),
    ]:
        if on:
            forwarded.append(flag)
    for flag, value in [
        ("--certfile", args.certfile),
        ("--keyfile", args.keyfile),
        ("--ca-certs", args.ca_certs),
    ]:
        if value is not None:
            forwarded += [flag, os.path.abspath(value)]
    if args.proxy_allow_from is not None:
        forwarded += ["--proxy-allow-from", ",".join(map(str, args.proxy_allow_from))]
    return forwarded


def _summary(stats: ServerStats, workers: int = 1) -> str:
    summary = (
        f"Stopped: served {plural(stats.connections, 'TCP connection')} and "
        f"{plural(stats.udp.datagrams, 'datagram')}"
    )
    if workers > 1:
        summary += f" with {plural(workers, 'worker')}"
    if stats.cut_off:
        summary += (
            f"; {plural(stats.cut_off, 'connection')} cut off at the end of the grace period"
        )
    if stats.udp.rate_limited:
        summary += f"; {plural(stats.udp.rate_limited, 'datagram')} not answered (rate limit)"
    if stats.udp.dropped:
        summary += f"; {plural(stats.udp.dropped, 'reply', 'replies')} not sent (see the log)"
    return summary + "."


async def _tcp(args: argparse.Namespace) -> None:
    context = tls.client_context(args.cafile, args.certfile, args.keyfile) if args.tls else None
    stream = await connect_tcp(
        args.host,
        args.port,
        timeout=args.connect_timeout,
        tls=context,
        server_name=args.server_name,
    )
    stdout = FdSendStream(_STDOUT)
    if os.isatty(_STDIN):
        await tcp_interactive(stream, read_terminal_line, stdout.send_all, timeout=args.timeout)
    else:
        await tcp_stream(stream, FdReceiveStream(_STDIN), stdout, timeout=args.timeout)


async def _udp(args: argparse.Namespace) -> None:
    addresses = await resolve_udp(args.host, args.port)
    read_line: LineSource
    if os.isatty(_STDIN):
        read_line = read_terminal_line
    else:
        read_line = pipe_line_reader(_STDIN, MAX_PAYLOAD_IPV6)
    await udp_session(
        addresses,
        read_line,
        FdSendStream(_STDOUT).send_all,
        where=f"{args.host} port {args.port}",
        timeout=args.timeout,
        retries=args.retries,
    )


def _configure_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.verbose else logging.ERROR if args.quiet else logging.WARNING
    who = f"worker {args.worker} " if args.worker else ""
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s %(levelname)s {who}%(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _exit_status(exc: BaseException, verbose: bool) -> int:
    """Report what stopped the program in one line; return the exit status."""
    found = leaves(exc)
    if any(isinstance(e, KeyboardInterrupt) for e in found):
        # Ctrl-C at a client's prompt: leave the terminal on a fresh line.
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    for error in found:
        if isinstance(error, UserError):
            print(f"trio-upper: error: {error}", file=sys.stderr)
            return EXIT_ERROR
    first = found[0]
    if verbose:
        logging.getLogger("trio_upper").error("internal error", exc_info=first)
    print(
        f"trio-upper: internal error: {type(first).__name__}: {first} "
        "(run with -v for the traceback)",
        file=sys.stderr,
    )
    return EXIT_ERROR


def _open_missing_std_fds() -> None:
    """Give a closed stdin, stdout or stderr /dev/null instead (as a shell's
    ``<&-`` leaves them): otherwise the next file or socket opened would take
    that number, and the clients would read from it or write into it."""
    for fd in (_STDIN, _STDOUT, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # takes the lowest free number: fd


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    _open_missing_std_fds()
    args = build_parser().parse_args(argv)
    if (problem := _usage_problem(args)) is not None:
        command_parser: argparse.ArgumentParser = args.command_parser
        command_parser.error(problem)  # exits 2, as argparse does
    # A worker of `serve --workers` (workers.py); taken out of the
    # environment so that nothing the worker starts believes it is one.
    args.worker = os.environ.pop(workers.WORKER_VARIABLE, None) if args.run is _serve else None
    _configure_logging(args)
    run: Callable[[argparse.Namespace], Awaitable[None]] = args.run
    try:
        trio.run(run, args)
    except BaseException as exc:  # the top: report and exit
        return _exit_status(exc, args.verbose)
    return 0

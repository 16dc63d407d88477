"""systemd, without a dependency: socket activation and the notify protocol.

* Socket activation (``sd_listen_fds(3)``): systemd binds the sockets named in
  a ``.socket`` unit and starts us with them open from file descriptor 3 on,
  ``LISTEN_FDS`` saying how many and ``LISTEN_PID`` whom they are for.
  :func:`listen_fds` takes them. A restart then refuses no connection: they
  wait in the sockets' queues, which systemd holds, for the next process.
* Readiness and the watchdog (``sd_notify(3)``): a datagram to the Unix socket
  named by ``NOTIFY_SOCKET`` (a path, or an abstract name written with a
  leading ``@``) says ``READY=1`` once we serve, ``STOPPING=1`` when shutdown
  begins, ``STATUS=...`` for ``systemctl status``, and ``WATCHDOG=1`` at least
  every ``WATCHDOG_USEC`` microseconds while we are alive.

Both protocols are a few lines each, so they are written here rather than
taken from a library: the server depends on trio alone.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import socket
from collections.abc import MutableMapping

import trio

from .errors import UserError

__all__ = [
    "SD_LISTEN_FDS_START",
    "ListenFd",
    "listen_fds",
    "notify",
    "watchdog",
    "watchdog_interval",
]

logger = logging.getLogger("trio_upper.systemd")

# The first file descriptor systemd passes (after stdin, stdout, stderr).
SD_LISTEN_FDS_START = 3

# The variables of socket activation. They are removed once read, as
# sd_listen_fds(1) does, so that no process we start takes them for its own.
_LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class ListenFd:
    """One socket systemd passed, with the name its unit gave it
    (``FileDescriptorName=``; systemd's default is the unit's name).

    Attributes:
      socket: The socket, owned by the caller from now on.
      name: From ``LISTEN_FDNAMES``, or ``"unknown"`` as sd_listen_fds_with_names
          says when there is none.
    """

    __slots__ = ("name", "socket")

    def __init__(self, sock: socket.socket, name: str) -> None:
        self.socket = sock
        self.name = name


def listen_fds(environ: MutableMapping[str, str] | None = None) -> list[ListenFd] | None:
    """The sockets systemd passed to this process, if it passed any.

    Reads ``LISTEN_PID``, ``LISTEN_FDS`` and ``LISTEN_FDNAMES`` and removes them
    from ``environ`` either way, so that no process we start inherits them.
    Sockets passed to another process (``LISTEN_PID`` is not ours: we were
    started by a process that was passed them) are not ours to take.

    Args:
      environ: Where to read; default :data:`os.environ`.

    Returns:
      None if nothing was passed to this process; else the sockets, in
      order, each marked close-on-exec.

    Raises:
      UserError: the variables are malformed, or a descriptor is not a
          socket.
    """
    if environ is None:
        environ = os.environ
    pid, count, names = (environ.pop(name, None) for name in _LISTEN_VARIABLES)
    if count is None or pid is None:
        return None
    try:
        if int(pid) != os.getpid():
            return None
        number = int(count)
    except ValueError:
        raise UserError(
            f"LISTEN_PID={pid!r}, LISTEN_FDS={count!r}: not the numbers socket activation sets"
        ) from None
    if number < 0:
        raise UserError(f"LISTEN_FDS={count!r}: not a number of sockets")
    labels = names.split(":") if names else []
    passed: list[ListenFd] = []
    try:
        for offset in range(number):
            fd = SD_LISTEN_FDS_START + offset
            try:
                os.set_inheritable(fd, False)
                # The family, type and protocol are read from the descriptor.
                sock = socket.socket(fileno=fd)
            except OSError as exc:
                raise UserError(
                    f"file descriptor {fd} from systemd (LISTEN_FDS={count}) is not a "
                    f"socket: {exc.strerror}"
                ) from None
            name = labels[offset] if offset < len(labels) else "unknown"
            passed.append(ListenFd(sock, name))
    except BaseException:
        for done in passed:
            done.socket.close()
        raise
    return passed


def notify(*fields: str) -> bool:
    """Send ``fields`` (``"READY=1"``, ``"STATUS=..."``) to systemd, if it
    listens (``NOTIFY_SOCKET`` is set).

    Never raises and never waits: a notification that cannot be sent is
    logged and dropped, as sd_notify does; serving matters more.

    Returns:
      Whether the message was sent.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        # An abstract socket: the name begins with a NUL byte on the wire.
        address = "\0" + address[1:]
    message = "\n".join(fields).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.sendto(message, address)
    except OSError as exc:
        level = logging.DEBUG if exc.errno == errno.EAGAIN else logging.WARNING
        logger.log(level, "cannot notify systemd at %s: %s", address.lstrip("\0"), exc)
        return False
    return True


def watchdog_interval(environ: MutableMapping[str, str] | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings, or None if systemd wants none.

    Half of ``WATCHDOG_USEC``, as sd_watchdog_enabled(3) advises, so one
    late ping is not yet a missed one; only if ``WATCHDOG_PID`` is unset or
    names this process.
    """
    if environ is None:
        environ = os.environ
    usec, pid = environ.get("WATCHDOG_USEC"), environ.get("WATCHDOG_PID")
    try:
        if usec is None or (pid is not None and int(pid) != os.getpid()):
            return None
        interval = int(usec) / 2e6
    except ValueError:
        logger.warning("WATCHDOG_USEC=%r, WATCHDOG_PID=%r: ignored, not numbers", usec, pid)
        return None
    return interval if 0 < interval < math.inf else None


async def watchdog(interval: float) -> None:
    """Ping systemd's watchdog every ``interval`` seconds until cancelled.

    Run it as a task in the server's nursery: if the event loop is stuck, the
    pings stop, and systemd restarts the service, which is the point.
    """
    while True:
        notify("WATCHDOG=1")
        await trio.sleep(interval)

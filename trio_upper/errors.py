"""What the program says about failures: :class:`UserError`, the one
exception whose message is meant for the user, and :class:`Episode`, how the
server logs a transient failure that it rides out."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from collections.abc import Iterator

import trio

if sys.version_info < (3, 11):  # pragma: no cover - trio installs the backport
    from exceptiongroup import BaseExceptionGroup

__all__ = [
    "Episode",
    "UserError",
    "bare_user_error",
    "host_port",
    "leaves",
    "os_reason",
    "plural",
]


class UserError(Exception):
    """A failure the user can act on, with a complete one-line message.

    The CLI prints ``str(error)`` on stderr and exits with status 1; nothing
    else is shown, so the message must say what failed and why.
    """

    @classmethod
    def unresolvable(cls, host: str | None, exc: Exception) -> UserError:
        """The error for a name the resolver does not know, or that is not a
        valid host name at all (an empty label, a label over 63 characters:
        Python's IDNA encoding raises UnicodeError for those)."""
        reason = exc.strerror if isinstance(exc, OSError) else "not a valid host name"
        return cls(f"cannot resolve host {host!r}: {reason}")


def host_port(host: str, port: int) -> str:
    """``127.0.0.1:80`` or ``[::1]:80``, for messages and logs."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def plural(n: int, word: str, plural_form: str | None = None) -> str:
    """``1 line``, ``2 lines``, ``3 tries``: counts in messages read as English."""
    return f"{n} {word}" if n == 1 else f"{n} {plural_form or word + 's'}"


def os_reason(exc: OSError) -> str:
    """The plain reason inside an OSError ("Connection refused"), digging
    through trio's "all attempts to connect failed" wrapper to the errors of
    each attempt."""
    if exc.__cause__ is not None:
        reasons = [os_reason(e) for e in leaves(exc.__cause__) if isinstance(e, OSError)]
        if reasons:
            return "; ".join(dict.fromkeys(reasons))
    if exc.errno is not None:
        # trio's per-attempt errors carry the address in strerror; os.strerror
        # gives the bare reason.
        return os.strerror(exc.errno)
    return exc.strerror or str(exc)


def leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside ``exc``, with every (nested) exception group
    opened: trio's nurseries wrap whatever their tasks raise in groups."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaves(inner)]
    return [exc]


@contextlib.contextmanager
def bare_user_error() -> Iterator[None]:
    """Re-raise a :class:`UserError` that a nursery wrapped in a group as the
    bare error, so a function that runs tasks can still promise UserError."""
    try:
        yield
    except BaseExceptionGroup as group:
        for leaf in leaves(group):
            if isinstance(leaf, UserError):
                raise leaf from None
        raise


# A failure that comes back within this many seconds of the last one logged is
# not logged again unless it lasts that long: a server at its limit for good
# pauses and resumes once per connection, and one line says all of that.
EPISODE_LOG_INTERVAL = 10.0


class Episode:
    """A run of one kind of transient failure (out of descriptors, no free
    connection slot, the kernel out of buffers), logged as a run rather than
    failure by failure: a warning when it begins, and one when it ends saying
    how long it lasted.

    Call :meth:`failing` at each failure, and again now and then while the
    failure goes on; call :meth:`ended` once things work again. Must be
    called from trio (it reads :func:`trio.current_time`).

    Args:
      logger: Where the lines go, at WARNING.
      ended_message: The line that ends a logged run; `` after N s`` is
          appended.
    """

    __slots__ = ("_ended_message", "_last_logged", "_logged", "_logger", "_since")

    def __init__(self, logger: logging.Logger, ended_message: str) -> None:
        self._logger = logger
        self._ended_message = ended_message
        self._since: float | None = None
        self._logged = False
        self._last_logged = -math.inf

    def failing(self, message: str) -> None:
        """Note a failure: the first of a run, or one more while it lasts.

        ``message`` is logged if this run has not been logged yet and the
        last run logged was at least :data:`EPISODE_LOG_INTERVAL` ago. So a
        run that begins too soon after the last line is still logged if it
        goes on (and :meth:`failing` is called again) until the interval is
        up: the log never leaves a long failure unsaid.
        """
        now = trio.current_time()
        if self._since is None:
            self._since = now
            self._logged = False
        if not self._logged and now - self._last_logged >= EPISODE_LOG_INTERVAL:
            self._logged = True
            self._last_logged = now
            self._logger.warning("%s", message)

    def ended(self) -> None:
        """Note that things work again; logs the end of a logged run."""
        if self._since is None:
            return
        if self._logged:
            self._logger.warning(
                "%s, after %.1f s", self._ended_message, trio.current_time() - self._since
            )
        self._since = None

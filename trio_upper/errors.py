"""The one exception type whose message is meant for the user."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

if sys.version_info < (3, 11):  # pragma: no cover - trio installs the backport
    from exceptiongroup import BaseExceptionGroup

__all__ = ["UserError", "bare_user_error", "host_port", "leaves", "plural"]


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

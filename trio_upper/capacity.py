"""How many connections the server takes on: a :class:`trio.abc.Listener`
around the real one, for :func:`trio.serve_listeners` to accept from.

:func:`trio.serve_listeners` accepts as fast as connections come and starts a
handler for each. Two things must hold it back, and both live here, beneath
its loop rather than in a copy of it:

* ``--max-connections``: :class:`CapacityListener` accepts only while one of
  the server's :class:`ConnectionSlots` is free. Past the limit, connections
  wait unaccepted in the kernel's listen queue (back-pressure on clients, and
  a bound on the server's memory and descriptors). Each stream it returns
  holds its slot until it is closed, which ``serve_listeners`` does when the
  handler ends.
* Running out of descriptors or kernel memory (``EMFILE``, ``ENFILE``,
  ``ENOMEM``, ``ENOBUFS`` from ``accept``): the listener waits a little and
  accepts again, logging the run once. ``serve_listeners`` would do the same
  but log a traceback every 0.1 s; here it never sees them.

Every listener of one server (IPv4 and IPv6, say) shares one
:class:`ConnectionSlots`. A listener waits for a free slot *before* it calls
``accept``, but does not take it until it has a connection: a slot held
while waiting in ``accept`` would be lost to the other listeners, which
might have connections waiting. The price is that two listeners may both
see the last slot free, and both accept: the second connection then waits,
accepted but unanswered, until a slot frees. At most one connection per
extra listener waits like that.
"""

from __future__ import annotations

import errno
import logging

import trio

from .errors import Episode, plural
from .layers import StreamWrapper

__all__ = ["ACCEPT_RETRY", "CapacityListener", "ConnectionSlots", "SlotStream"]

# Its lines are the server's, and say so in the log.
logger = logging.getLogger("trio_upper.server")

# accept() errors that mean "out of something" (descriptors, kernel memory),
# not "this listener is broken": the same set trio.serve_listeners retries.
_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})

# How long to wait before accepting again after one of those, as
# trio.serve_listeners does. Short, because a connection that ends frees a
# descriptor at once.
ACCEPT_RETRY = 0.1

# While all slots are taken, a waiting listener wakes this often to say the
# pause goes on (see Episode.failing): the log interval, so a long pause that
# began too soon after the last one logged is still logged.
_SLOT_WAIT_WAKE = 10.0

_WAIT_NOTE = "new connections wait until one closes"


class ConnectionSlots:
    """The connections a server may handle at once, shared by its listeners.

    Args:
      total: How many; at least 1.

    Attributes:
      total (int): As given.
      in_use (int): Slots taken now.
    """

    def __init__(self, total: int) -> None:
        if total < 1:
            raise ValueError(f"total must be at least 1, not {total!r}")
        self.total = total
        self.in_use = 0
        # Set (and replaced) whenever a slot frees while all were taken.
        self._freed = trio.Event()
        # Runs of "all taken" and of accept failing for lack of resources,
        # each logged once per run for the whole server.
        self.waiting_for_slot = Episode(logger, "accepting connections again")
        self.out_of_resources = Episode(logger, "accepting connections again")

    @property
    def all_taken(self) -> bool:
        """Whether every slot is in use."""
        return self.in_use >= self.total

    async def wait_until_free(self) -> None:
        """Return once a slot is free, without taking it; logs a wait that
        lasts. A checkpoint only if it waits."""
        while self.all_taken:
            self.waiting_for_slot.failing(
                f"{plural(self.in_use, 'connection')} open, the most --max-connections "
                f"allows; {_WAIT_NOTE}"
            )
            with trio.move_on_after(_SLOT_WAIT_WAKE):
                await self._freed.wait()

    async def take(self) -> None:
        """Take a slot, waiting for one if another listener took the last."""
        while self.all_taken:
            await self._freed.wait()
        self.in_use += 1

    def give_back(self) -> None:
        """Free a slot taken with :meth:`take`. If all were taken, accepting
        resumes now, and the log says so now, not at the next connection."""
        if self.all_taken:
            self._freed.set()
            self._freed = trio.Event()
            self.waiting_for_slot.ended()
        self.in_use -= 1


class SlotStream(StreamWrapper):
    """A connection holding one of the server's slots until it is closed.

    Args:
      transport_stream: The accepted connection; owned from now on.
      slots: Where the slot was taken; given back by the first
          :meth:`aclose`.

    Attributes:
      transport_stream: As given (trio's name for what a wrapper wraps, as
          in :class:`trio.SSLStream`).
    """

    def __init__(self, transport_stream: trio.abc.Stream, slots: ConnectionSlots) -> None:
        super().__init__(transport_stream)
        self._slots: ConnectionSlots | None = slots
        # Every request passes through these: bound here, to the transport's
        # own methods, they cost no coroutine of ours, which the delegating
        # methods of StreamWrapper would add to each receive and each send.
        self.receive_some = transport_stream.receive_some  # type: ignore[method-assign]
        self.send_all = transport_stream.send_all  # type: ignore[method-assign]

    async def aclose(self) -> None:
        if self._slots is not None:
            self._slots.give_back()
            self._slots = None
        await self.transport_stream.aclose()


class CapacityListener(trio.abc.Listener[SlotStream]):
    """A listener that accepts from ``transport_listener`` only while a
    connection slot is free, and rides out running out of descriptors or
    memory.

    Args:
      transport_listener: The real listener; owned from now on.
      slots: Shared by every listener of one server.

    Attributes:
      transport_listener: As given (trio's name, as in :class:`trio.SSLListener`).
    """

    def __init__(
        self, transport_listener: trio.abc.Listener[trio.abc.Stream], slots: ConnectionSlots
    ) -> None:
        self.transport_listener = transport_listener
        self._slots = slots

    async def accept(self) -> SlotStream:
        """Wait for a free slot and a connection; return the connection,
        holding its slot.

        Raises:
          trio.ClosedResourceError: the listener was closed.
          OSError: what ``transport_listener.accept`` raises but for the
              capacity errors above, which are waited out here.
        """
        slots = self._slots
        while True:
            await slots.wait_until_free()
            try:
                stream = await self.transport_listener.accept()
            except OSError as exc:
                if exc.errno not in _CAPACITY_ERRNOS:
                    raise
                slots.out_of_resources.failing(
                    f"cannot accept with {plural(slots.in_use, 'connection')} open: "
                    f"{exc.strerror or exc}; {_WAIT_NOTE}"
                )
                await trio.sleep(ACCEPT_RETRY)
                continue
            slots.out_of_resources.ended()
            break
        try:
            await slots.take()
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return SlotStream(stream, slots)

    async def aclose(self) -> None:
        await self.transport_listener.aclose()

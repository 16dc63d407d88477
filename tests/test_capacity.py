"""CapacityListener and ConnectionSlots on their own: in memory, under the
autojump mock clock, with no server around them.

What the server as a whole does with them (the log, the counts, a real
process out of descriptors) is in test_limits.py.
"""

from __future__ import annotations

import errno
import logging
import os

import pytest
import trio
import trio.testing

from trio_upper.capacity import ACCEPT_RETRY, CapacityListener, ConnectionSlots, SlotStream

from .helpers import PAUSED, RESUMED, VIRTUAL_HANG, Listener, dial, warnings_logged


async def accept_forever(listener: CapacityListener, accepted: list[SlotStream]) -> None:
    while True:
        accepted.append(await listener.accept())


async def test_accepts_only_while_a_slot_is_free_and_a_stream_holds_its_slot_until_closed(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(VIRTUAL_HANG):
        inner = Listener()
        slots = ConnectionSlots(2)
        accepted: list[SlotStream] = []
        nursery.start_soon(accept_forever, CapacityListener(inner, slots), accepted)
        await inner.connect()
        await inner.connect()
        assert (len(accepted), slots.in_use) == (2, 2)
        third = await dial(nursery, inner)
        await trio.sleep(3600)
        # Not even taken from the queue: accept() was never called for it.
        assert not third.accepted.is_set()
        assert inner.accept_calls == 2
        await accepted[0].aclose()
        await third.wait()
        assert (len(accepted), slots.in_use) == (3, 2)
        # Closing again gives nothing back twice.
        await accepted[0].aclose()
        assert slots.in_use == 2


async def test_the_slots_are_shared_by_every_listener(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(VIRTUAL_HANG):
        slots = ConnectionSlots(1)
        first, second = Listener(), Listener()
        accepted: list[SlotStream] = []
        nursery.start_soon(accept_forever, CapacityListener(first, slots), accepted)
        nursery.start_soon(accept_forever, CapacityListener(second, slots), accepted)
        await first.connect()
        waiting = await dial(nursery, second)
        await trio.sleep(3600)
        # The second listener was already in accept() when the first took the
        # only slot: it may take the connection, but then holds it, unanswered,
        # without a slot, until one frees.
        assert slots.in_use == 1
        assert len(accepted) == 1
        await accepted[0].aclose()
        await waiting.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert (len(accepted), slots.in_use) == (2, 1)


async def test_accepting_again_is_logged_when_the_slot_frees_not_at_the_next_connection(
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The example: --max-connections 1, the slot frees at t=5, the
    # next client comes an hour later.
    caplog.set_level(logging.WARNING, logger="trio_upper")
    with trio.fail_after(VIRTUAL_HANG):
        inner = Listener()
        accepted: list[SlotStream] = []
        nursery.start_soon(accept_forever, CapacityListener(inner, ConnectionSlots(1)), accepted)
        start = trio.current_time()
        await inner.connect()
        await trio.testing.wait_all_tasks_blocked()
        [paused] = warnings_logged(caplog)
        assert paused == f"1 connection open, the most --max-connections allows; {PAUSED}"
        await trio.sleep(5)
        await accepted[0].aclose()
        assert warnings_logged(caplog)[1:] == [f"{RESUMED}, after 5.0 s"]
        assert trio.current_time() - start == 5
        await trio.sleep(3600)
        await inner.connect()
        await trio.testing.wait_all_tasks_blocked()
        # Full again, an hour after the last line: a new run, logged afresh.
        assert warnings_logged(caplog)[2:] == [paused]


@pytest.mark.parametrize(
    "error", [errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS], ids=errno.errorcode.get
)
async def test_running_out_of_resources_waits_and_retries_and_logs_the_run_once(
    error: int,
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="trio_upper")
    with trio.fail_after(VIRTUAL_HANG):
        inner = Listener()
        inner.fail_with = error
        accepted: list[SlotStream] = []
        nursery.start_soon(accept_forever, CapacityListener(inner, ConnectionSlots(5)), accepted)
        waiting = await dial(nursery, inner)
        await trio.sleep(60)
        assert not waiting.accepted.is_set()
        # Retried at ACCEPT_RETRY, not spun, and not given up.
        assert 60 / ACCEPT_RETRY - 2 <= inner.accept_calls <= 60 / ACCEPT_RETRY + 2
        [paused] = warnings_logged(caplog)
        assert paused == (f"cannot accept with 0 connections open: {os.strerror(error)}; {PAUSED}")
        inner.fail_with = None
        await waiting.wait()
        assert warnings_logged(caplog)[1].startswith(f"{RESUMED}, after 60.")
        assert len(accepted) == 1


async def test_any_other_accept_error_is_raised(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    # Not a lack of resources: something the wrapper does not know how to
    # wait out. trio.serve_listeners decides (it raises too).
    inner = Listener()
    inner.fail_with = errno.EINVAL
    listener = CapacityListener(inner, ConnectionSlots(1))
    await dial(nursery, inner)
    with pytest.raises(OSError, match="Invalid argument"):
        await listener.accept()


async def test_a_connection_holding_no_slot_is_closed_if_accepting_is_cancelled(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(VIRTUAL_HANG):
        slots = ConnectionSlots(1)
        first, second = Listener(), Listener()
        accepted: list[SlotStream] = []
        nursery.start_soon(accept_forever, CapacityListener(first, slots), accepted)
        async with trio.open_nursery() as accepting_second:
            accepting_second.start_soon(accept_forever, CapacityListener(second, slots), accepted)
            await first.connect()
            # The second listener was in accept() before the slot was taken:
            # it takes this connection and waits for a slot with it.
            client = await second.connect()
            accepting_second.cancel_scope.cancel()
        # Shutdown, say: the connection it held is closed, not leaked.
        assert await client.receive_some() == b""
        assert (len(accepted), slots.in_use) == (1, 1)


def test_slots_must_be_at_least_one() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ConnectionSlots(0)


async def test_slot_stream_passes_data_both_ways_and_closes_what_it_wraps() -> None:
    client, server = trio.testing.memory_stream_pair()
    slots = ConnectionSlots(1)
    await slots.take()
    wrapped = SlotStream(server, slots)
    await client.send_all(b"ping")
    assert await wrapped.receive_some() == b"ping"
    await wrapped.send_all(b"pong")
    await wrapped.wait_send_all_might_not_block()
    assert await client.receive_some() == b"pong"
    await wrapped.aclose()
    assert slots.in_use == 0
    assert await client.receive_some() == b""

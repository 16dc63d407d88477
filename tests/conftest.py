"""Shared fixtures: an in-process server on loopback, and our server as a
subprocess. The helpers they are made of, and every other shared helper, are
in helpers.py."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import trio

from .helpers import LoopbackServer, ServerProcess, serve_loopback, serving

# test_clients.py, which another change is rewriting, still imports this from
# here; once it imports from .helpers, this line goes.
from .helpers import receive_until_eof as receive_until_eof


@pytest.fixture
async def loopback(nursery: trio.Nursery) -> AsyncIterator[LoopbackServer]:
    served = await serve_loopback(nursery)
    yield served
    served.server.shutdown(grace=0)


@pytest.fixture
def server_process() -> Iterator[ServerProcess]:
    """Our server on 127.0.0.1, a port of the OS's choosing."""
    with serving() as server:
        yield server

"""A rate limit on UDP replies, with no I/O (the time is an argument): a UDP
source address can be forged to aim replies at a victim (README.md, "Limits"),
so the server limits the replies to each network, as DNS Response Rate
Limiting does.
"""

from __future__ import annotations

import enum
import ipaddress
import math
import socket
from collections import OrderedDict

__all__ = ["DEFAULT_RATE", "ReplyRateLimiter", "Verdict", "network_label", "source_network"]

# Replies per second per network: far above a person typing or the UDP client
# (it waits for each reply), yet at most 100 kB/s of short lines to a victim.
DEFAULT_RATE = 1000.0

# Seconds of the rate a bucket holds: room for a quick run (a pasted block)
# after a quiet spell, and as long as an emptied bucket takes to refill.
BURST_SECONDS = 2.0

# The most keys kept, whatever addresses a flood forges: an entry takes about
# 230 bytes (tracemalloc, CPython 3.11, source_network keys): 15 MB at most.
MAX_KEYS = 65_536

# How recvfrom on an IPv6 socket writes an IPv4 sender, ::ffff:192.0.2.1
# (RFC 4291 2.5.5.2).
_MAPPED = "::ffff:"


def source_network(address: str) -> str:
    """The key for replies to ``address`` (an IP address as ``recvfrom``
    gives it): a string naming its /24 (IPv4) or /56 (IPv6), as DNS RRL
    groups them, so that a forger gets no fresh burst per address of one
    network. Not :mod:`ipaddress`, because this runs for every datagram.

    Raises:
      OSError: if ``address`` has a ``:`` but is not an IPv6 address.
    """
    if ":" not in address:
        return address.rpartition(".")[0]
    if address.startswith(_MAPPED) and "." in address:
        # An IPv4 client of a socket that takes both families (a systemd
        # socket unit's [::]:12000): counted in its /24, like any other.
        return address[len(_MAPPED) :].rpartition(".")[0]
    # A link-local address comes with its scope ("fe80::1%eth0").
    return socket.inet_pton(socket.AF_INET6, address.partition("%")[0])[:7].hex()


def network_label(address: str) -> str:
    """``address``'s network as :func:`source_network` counts it, readably
    (``192.0.2.0/24``), for log lines.

    Raises:
      ValueError: if ``address`` is not an IP address.
    """
    if address.startswith(_MAPPED) and "." in address:
        address = address[len(_MAPPED) :]
    prefix = 24 if ":" not in address else 56
    return str(ipaddress.ip_network(f"{address.partition('%')[0]}/{prefix}", strict=False))


class Verdict(enum.Enum):
    """What :meth:`ReplyRateLimiter.check` decided about one request."""

    ALLOW = "allow"
    REFUSE = "refuse"
    #: The first refusal since the key's bucket was last full: log this one,
    #: and a flood is logged once however long it lasts.
    FIRST_REFUSAL = "first refusal"


class ReplyRateLimiter:
    """Decide, for each UDP request, whether its key may have a reply.

    Each key has a token bucket: ``burst`` tokens to start, ``rate`` more a
    second up to ``burst``, one per reply. So in any ``t`` seconds a key gets
    at most ``burst + rate * t`` replies, unless it is evicted meanwhile.

    At most ``max_keys`` keys are kept, by time of last request, refused or
    not. A key not in the table looks at the two least recently used (no
    request pays for a scan, yet the table shrinks after a flood): it drops
    the first if its bucket has refilled (as good as new), then the second if
    its has too. If the table is still full, it evicts the first anyway,
    which gets a fresh burst when next seen: a victim only if ``max_keys``
    other keys come between two of its requests.

    Args:
      rate: Replies per second per key, finite, >= 0; 0 allows everything.
      burst: Tokens per bucket, finite, >= 1; default ``BURST_SECONDS`` of
          ``rate``, at least 1.
      max_keys: The most keys kept at once, >= 1.

    Raises:
      ValueError: if an argument is out of range.
    """

    def __init__(
        self, rate: float = DEFAULT_RATE, *, burst: float | None = None, max_keys: int = MAX_KEYS
    ) -> None:
        # Negated ranges, so that NaN is refused too.
        if not 0 <= rate < math.inf:
            raise ValueError(f"rate must be a finite number >= 0, not {rate!r}")
        if burst is None:
            burst = max(1.0, rate * BURST_SECONDS)
        elif not 1 <= burst < math.inf:
            # With less than one token, a bucket could never pay for a reply.
            raise ValueError(f"burst must be a finite number >= 1, not {burst!r}")
        if max_keys < 1:
            raise ValueError(f"max_keys must be at least 1, not {max_keys!r}")
        self._rate = float(rate)
        self._burst = float(burst)
        self._max_keys = max_keys
        # key -> (tokens, at, refusing), least recently used first: the bucket
        # held ``tokens`` at time ``at``; ``refusing`` from a refusal until it
        # is next full. Tokens rather than a "full again at" time, so that a
        # burst at one instant is exact subtractions of 1.
        self._buckets: OrderedDict[str, tuple[float, float, bool]] = OrderedDict()

    @property
    def rate(self) -> float:
        """Replies per second per key; ``0.0`` if there is no limit."""
        return self._rate

    def check(self, key: str, now: float) -> Verdict:
        """Decide whether a request counted under ``key`` (the server passes
        :func:`source_network` of its sender) at time ``now`` gets a reply,
        and charge ``key``'s bucket if so. ``now`` must never decrease.

        Returns:
          ``ALLOW`` to send the reply; ``REFUSE`` or ``FIRST_REFUSAL`` not to.
        """
        rate, burst, buckets = self._rate, self._burst, self._buckets
        if not rate:
            return Verdict.ALLOW
        entry = buckets.get(key)
        if entry is None:
            # Make room as the class docstring says; next(iter()) is O(1).
            for _ in range(2):
                oldest = next(iter(buckets), None)
                if oldest is None:
                    break
                tokens, at, _refusing = buckets[oldest]
                if tokens + (now - at) * rate < burst:
                    break
                del buckets[oldest]
            if len(buckets) >= self._max_keys:
                del buckets[next(iter(buckets))]
            tokens, refusing = burst, False
        else:
            buckets.move_to_end(key)
            tokens, at, refusing = entry
            tokens += (now - at) * rate
            if tokens >= burst:
                tokens, refusing = burst, False
        if tokens >= 1:
            buckets[key] = (tokens - 1, now, refusing)
            return Verdict.ALLOW
        if refusing:
            # Nothing to store: the count still refills from its own time.
            return Verdict.REFUSE
        buckets[key] = (tokens, now, True)
        return Verdict.FIRST_REFUSAL

"""A per-source rate limit on UDP replies, with no I/O in it.

UDP has no handshake, so anyone can send the server a datagram whose source
address is forged: the reply then goes to that address, a victim who never
asked for it. That makes any UDP server a *reflector*, and one whose replies
are larger than its requests an *amplifier*. :class:`ReplyRateLimiter` caps
the replies each source address can get, in the spirit of DNS Response Rate
Limiting: a token bucket per source (the server keys it by network, see
:func:`source_network`), so a person or a program that talks to the server
normally never notices, while a flood aimed at one victim gets at most
``burst + rate * t`` replies in any ``t`` seconds.

Like :mod:`trio_upper.transform`, this module does no I/O and knows nothing
of trio: the caller passes the time, so it can be tested without a clock. The
server passes :func:`trio.current_time` and the sender's network::

    verdict = limiter.check(source_network(sender[0]), trio.current_time())
    if verdict is Verdict.FIRST_REFUSAL:
        logger.warning("rate limiting replies to %s", network_label(sender[0]))
    if verdict is Verdict.ALLOW:
        sock.sendto(reply, sender)

How much one request byte can cost a victim (the amplification factor):

* ``--ascii`` mode: exactly 1. The reply is as long as the request.
* UTF-8 mode: at most 3 reply bytes per request byte
  (:data:`trio_upper.transform.MAX_GROWTH`). Checking :meth:`str.upper` on
  every code point, the worst are U+0390 ``ΐ`` and U+03B0 ``ΰ``: 2 bytes
  each, whose uppercase is three code points of 2 bytes (6 bytes). Invalid
  UTF-8 passes through unchanged (1 byte for 1 byte), and :meth:`str.upper`
  maps each code point on its own, so no message grows by more than its worst
  code point does. The test suite repeats the whole check, so this figure
  cannot go stale when Python's Unicode data changes.
* A reply is one datagram for one datagram, and never larger than the largest
  datagram: when the UTF-8 uppercase would not fit,
  :func:`trio_upper.udp.reply_for` sends the ``--ascii`` transform instead
  (1x). So the largest tripled reply comes from a request of about 21.8 kB.
  On the wire, the IP and UDP headers (28 bytes over IPv4, 48 over IPv6) are
  the same size both ways, which keeps the factor in bytes just under 3.

That is small next to the protocols that are abused for this (DNS, NTP,
memcached, with factors from tens to tens of thousands), but a reflector
also hides the attacker, whatever its factor; the limit is what bounds what
this server will send to any one address.
"""

from __future__ import annotations

import enum
import ipaddress
import math
import socket
from collections import OrderedDict

__all__ = [
    "BURST_SECONDS",
    "DEFAULT_BURST",
    "DEFAULT_MAX_SOURCES",
    "DEFAULT_RATE",
    "ReplyRateLimiter",
    "Verdict",
    "network_label",
    "source_network",
]

# Replies per second per source address. Far above what people and the
# project's own programs do: someone typing sends a few lines a second; the
# UDP client sends a line and waits for its reply before the next, and a lost
# reply makes it slower, not faster (it retries after 1, then 2, then 4 s);
# the project's tests send one server at most a few hundred datagrams, which
# the burst alone covers. A pipe of thousands of lines through
# ``trio-upper udp`` over loopback runs at the round-trip rate, faster than
# this: past the burst it is paced to this rate (a refused line costs the
# client a 1 s retry, by which time the bucket has refilled), so it slows
# down but loses nothing. What the limit buys: whatever a spoofed flood
# costs its senders, one victim address gets at most this many replies a
# second from us (100 kB/s for the lecture's short lines).
DEFAULT_RATE = 1000.0

# The burst is this many seconds' worth of the rate, so that a client who was
# quiet can send a quick run (a pasted block of lines, a script's first
# volley) without waiting, and so that a bucket emptied by a flood refills
# completely, and is forgotten, within these few seconds of quiet.
BURST_SECONDS = 2.0
DEFAULT_BURST = DEFAULT_RATE * BURST_SECONDS

# At most this many source addresses are tracked at once. Measured with
# tracemalloc on CPython 3.11, one entry (the address string that is its key,
# its slot and node in the OrderedDict, a tuple of two floats and a bool)
# takes about 250 bytes with an IPv4 address and 275 with the longest IPv6
# address, so a full table holds 16.5 to 18 MB, however many addresses a flood
# forges. With the default rate and burst, a bucket is full again 2 s after
# its source's last request, and full buckets go first, so no source is
# evicted while at most this many addresses are heard from in any 2 s; past
# that, see ReplyRateLimiter for what an eviction costs.
DEFAULT_MAX_SOURCES = 65_536


def source_network(address: str) -> str:
    """The key a reply to ``address`` is counted under: its /24 for IPv4, its
    /56 for IPv6, as DNS Response Rate Limiting groups them.

    Per address would be too fine: a forger can spread requests over a
    victim's whole network (an IPv6 host often owns a /64 on its own) and
    get a fresh burst for each address. String operations, not
    :mod:`ipaddress`, because this runs for every datagram.
    """
    if ":" not in address:
        return address.rpartition(".")[0]
    # A link-local address comes with its scope ("fe80::1%eth0").
    return socket.inet_pton(socket.AF_INET6, address.partition("%")[0])[:7].hex()


def network_label(address: str) -> str:
    """``address``'s network as :func:`source_network` counts it, readably
    (``192.0.2.0/24``), for log lines."""
    prefix = 24 if ":" not in address else 56
    return str(ipaddress.ip_network(f"{address.partition('%')[0]}/{prefix}", strict=False))


class Verdict(enum.Enum):
    """What :meth:`ReplyRateLimiter.check` decided about one request."""

    #: Send the reply.
    ALLOW = "allow"
    #: Drop the reply: the source's bucket is empty.
    REFUSE = "refuse"
    #: Drop the reply; it is the first refusal for this source since its
    #: bucket was last full (or since the source was first seen). Log this
    #: one: under a sustained flood there is exactly one per source, however
    #: long the flood lasts, until the source has been quiet for long enough
    #: to refill (at most ``burst / rate`` seconds).
    FIRST_REFUSAL = "first refusal"


class ReplyRateLimiter:
    """Decide, for each UDP request, whether its source may have a reply.

    Each source gets a token bucket that starts full at ``burst`` tokens,
    refills at ``rate`` tokens per second up to ``burst``, and pays one token
    per reply. Refused requests cost nothing, so a source that keeps flooding
    still gets ``rate`` replies a second and no more. In any window of ``t``
    seconds a source gets at most ``burst + rate * t`` replies, unless it is
    evicted in that window (see below).

    Args:
      rate: Replies per second per source, finite and not negative. ``0``
          turns the limit off: every request is allowed and no state is kept.
      burst: How many replies a source that has been quiet may have at once;
          finite and at least 1. Default: ``BURST_SECONDS`` worth of
          ``rate``, and at least 1.
      max_sources: The most sources tracked at once; at least 1.

    Raises:
      ValueError: if an argument is out of range.

    State and its bound:
      One entry per source address heard from recently: its token count, the
      time of that count, and whether it is being refused. Never more than
      ``max_sources`` entries (250 to 275 bytes each; see
      ``DEFAULT_MAX_SOURCES``), however many addresses a flood uses. A bucket
      that has refilled to full is no different from a new one, so such
      entries go first: each new source drops up to two of them from the
      least recently used end. When the table is full and its least recently
      used source is still refilling, that source is evicted anyway (counted
      in :attr:`evicted`), and the next time it is heard from it gets a
      fresh, full burst. That is the price of the bound, and a small one:
      every request moves its source to the most recently used end, refused
      requests included, so to reset a victim's bucket an attacker must send
      requests from ``max_sources`` other addresses between two of the
      victim's: a new burst for the victim costs ``max_sources`` requests
      that go elsewhere.

    Every operation is O(1) amortised: nothing scans the table.

    Attributes:
      refused (int): How many requests have been refused, for the server's
          summary.
      evicted (int): How many sources were forgotten before their bucket had
          refilled, because the table was full. Anything but 0 means more
          than ``max_sources`` addresses were active at once: most likely a
          flood from forged addresses.
    """

    __slots__ = (
        "_buckets",
        "_burst",
        "_max_sources",
        "_rate",
        "evicted",
        "refused",
    )

    def __init__(
        self,
        rate: float = DEFAULT_RATE,
        burst: float | None = None,
        *,
        max_sources: int = DEFAULT_MAX_SOURCES,
    ) -> None:
        # Written as negated ranges so that NaN is rejected too.
        if not 0 <= rate < math.inf:
            raise ValueError(f"rate must be a finite number >= 0, not {rate!r}")
        if burst is None:
            burst = max(1.0, rate * BURST_SECONDS)
        elif not 1 <= burst < math.inf:
            # With less than one token, a bucket could never pay for a reply.
            raise ValueError(f"burst must be a finite number >= 1, not {burst!r}")
        if max_sources < 1:
            raise ValueError(f"max_sources must be at least 1, not {max_sources!r}")
        self._rate = float(rate)
        self._burst = float(burst)
        self._max_sources = max_sources
        # source -> (tokens, at, refusing), least recently heard from first:
        # the bucket held ``tokens`` at time ``at``, and has refilled since.
        # ``refusing`` is true from a refusal until the bucket is next found
        # full: it is what makes FIRST_REFUSAL come once per flood rather than
        # once per token. A token count, rather than the single "full again
        # at" time of the generic cell rate algorithm, because a whole burst
        # at one instant then costs exact subtractions of 1: no rounding can
        # cost a source the last reply of its burst. Tuples, because a flood
        # of forged addresses makes one entry per request, and a tuple is the
        # cheapest thing to make and the smallest thing to keep.
        self._buckets: OrderedDict[str, tuple[float, float, bool]] = OrderedDict()
        self.refused = 0
        self.evicted = 0

    @property
    def rate(self) -> float:
        """Replies per second per source; ``0.0`` if there is no limit."""
        return self._rate

    @property
    def burst(self) -> float:
        """The capacity of each source's bucket."""
        return self._burst

    @property
    def max_sources(self) -> int:
        """The most sources tracked at once."""
        return self._max_sources

    def __len__(self) -> int:
        """How many sources are tracked now; never more than :attr:`max_sources`."""
        return len(self._buckets)

    def check(self, source: str, now: float) -> Verdict:
        """Decide whether a request from ``source`` at time ``now`` gets a
        reply, and charge the source's bucket if it does.

        Args:
          source: The request's source IP address, as a string. Not its port:
              whoever forges addresses can pick any port, and the victim is
              the host. The limiter only compares these strings, so a caller
              may pass a network prefix instead, to limit a network as one.
          now: The time in seconds, such as :func:`trio.current_time`. It
              must not decrease from one call to the next, which trio's clock
              never does.

        Returns:
          :attr:`Verdict.ALLOW` to send the reply; :attr:`Verdict.REFUSE` or
          :attr:`Verdict.FIRST_REFUSAL` to drop it. Each refusal adds 1 to
          :attr:`refused`.
        """
        rate = self._rate
        if not rate:
            return Verdict.ALLOW
        burst = self._burst
        buckets = self._buckets
        entry = buckets.get(source)
        if entry is None:
            # A new source. Make room first: drop up to two full buckets from
            # the least recently used end (two, so that the table shrinks
            # back as new sources come after a flood of addresses; no more,
            # so that no request pays for a scan), and if that dropped none
            # and the table is full, evict the least recently used source all
            # the same. Written out here rather than in helpers, because
            # every request of a flood of forged addresses comes this way.
            # next(iter()) is O(1): an OrderedDict iterates from the head of
            # its linked list.
            if buckets:
                oldest = next(iter(buckets))
                tokens, at, _ = buckets[oldest]
                if tokens + (now - at) * rate >= burst:
                    del buckets[oldest]
                    if buckets:
                        oldest = next(iter(buckets))
                        tokens, at, _ = buckets[oldest]
                        if tokens + (now - at) * rate >= burst:
                            del buckets[oldest]
                elif len(buckets) >= self._max_sources:
                    del buckets[oldest]
                    self.evicted += 1
            buckets[source] = (burst - 1, now, False)
            return Verdict.ALLOW
        buckets.move_to_end(source)
        tokens, at, refusing = entry
        tokens += (now - at) * rate
        if tokens >= burst:
            buckets[source] = (burst - 1, now, False)
            return Verdict.ALLOW
        if tokens >= 1:
            buckets[source] = (tokens - 1, now, refusing)
            return Verdict.ALLOW
        self.refused += 1
        if refusing:
            # The stored count still refills from its own time: no need to
            # store anything for a refusal, which a flood makes many of.
            return Verdict.REFUSE
        buckets[source] = (tokens, now, True)
        return Verdict.FIRST_REFUSAL

    def allow(self, source: str, now: float) -> bool:
        """Like :meth:`check`, for a caller that needs only a yes or a no.

        Returns:
          True if the reply may be sent.
        """
        return self.check(source, now) is Verdict.ALLOW

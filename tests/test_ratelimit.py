"""Tests for trio_upper.ratelimit: the reply rate limiter, with time as a number
we pass (no clock, no sleeping), and the amplification figures that its module
docstring states, checked against every code point."""

from __future__ import annotations

import array
import collections
import itertools
import math
import sys
from collections.abc import Iterable, Sequence
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_upper.ratelimit import (
    BURST_SECONDS,
    DEFAULT_BURST,
    DEFAULT_MAX_SOURCES,
    DEFAULT_RATE,
    ReplyRateLimiter,
    Verdict,
    network_label,
    source_network,
)
from trio_upper.transform import MAX_GROWTH, upper_ascii, upper_bytes

ALLOW, REFUSE, FIRST = Verdict.ALLOW, Verdict.REFUSE, Verdict.FIRST_REFUSAL

VICTIM = "192.0.2.1"
OTHER = "2001:db8::1"

# Enough room for a little float rounding in a count of replies, and far less
# than the one reply a real excess would be.
TOLERANCE = 1e-6

Arrival = tuple[str, float]


def run(limiter: ReplyRateLimiter, arrivals: Iterable[Arrival]) -> list[Verdict]:
    return [limiter.check(source, now) for source, now in arrivals]


def at(now: float, count: int, source: str = VICTIM) -> list[Arrival]:
    """``count`` requests from ``source``, all at time ``now``."""
    return [(source, now)] * count


# --- Strategies ---------------------------------------------------------------

SOURCES = ("192.0.2.1", "192.0.2.2", "198.51.100.7", "2001:db8::1", "2001:db8::2")

# 0 and a trio clock reading: trio.current_time() starts at a random offset in
# the tens of thousands of seconds, where floats are coarser.
STARTS = st.sampled_from([0.0, 12_345.678])

# Gaps between arrivals: often none (a burst), often less than a token's
# worth, sometimes long enough to refill a bucket.
GAPS = st.one_of(st.just(0.0), st.floats(0, 0.05), st.floats(0, 10))


def _timeline(start: float, steps: Sequence[tuple[str, float]]) -> list[Arrival]:
    """Arrivals with non-decreasing times, from gaps between them."""
    times = itertools.accumulate((gap for _, gap in steps), initial=start)
    next(times)  # the start itself
    return [(source, now) for (source, _), now in zip(steps, times, strict=True)]


def timelines(
    gaps: st.SearchStrategy[float] = GAPS, starts: st.SearchStrategy[float] = STARTS
) -> st.SearchStrategy[list[Arrival]]:
    steps = st.lists(st.tuples(st.sampled_from(SOURCES), gaps), max_size=40)
    return st.builds(_timeline, starts, steps)


rates = st.floats(0.05, 500)
bursts = st.floats(1, 30)
table_sizes = st.integers(1, len(SOURCES) + 1)


# --- Examples -----------------------------------------------------------------


def test_defaults() -> None:
    limiter = ReplyRateLimiter()
    assert (limiter.rate, limiter.burst, limiter.max_sources) == (1000.0, 2000.0, 65_536)
    assert (DEFAULT_RATE, DEFAULT_BURST, DEFAULT_MAX_SOURCES) == (1000.0, 2000.0, 65_536)
    assert DEFAULT_BURST == DEFAULT_RATE * BURST_SECONDS
    assert (len(limiter), limiter.refused, limiter.evicted) == (0, 0, 0)


@pytest.mark.parametrize(
    ("rate", "expected"),
    [(10.0, 20.0), (0.1, 1.0), (0.0, 1.0)],
    ids=["burst-seconds-of-rate", "at-least-one", "off"],
)
def test_default_burst(rate: float, expected: float) -> None:
    assert ReplyRateLimiter(rate).burst == expected


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rate": -1.0},
        {"rate": math.nan},
        {"rate": math.inf},
        {"rate": 10.0, "burst": 0.5},
        {"rate": 10.0, "burst": math.nan},
        {"rate": 10.0, "burst": math.inf},
        {"rate": 10.0, "max_sources": 0},
    ],
    ids=repr,
)
def test_arguments_out_of_range_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be"):
        ReplyRateLimiter(**kwargs)  # type: ignore[arg-type]


def test_a_burst_then_the_rate() -> None:
    # Times in eighths of a second, so that the arithmetic is exact.
    limiter = ReplyRateLimiter(rate=8, burst=5)
    assert run(limiter, at(0.0, 7)) == [ALLOW] * 5 + [FIRST, REFUSE]
    # An eighth of a second buys one token; the refusals cost none.
    assert run(limiter, at(0.125, 2)) == [ALLOW, REFUSE]
    # 2.5 tokens: the half is kept for later.
    assert run(limiter, at(0.4375, 3)) == [ALLOW, ALLOW, REFUSE]
    assert run(limiter, at(0.5, 2)) == [ALLOW, REFUSE]
    # Still one run of refusals: the bucket has not been full since.
    assert limiter.refused == 5


def test_a_fractional_burst() -> None:
    limiter = ReplyRateLimiter(rate=1, burst=2.5)
    assert run(limiter, at(0.0, 3)) == [ALLOW, ALLOW, FIRST]
    # 0.5 left, plus 0.5 refilled.
    assert run(limiter, at(0.5, 2)) == [ALLOW, REFUSE]


def test_refill_stops_at_the_burst() -> None:
    limiter = ReplyRateLimiter(rate=10, burst=5)
    run(limiter, at(0.0, 1))
    assert run(limiter, at(1e6, 6)) == [ALLOW] * 5 + [FIRST]


def test_each_source_has_its_own_bucket() -> None:
    limiter = ReplyRateLimiter(rate=1, burst=3)
    assert run(limiter, at(0.0, 4, VICTIM)) == [ALLOW] * 3 + [FIRST]
    assert run(limiter, at(0.0, 4, OTHER)) == [ALLOW] * 3 + [FIRST]
    assert len(limiter) == 2


def test_allow_is_check_said_allow() -> None:
    limiter = ReplyRateLimiter(rate=1, burst=2)
    assert [limiter.allow(VICTIM, 0.0) for _ in range(4)] == [True, True, False, False]
    assert limiter.refused == 2


def test_a_sustained_flood_gets_the_rate_and_is_reported_once() -> None:
    limiter = ReplyRateLimiter(rate=100)  # burst: BURST_SECONDS' worth, 200
    # 1,000 requests a second for 10 s: the burst, then 100 a second.
    flood = [(VICTIM, n / 1000) for n in range(10_000)]
    verdicts = run(limiter, flood)
    allowed = verdicts.count(ALLOW)
    assert 200 + 998 <= allowed <= 200 + 100 * 9.999
    assert verdicts.count(FIRST) == 1
    assert limiter.refused == 10_000 - allowed
    # Quiet for the BURST_SECONDS it takes to refill: a whole burst again, and
    # a new flood is reported again.
    assert run(limiter, at(9.999 + BURST_SECONDS, 201)) == [ALLOW] * 200 + [FIRST]


def test_rate_zero_turns_the_limit_off() -> None:
    limiter = ReplyRateLimiter(rate=0)
    assert set(run(limiter, at(0.0, 10_000))) == {ALLOW}
    assert (len(limiter), limiter.refused, limiter.evicted) == (0, 0, 0)


# --- The bounded table --------------------------------------------------------


def test_full_buckets_are_dropped_before_anyone_is_evicted() -> None:
    limiter = ReplyRateLimiter(rate=100, burst=200, max_sources=3)
    run(limiter, [("a", 0.0), ("b", 0.0), ("c", 0.0)])
    # A second later all three are full again, as good as never seen: each new
    # source drops two of them (no more, so that no request pays for a scan).
    limiter.check("d", 1.0)
    assert len(limiter) == 2
    limiter.check("e", 1.0)
    assert len(limiter) == 2
    assert limiter.evicted == 0


def test_the_table_shrinks_back_after_a_flood_of_addresses() -> None:
    limiter = ReplyRateLimiter(rate=100, burst=200, max_sources=1000)
    for n in range(1000):
        limiter.check(f"old {n}", 0.0)
    # Each new source drops two full ones and adds itself.
    for n in range(500):
        limiter.check(f"new {n}", 10.0)
    assert len(limiter) == 500
    assert limiter.evicted == 0


def test_eviction_costs_the_evicted_source_a_fresh_burst() -> None:
    limiter = ReplyRateLimiter(rate=1, burst=3, max_sources=2)
    assert run(limiter, at(0.0, 4)) == [ALLOW] * 3 + [FIRST]
    # Every request of the victim's, refused ones too, makes it the most
    # recently used: one other address in between cannot push it out.
    for other in ("a", "b", "c"):
        assert limiter.check(other, 0.0) is ALLOW
        assert limiter.check(VICTIM, 0.0) is REFUSE
    assert limiter.evicted == 2  # "a" and "b", both still refilling
    # max_sources other addresses between two of the victim's requests do.
    limiter.check("d", 0.0)
    limiter.check("e", 0.0)
    assert limiter.evicted == 4
    assert run(limiter, at(0.0, 4)) == [ALLOW] * 3 + [FIRST]


def test_a_million_forged_addresses_keep_the_table_bounded() -> None:
    limiter = ReplyRateLimiter(rate=100, max_sources=1000)
    forged = map(str, range(1_000_000))
    victim = []
    # The victim's address once per 500 forged ones (fewer than max_sources),
    # as fast as 1,000,000 requests a second.
    for chunk in range(2000):
        now = chunk / 2000
        collections.deque(
            map(limiter.check, itertools.islice(forged, 500), itertools.repeat(now)), maxlen=0
        )
        assert len(limiter) <= 1000
        victim.append(limiter.check(VICTIM, now))
    assert len(limiter) == 1000
    # Each forged address is new, so each is answered once (that much no
    # limiter can refuse), and evicts the least recently used, still
    # refilling.
    assert limiter.evicted == 1_000_001 - 1000
    # The victim kept its place in the table, and so its bucket: it got the
    # burst and the rate over the 1999/2000 s of the flood, no more.
    allowed = victim.count(ALLOW)
    assert 200 + 99 <= allowed <= 200 + 100 * 1999 / 2000
    assert victim.count(FIRST) == 1
    assert limiter.refused == 2000 - allowed


def test_the_default_table_holds_default_max_sources() -> None:
    limiter = ReplyRateLimiter()
    collections.deque(
        map(limiter.check, map(str, range(DEFAULT_MAX_SOURCES + 5000)), itertools.repeat(0.0)),
        maxlen=0,
    )
    assert len(limiter) == DEFAULT_MAX_SOURCES
    assert limiter.evicted == 5000


# --- Properties ---------------------------------------------------------------


@given(rates, bursts, table_sizes, timelines())
def test_no_window_gets_more_than_burst_plus_rate_times_its_length(
    rate: float, burst: float, max_sources: int, arrivals: list[Arrival]
) -> None:
    limiter = ReplyRateLimiter(rate, burst, max_sources=max_sources)
    # Per source: (time, allowed, evictions before the call, evictions after).
    seen: dict[str, list[tuple[float, bool, int, int]]] = collections.defaultdict(list)
    for source, now in arrivals:
        before = limiter.evicted
        allowed = limiter.allow(source, now)
        seen[source].append((now, allowed, before, limiter.evicted))
    for events in seen.values():
        for i, (t0, _, _, evicted_after_first) in enumerate(events):
            allowed_count = 0
            for t1, allowed, evicted_before, _ in events[i:]:
                if evicted_before != evicted_after_first:
                    break  # this source may have been evicted: it got a fresh burst
                allowed_count += allowed
                assert allowed_count <= burst + rate * (t1 - t0) + TOLERANCE
    if max_sources >= len(seen):
        assert limiter.evicted == 0


@given(st.one_of(st.just(0.0), rates), bursts, table_sizes, timelines())
def test_table_stays_bounded_and_refusals_add_up(
    rate: float, burst: float, max_sources: int, arrivals: list[Arrival]
) -> None:
    limiter = ReplyRateLimiter(rate, burst, max_sources=max_sources)
    verdicts = []
    for source, now in arrivals:
        verdicts.append(limiter.check(source, now))
        assert len(limiter) <= max_sources
    assert limiter.refused == len(verdicts) - verdicts.count(ALLOW)
    if rate == 0:
        # Off: nothing is refused, and nothing is kept.
        assert (limiter.refused, len(limiter)) == (0, 0)


@given(rates, bursts, table_sizes, timelines())
def test_first_refusal_starts_each_run_of_refusals(
    rate: float, burst: float, max_sources: int, arrivals: list[Arrival]
) -> None:
    limiter = ReplyRateLimiter(rate, burst, max_sources=max_sources)
    previous: dict[str, Verdict] = {}
    ever_refused: set[str] = set()
    for source, now in arrivals:
        verdict = limiter.check(source, now)
        if source not in previous:
            # A new source has a full bucket.
            assert verdict is ALLOW
        elif verdict is not ALLOW and previous[source] is not ALLOW:
            # A run of refusals is reported once. (Nothing can have evicted
            # the source in between: it would have come back with a full
            # bucket, and been allowed.)
            assert verdict is REFUSE
        if verdict is not ALLOW and source not in ever_refused:
            assert verdict is FIRST
            ever_refused.add(source)
        previous[source] = verdict


@given(rates, bursts, table_sizes, timelines(), st.sampled_from(SOURCES))
def test_a_quiet_source_gets_a_whole_burst_again(
    rate: float, burst: float, max_sources: int, arrivals: list[Arrival], source: str
) -> None:
    limiter = ReplyRateLimiter(rate, burst, max_sources=max_sources)
    run(limiter, arrivals)
    last = max((now for s, now in arrivals if s == source), default=0.0)
    # Long enough to refill from empty, with room for rounding; and time
    # never goes back.
    quiet = max(last + burst / rate * (1 + 1e-6), arrivals[-1][1] if arrivals else 0.0)
    whole = math.floor(burst)
    refused = limiter.refused
    assert run(limiter, at(quiet, whole + 1, source)) == [ALLOW] * whole + [FIRST]
    assert limiter.refused == refused + 1


class EnvelopeModel:
    """The token bucket stated from the outside, without a bucket.

    A source's bucket holds, at time t, the least over s <= t of
    burst + rate * (t - s) - (replies it was allowed in [s, t)), and the
    least is at s = t or at the time of one of those replies (the standard
    result for a greedy token bucket). A request is allowed if that is at
    least 1; the bucket is full if it is burst. The model keeps every allowed
    reply's time and no table, so it knows nothing of eviction or cleanup.
    """

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.replies: dict[str, list[float]] = collections.defaultdict(list)
        self.refusing: set[str] = set()

    def tokens(self, source: str, now: float) -> float:
        level = self.burst
        for count, then in enumerate(reversed(self.replies[source]), start=1):
            level = min(level, self.burst + self.rate * (now - then) - count)
        return level

    def check(self, source: str, now: float) -> Verdict:
        tokens = self.tokens(source, now)
        if tokens >= self.burst:
            self.refusing.discard(source)
        if tokens >= 1:
            self.replies[source].append(now)
            return ALLOW
        if source in self.refusing:
            return REFUSE
        self.refusing.add(source)
        return FIRST


# Dyadic rates, bursts and times (multiples of 1/64 s) keep every sum and
# product exact in binary floating point, in the model and in the limiter
# alike: then even a request that comes exactly as its token does must get
# the same verdict from both.
exact_rates = st.sampled_from([0.25, 0.5, 1.0, 2.0, 4.0, 16.0])
exact_bursts = st.sampled_from([1.0, 1.5, 2.0, 3.0, 4.25, 8.0])
exact_gaps = st.one_of(st.just(0.0), st.integers(1, 192).map(lambda n: n / 64))
exact_starts = st.sampled_from([0.0, 12_288.0])


@given(exact_rates, exact_bursts, timelines(exact_gaps, exact_starts))
def test_agrees_exactly_with_the_envelope_model(
    rate: float, burst: float, arrivals: list[Arrival]
) -> None:
    limiter = ReplyRateLimiter(rate, burst, max_sources=len(SOURCES))
    model = EnvelopeModel(rate, burst)
    for source, now in arrivals:
        assert limiter.check(source, now) is model.check(source, now), (source, now)
    assert limiter.evicted == 0


# --- Amplification ------------------------------------------------------------

# Every code point, as [start, stop) ranges by the length of its UTF-8
# encoding; surrogates have none.
UTF8_WIDTHS = (
    (1, 0, 0x80),
    (2, 0x80, 0x800),
    (3, 0x800, 0xD800),
    (3, 0xE000, 0x10000),
    (4, 0x10000, sys.maxunicode + 1),
)


def code_points(start: int, stop: int) -> str:
    """The code points from ``start`` to ``stop - 1`` as one string, made in C:
    a million calls to chr() would take most of this file's running time."""
    utf32 = array.array("I", range(start, stop))
    assert utf32.itemsize == 4
    return utf32.tobytes().decode(f"utf-32-{sys.byteorder[0]}e")


def test_utf8_amplification_is_max_growth_at_u0390_and_u03b0() -> None:
    growth: dict[int, Fraction] = {}
    for width, start, stop in UTF8_WIDTHS:
        text = code_points(start, stop)
        for offset in range(0, len(text), 256):
            block = text[offset : offset + 256]
            uppers = block.upper()
            if uppers == block:
                # No code point in the block changes: str.upper maps each on
                # its own to at least one code point, so one that did would
                # change the block too.
                continue
            each = [char.upper() for char in block]
            # That it maps each on its own is also why no message grows by
            # more than its worst code point does.
            assert "".join(each) == uppers
            for char, upper in zip(block, each, strict=True):
                if len(upper.encode()) > width:
                    growth[ord(char)] = Fraction(len(upper.encode()), width)
    worst = max(growth.values())
    assert worst == MAX_GROWTH == 3
    assert sorted(cp for cp, ratio in growth.items() if ratio == worst) == [0x390, 0x3B0]


def test_no_amplification_in_ascii_mode_or_for_invalid_utf8() -> None:
    every_byte = bytes(range(256))
    assert len(upper_ascii(every_byte)) == 256
    for byte in range(0x80, 0x100):
        assert upper_bytes(bytes([byte])) == bytes([byte])


@pytest.mark.parametrize(
    ("address", "same", "other"),
    [
        ("192.0.2.1", "192.0.2.254", "192.0.3.1"),
        ("2001:db8:0:ff::1", "2001:db8:0:ff:ffff::9", "2001:db8:0:100::1"),
        ("fe80::1%eth0", "fe80::2", "fe80:0:0:100::1"),
    ],
)
def test_source_network_groups_a_slash_24_or_a_slash_56(
    address: str, same: str, other: str
) -> None:
    # A forger spreading requests over a victim's network gets one bucket.
    assert source_network(address) == source_network(same)
    assert source_network(address) != source_network(other)


def test_network_label_names_the_counted_network() -> None:
    assert network_label("192.0.2.77") == "192.0.2.0/24"
    assert network_label("2001:db8:0:ff::1") == "2001:db8::/56"

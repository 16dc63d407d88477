"""Tests for trio_upper.ratelimit: the reply rate limiter, with time as a number
we pass (no clock, no sleeping), seen only through what check() answers."""

from __future__ import annotations

import collections
import itertools
import math
from collections.abc import Iterable, Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_upper.ratelimit import (
    BURST_SECONDS,
    MAX_KEYS,
    ReplyRateLimiter,
    Verdict,
    network_label,
    source_network,
)

ALLOW, REFUSE, FIRST = Verdict.ALLOW, Verdict.REFUSE, Verdict.FIRST_REFUSAL

VICTIM = "192.0.2.1"
OTHER = "2001:db8::1"

# Enough room for a little float rounding in a count of replies, and far less
# than the one reply a real excess would be.
TOLERANCE = 1e-6

Arrival = tuple[str, float]


def run(limiter: ReplyRateLimiter, arrivals: Iterable[Arrival]) -> list[Verdict]:
    return [limiter.check(key, now) for key, now in arrivals]


def at(now: float, count: int, key: str = VICTIM) -> list[Arrival]:
    """``count`` requests under ``key``, all at time ``now``."""
    return [(key, now)] * count


def flood(limiter: ReplyRateLimiter, keys: Iterable[str], now: float) -> None:
    """One request under each of ``keys`` at ``now``, with no Python loop
    around the calls: for a million keys, it would take most of the time."""
    collections.deque(map(limiter.check, keys, itertools.repeat(now)), maxlen=0)


# --- Strategies ---------------------------------------------------------------

KEYS = ("192.0.2.1", "192.0.2.2", "198.51.100.7", "2001:db8::1", "2001:db8::2")

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
    return [(key, now) for (key, _), now in zip(steps, times, strict=True)]


def timelines(
    gaps: st.SearchStrategy[float] = GAPS, starts: st.SearchStrategy[float] = STARTS
) -> st.SearchStrategy[list[Arrival]]:
    steps = st.lists(st.tuples(st.sampled_from(KEYS), gaps), max_size=40)
    return st.builds(_timeline, starts, steps)


rates = st.floats(0.05, 500)
bursts = st.floats(1, 30)
# From a table too small for any two keys to a table that holds them all.
table_sizes = st.integers(1, len(KEYS) + 1)


# --- Examples -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("rate", "burst"),
    [(10.0, int(10 * BURST_SECONDS)), (0.1, 1)],
    ids=["burst-seconds-of-rate", "at-least-one"],
)
def test_default_burst(rate: float, burst: int) -> None:
    limiter = ReplyRateLimiter(rate)
    assert run(limiter, at(0.0, burst + 1)) == [ALLOW] * burst + [FIRST]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rate": -1.0},
        {"rate": math.nan},
        {"rate": math.inf},
        {"rate": 10.0, "burst": 0.5},
        {"rate": 10.0, "burst": math.nan},
        {"rate": 10.0, "burst": math.inf},
        {"rate": 10.0, "max_keys": 0},
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
    # Still one run of refusals (no second FIRST): the bucket has not been
    # full since.
    assert run(limiter, at(0.5, 2)) == [ALLOW, REFUSE]


def test_a_fractional_burst() -> None:
    limiter = ReplyRateLimiter(rate=1, burst=2.5)
    assert run(limiter, at(0.0, 3)) == [ALLOW, ALLOW, FIRST]
    # 0.5 left, plus 0.5 refilled.
    assert run(limiter, at(0.5, 2)) == [ALLOW, REFUSE]


def test_refill_stops_at_the_burst() -> None:
    limiter = ReplyRateLimiter(rate=10, burst=5)
    run(limiter, at(0.0, 1))
    assert run(limiter, at(1e6, 6)) == [ALLOW] * 5 + [FIRST]


def test_each_key_has_its_own_bucket() -> None:
    limiter = ReplyRateLimiter(rate=1, burst=3)
    assert run(limiter, at(0.0, 4, VICTIM)) == [ALLOW] * 3 + [FIRST]
    assert run(limiter, at(0.0, 4, OTHER)) == [ALLOW] * 3 + [FIRST]
    assert run(limiter, at(0.0, 1, VICTIM)) == [REFUSE]


def test_a_sustained_flood_gets_the_rate_and_is_reported_once() -> None:
    limiter = ReplyRateLimiter(rate=100)  # burst: BURST_SECONDS' worth, 200
    # 1,000 requests a second for 10 s: the burst, then 100 a second.
    verdicts = run(limiter, [(VICTIM, n / 1000) for n in range(10_000)])
    assert 200 + 998 <= verdicts.count(ALLOW) <= 200 + 100 * 9.999
    assert verdicts.count(FIRST) == 1
    # Quiet for the BURST_SECONDS it takes to refill: a whole burst again, and
    # a new flood is reported again.
    assert run(limiter, at(9.999 + BURST_SECONDS, 201)) == [ALLOW] * 200 + [FIRST]


def test_rate_zero_turns_the_limit_off() -> None:
    limiter = ReplyRateLimiter(rate=0)
    assert set(run(limiter, at(0.0, 10_000))) == {ALLOW}


# --- The bounded table --------------------------------------------------------


def test_eviction_costs_the_evicted_key_a_fresh_burst() -> None:
    limiter = ReplyRateLimiter(rate=1, burst=3, max_keys=2)
    assert run(limiter, at(0.0, 4)) == [ALLOW] * 3 + [FIRST]
    # Every request of the victim's, refused ones too, makes it the most
    # recently used: one other key in between cannot push it out.
    for other in ("a", "b", "c"):
        assert limiter.check(other, 0.0) is ALLOW
        assert limiter.check(VICTIM, 0.0) is REFUSE
    # max_keys other keys between two of the victim's requests do.
    limiter.check("d", 0.0)
    limiter.check("e", 0.0)
    assert run(limiter, at(0.0, 4)) == [ALLOW] * 3 + [FIRST]


def test_only_the_least_recently_used_end_is_looked_at() -> None:
    limiter = ReplyRateLimiter(rate=1, burst=2, max_keys=2)
    assert run(limiter, at(0.0, 3)) == [ALLOW, ALLOW, FIRST]
    limiter.check("refilled", 0.5)
    # At 1.5 s, "refilled" is full again and the victim is not; but the victim
    # is the least recently used, so a new key evicts it, not "refilled".
    limiter.check("new", 1.5)
    assert run(limiter, at(1.5, 3)) == [ALLOW, ALLOW, FIRST]


def test_the_default_table_holds_max_keys() -> None:
    limiter = ReplyRateLimiter(rate=1)
    assert run(limiter, at(0.0, 3)) == [ALLOW, ALLOW, FIRST]
    # With the victim, the table is now full, and the victim is kept.
    flood(limiter, map(str, range(MAX_KEYS - 1)), 0.0)
    assert limiter.check(VICTIM, 0.0) is REFUSE
    # One more new key than that, and it is not.
    flood(limiter, map("again {}".format, range(MAX_KEYS)), 0.0)
    assert limiter.check(VICTIM, 0.0) is ALLOW


def test_a_million_forged_keys_keep_the_table_bounded() -> None:
    limiter = ReplyRateLimiter(rate=100, max_keys=1000)  # burst 200
    forged = map(str, range(1_000_000))
    regular: list[Verdict] = []
    sparse: list[Verdict] = []
    # As fast as 1,000,000 requests a second: "regular" once per 500 forged
    # keys (fewer than max_keys), "sparse" once per 1,500 (more).
    for chunk in range(2000):
        now = chunk / 2000
        flood(limiter, itertools.islice(forged, 500), now)
        regular.append(limiter.check("regular", now))
        if chunk % 3 == 0:
            sparse.append(limiter.check("sparse", now))
    # "regular" kept its place in the table, and so its bucket: it got the
    # burst and the rate over the 1999/2000 s of the flood, no more.
    assert 200 + 99 <= regular.count(ALLOW) <= 200 + 100 * 1999 / 2000
    assert regular.count(FIRST) == 1
    # "sparse" was forgotten each time: the table cannot have held more than
    # 1,500 keys. (Kept, it could have had 300 replies, not 667.)
    assert sparse == [ALLOW] * 667


# --- Properties ---------------------------------------------------------------


def forgettable(arrivals: Sequence[Arrival], max_keys: int) -> list[bool]:
    """For each arrival, whether its key may have been forgotten since its
    previous request: only if at least ``max_keys`` other keys came between."""
    others: dict[str, set[str]] = collections.defaultdict(set)
    result = []
    for key, _ in arrivals:
        result.append(len(others[key]) >= max_keys)
        others[key] = set()
        for other, seen in others.items():
            if other != key:
                seen.add(key)
    return result


@given(rates, bursts, table_sizes, timelines())
def test_no_window_gets_more_than_burst_plus_rate_times_its_length(
    rate: float, burst: float, max_keys: int, arrivals: list[Arrival]
) -> None:
    limiter = ReplyRateLimiter(rate, burst=burst, max_keys=max_keys)
    # Per key: (time, allowed, forgettable since the key's previous request).
    seen: dict[str, list[tuple[float, bool, bool]]] = collections.defaultdict(list)
    for (key, now), may_forget in zip(arrivals, forgettable(arrivals, max_keys), strict=True):
        seen[key].append((now, limiter.check(key, now) is ALLOW, may_forget))
    for events in seen.values():
        for i, (t0, _, _) in enumerate(events):
            allowed_count = 0
            for j, (t1, allowed, may_forget) in enumerate(events[i:]):
                if j and may_forget:
                    break  # a fresh burst from here on is no excess
                allowed_count += allowed
                assert allowed_count <= burst + rate * (t1 - t0) + TOLERANCE


@given(rates, bursts, table_sizes, timelines())
def test_first_refusal_starts_each_run_of_refusals(
    rate: float, burst: float, max_keys: int, arrivals: list[Arrival]
) -> None:
    limiter = ReplyRateLimiter(rate, burst=burst, max_keys=max_keys)
    previous: dict[str, Verdict] = {}
    ever_refused: set[str] = set()
    for key, now in arrivals:
        verdict = limiter.check(key, now)
        if key not in previous:
            # A new key has a full bucket.
            assert verdict is ALLOW
        elif verdict is not ALLOW and previous[key] is not ALLOW:
            # A run of refusals is reported once. (Nothing can have evicted
            # the key in between: it would have come back with a full
            # bucket, and been allowed.)
            assert verdict is REFUSE
        if verdict is not ALLOW and key not in ever_refused:
            assert verdict is FIRST
            ever_refused.add(key)
        previous[key] = verdict


@given(rates, bursts, table_sizes, timelines(), st.sampled_from(KEYS))
def test_a_quiet_key_gets_a_whole_burst_again(
    rate: float, burst: float, max_keys: int, arrivals: list[Arrival], key: str
) -> None:
    limiter = ReplyRateLimiter(rate, burst=burst, max_keys=max_keys)
    run(limiter, arrivals)
    last = max((now for k, now in arrivals if k == key), default=0.0)
    # Long enough to refill from empty, with room for rounding; and time
    # never goes back.
    quiet = max(last + burst / rate * (1 + 1e-6), arrivals[-1][1] if arrivals else 0.0)
    whole = math.floor(burst)
    assert run(limiter, at(quiet, whole + 1, key)) == [ALLOW] * whole + [FIRST]


class Model:
    """The limiter stated from the outside, without a bucket or a cleanup.

    A key's bucket holds, at time t, the least over s <= t of
    burst + rate * (t - s) - (replies it was allowed in [s, t)), and the
    least is at s = t or at the time of one of those replies (the standard
    result for a greedy token bucket). A request is allowed if that is at
    least 1; the bucket is full if it is burst. The model keeps every allowed
    reply's time, and a plain LRU list of ``max_keys`` keys: a new key that
    finds it full makes the model forget the least recently used key. The
    limiter also forgets keys whose buckets have refilled, earlier; that
    must make no difference to what it answers.
    """

    def __init__(self, rate: float, burst: float, max_keys: int) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self.replies: dict[str, list[float]] = collections.defaultdict(list)
        self.refusing: set[str] = set()
        self.recent: list[str] = []  # least recently used first

    def tokens(self, key: str, now: float) -> float:
        level = self.burst
        for count, then in enumerate(reversed(self.replies[key]), start=1):
            level = min(level, self.burst + self.rate * (now - then) - count)
        return level

    def check(self, key: str, now: float) -> Verdict:
        if key in self.recent:
            self.recent.remove(key)
        elif len(self.recent) == self.max_keys:
            forgotten = self.recent.pop(0)
            self.replies.pop(forgotten, None)
            self.refusing.discard(forgotten)
        self.recent.append(key)
        tokens = self.tokens(key, now)
        if tokens >= self.burst:
            self.refusing.discard(key)
        if tokens >= 1:
            self.replies[key].append(now)
            return ALLOW
        if key in self.refusing:
            return REFUSE
        self.refusing.add(key)
        return FIRST


# Dyadic rates, bursts and times (multiples of 1/64 s) keep every sum and
# product exact in binary floating point, in the model and in the limiter
# alike: then even a request that comes exactly as its token does must get
# the same verdict from both.
exact_rates = st.sampled_from([0.25, 0.5, 1.0, 2.0, 4.0, 16.0])
exact_bursts = st.sampled_from([1.0, 1.5, 2.0, 3.0, 4.25, 8.0])
exact_gaps = st.one_of(st.just(0.0), st.integers(1, 192).map(lambda n: n / 64))
exact_starts = st.sampled_from([0.0, 12_288.0])


@given(exact_rates, exact_bursts, table_sizes, timelines(exact_gaps, exact_starts))
def test_agrees_exactly_with_the_model(
    rate: float, burst: float, max_keys: int, arrivals: list[Arrival]
) -> None:
    limiter = ReplyRateLimiter(rate, burst=burst, max_keys=max_keys)
    model = Model(rate, burst, max_keys)
    for key, now in arrivals:
        assert limiter.check(key, now) is model.check(key, now), (key, now)


# --- Networks -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "same", "other"),
    [
        ("192.0.2.1", "192.0.2.254", "192.0.3.1"),
        ("2001:db8:0:ff::1", "2001:db8:0:ff:ffff::9", "2001:db8:0:100::1"),
        ("fe80::1%eth0", "fe80::2", "fe80:0:0:100::1"),
        # IPv4 clients of a dual-stack IPv6 socket: counted by their /24.
        ("::ffff:192.0.2.1", "192.0.2.77", "::ffff:198.51.100.1"),
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
    assert network_label("::ffff:192.0.2.77") == "192.0.2.0/24"

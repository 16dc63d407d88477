"""The sans-I/O uppercase transform (trio_upper.transform) and the UDP reply
rule built on it (trio_upper.udp.reply_for): no sockets, no trio."""

from __future__ import annotations

import array
import itertools
import logging
import re
import socket
import sys
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_upper.transform import MAX_GROWTH, Uppercaser, upper_ascii, upper_bytes
from trio_upper.udp import MAX_PAYLOAD_IPV4, MAX_PAYLOAD_IPV6, max_payload, reply_for

# --- Strategies ---------------------------------------------------------------

# Valid UTF-8 text (no lone surrogates, which UTF-8 cannot encode).
utf8_text = st.text(st.characters(codec="utf-8")).map(lambda s: s.encode("utf-8"))

# Pieces that tend to break incremental decoders: truncated multi-byte
# sequences, stray continuation bytes, bytes never valid in UTF-8, encoded
# surrogates, characters that grow when uppercased.
awkward = st.sampled_from(
    [
        b"\xc3",
        b"\xe2\x82",
        b"\xf0\x9f\x98",
        b"\x80",
        b"\xbf",
        b"\xff",
        b"\xfe",
        b"\xc0\xaf",
        b"\xed\xa0\x80",
        b"\xf4\x90\x80\x80",
        "ß".encode(),
        "\u0390".encode(),
        "ﬁ".encode(),
        "é".encode(),
        b"\n",
    ]
)

# Valid text, arbitrary bytes and awkward pieces, concatenated, so invalid
# bytes land right next to (and inside) multi-byte characters.
byte_inputs = st.one_of(
    utf8_text,
    st.binary(),
    st.lists(st.one_of(utf8_text, st.binary(max_size=6), awkward), max_size=12).map(b"".join),
)


@st.composite
def cut_inputs(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    """An input and the same input cut into chunks at random points."""
    whole = draw(byte_inputs)
    cuts = sorted(draw(st.lists(st.integers(0, len(whole)), max_size=8)))
    bounds = [0, *cuts, len(whole)]
    return whole, [whole[a:b] for a, b in itertools.pairwise(bounds)]


# U+0390 uppercases to three code points of two bytes each: the largest growth.
IOTA_DIAERESIS_TONOS = "\u0399\u0308\u0301"


def run_uppercaser(chunks: list[bytes], *, ascii_only: bool = False) -> bytes:
    upper = Uppercaser(ascii_only=ascii_only)
    return b"".join(upper.feed(chunk) for chunk in chunks) + upper.flush()


# The --ascii transform, written out: a-z become A-Z, every other byte stays.
ASCII_UPPER = bytes.maketrans(b"abcdefghijklmnopqrstuvwxyz", b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")

# One well-formed UTF-8 character (RFC 3629, section 4), spelled out here so
# that the oracle below does not lean on the codec that the code uses.
UTF8_CHAR = re.compile(
    rb"""
      [\x00-\x7f]
    | [\xc2-\xdf] [\x80-\xbf]
    | \xe0 [\xa0-\xbf] [\x80-\xbf]
    | [\xe1-\xec\xee\xef] [\x80-\xbf]{2}
    | \xed [\x80-\x9f] [\x80-\xbf]
    | \xf0 [\x90-\xbf] [\x80-\xbf]{2}
    | [\xf1-\xf3] [\x80-\xbf]{3}
    | \xf4 [\x80-\x8f] [\x80-\xbf]{2}
    """,
    re.VERBOSE,
)


def utf8_oracle(data: bytes) -> bytes:
    """The UTF-8 transform as the transform module states it, one character
    at a time: each well-formed character becomes its ``str.upper()``, and
    every byte that is not part of one stays as it is."""
    out = bytearray()
    i = 0
    while i < len(data):
        if match := UTF8_CHAR.match(data, i):
            out += match[0].decode().upper().encode()
            i = match.end()
        else:
            out.append(data[i])
            i += 1
    return bytes(out)


def escapes(data: bytes) -> list[str]:
    """The bytes of ``data`` that are not valid UTF-8, as surrogate escapes, in order."""
    return [c for c in data.decode("utf-8", "surrogateescape") if "\udc80" <= c <= "\udcff"]


# --- Examples -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("straße", "STRASSE"),
        ("héllo", "HÉLLO"),
        ("ﬁ", "FI"),
        ("\u0390", IOTA_DIAERESIS_TONOS),
        ("hello, world 123", "HELLO, WORLD 123"),
        ("", ""),
    ],
)
def test_upper_bytes_utf8_examples(text: str, expected: str) -> None:
    assert upper_bytes(text.encode()) == expected.encode()
    assert run_uppercaser([text.encode()]) == expected.encode()


def test_invalid_bytes_pass_through() -> None:
    # On its own, no byte from 0x80 up is valid UTF-8.
    for byte in range(0x80, 0x100):
        assert upper_bytes(bytes([byte])) == bytes([byte])
    assert upper_bytes(b"\xff\xfeabc") == b"\xff\xfeABC"
    assert upper_bytes(b"a\x80b\xc3") == b"A\x80B\xc3"
    assert run_uppercaser([b"\xff\xfeabc"]) == b"\xff\xfeABC"


def test_ascii_mode_changes_only_a_to_z() -> None:
    data = "héllo straße".encode()
    result = upper_bytes(data, ascii_only=True)
    assert result == b"H\xc3\xa9LLO STRA\xc3\x9fE"
    assert len(result) == len(data)
    assert upper_ascii(data) == result
    assert run_uppercaser([data], ascii_only=True) == result


def test_ascii_mode_changes_every_byte_as_the_table_says() -> None:
    every_byte = bytes(range(256))
    assert upper_ascii(every_byte) == every_byte.translate(ASCII_UPPER)
    for byte in every_byte:
        expected = bytes([ASCII_UPPER[byte]])
        assert upper_ascii(bytes([byte])) == expected
        assert upper_bytes(bytes([byte]), ascii_only=True) == expected
        assert run_uppercaser([bytes([byte])], ascii_only=True) == expected


def test_ascii_mode_never_holds_back() -> None:
    upper = Uppercaser(ascii_only=True)
    assert upper.feed(b"ab\xe2\x82") == b"AB\xe2\x82"
    assert upper.flush() == b""


def test_incomplete_sequence_at_end_is_flushed_unchanged() -> None:
    upper = Uppercaser()
    assert upper.feed(b"ab\xe2\x82") == b"AB"
    assert upper.flush() == b"\xe2\x82"
    assert upper_bytes(b"ab\xe2\x82") == b"AB\xe2\x82"


def test_split_character_is_completed_by_next_chunk() -> None:
    upper = Uppercaser()
    assert upper.feed(b"caf\xc3") == b"CAF"
    assert upper.feed(b"\xa9!") == "É!".encode()
    assert upper.flush() == b""


def test_split_character_byte_by_byte() -> None:
    data = "\u0390😀ß".encode()
    upper = Uppercaser()
    out = [upper.feed(data[i : i + 1]) for i in range(len(data))]
    assert b"".join(out) + upper.flush() == (IOTA_DIAERESIS_TONOS + "😀SS").encode()
    # Nothing comes out until a character is complete.
    assert out[0] == b""
    assert out[1] == IOTA_DIAERESIS_TONOS.encode()


def test_feed_holds_at_most_three_bytes() -> None:
    upper = Uppercaser()
    assert upper.feed(b"x\xf0\x9f\x98") == b"X"
    assert upper.flush() == b"\xf0\x9f\x98"


def test_uppercaser_is_reusable_after_flush() -> None:
    upper = Uppercaser()
    upper.feed(b"\xc3")
    assert upper.flush() == b"\xc3"
    assert upper.feed(b"\xa9") == b"\xa9"
    assert upper.feed(b"abc") == b"ABC"
    assert upper.flush() == b""


# --- Properties ---------------------------------------------------------------


@settings(max_examples=200)
@given(cut_inputs())
def test_chunking_never_changes_the_output(case: tuple[bytes, list[bytes]]) -> None:
    whole, chunks = case
    assert run_uppercaser(chunks) == upper_bytes(whole)


@settings(max_examples=200)
@given(cut_inputs())
def test_ascii_mode_is_the_table_however_the_input_is_cut(
    case: tuple[bytes, list[bytes]],
) -> None:
    whole, chunks = case
    expected = whole.translate(ASCII_UPPER)
    assert run_uppercaser(chunks, ascii_only=True) == expected
    assert upper_bytes(whole, ascii_only=True) == expected


@settings(max_examples=200)
@given(byte_inputs)
def test_utf8_mode_agrees_with_the_oracle(data: bytes) -> None:
    expected = utf8_oracle(data)
    assert upper_bytes(data) == expected
    assert run_uppercaser([data]) == expected


@settings(max_examples=200)
@given(cut_inputs())
def test_no_invalid_byte_is_dropped_or_reordered(case: tuple[bytes, list[bytes]]) -> None:
    whole, chunks = case
    assert escapes(upper_bytes(whole)) == escapes(whole)
    assert escapes(run_uppercaser(chunks)) == escapes(whole)


@settings(max_examples=200)
@given(byte_inputs, st.integers(0, 64))
def test_feed_holds_back_only_an_incomplete_tail(data: bytes, cut: int) -> None:
    head = data[:cut]
    upper = Uppercaser()
    emitted = upper.feed(head)
    held = upper.flush()
    assert len(held) <= 3
    assert head.endswith(held)
    assert emitted == upper_bytes(head[: len(head) - len(held)])


@settings(max_examples=200)
@given(byte_inputs)
def test_newline_count_is_preserved(data: bytes) -> None:
    assert upper_bytes(data).count(b"\n") == data.count(b"\n")
    assert upper_bytes(data, ascii_only=True).count(b"\n") == data.count(b"\n")


@settings(max_examples=200)
@given(byte_inputs)
def test_growth_is_bounded(data: bytes) -> None:
    assert len(upper_bytes(data)) <= MAX_GROWTH * len(data)


# --- MAX_GROWTH ---------------------------------------------------------------


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


def test_max_growth_bounds_every_code_point_and_is_tight() -> None:
    growth: dict[int, Fraction] = {}
    for width, start, stop in UTF8_WIDTHS:
        text = code_points(start, stop)
        for offset in range(0, len(text), 256):
            block = text[offset : offset + 256]
            upper = upper_bytes(block.encode())
            if upper == block.encode():
                # No code point in the block changes: each maps on its own
                # (checked below where one does) to at least one code point,
                # so one that did would change the block too.
                continue
            each = [upper_bytes(char.encode()) for char in block]
            # Mapped each on its own, no message grows by more than its worst
            # code point does: what makes this scan a bound on every message.
            assert b"".join(each) == upper
            for char, char_upper in zip(block, each, strict=True):
                if len(char_upper) > width:
                    growth[ord(char)] = Fraction(len(char_upper), width)
    worst = max(growth.values())
    assert worst == MAX_GROWTH
    # The two that README.md names.
    assert sorted(cp for cp, ratio in growth.items() if ratio == worst) == [0x390, 0x3B0]


# --- UDP replies --------------------------------------------------------------


def test_max_payload_per_family() -> None:
    assert max_payload(socket.AF_INET) == MAX_PAYLOAD_IPV4 == 65507
    assert max_payload(socket.AF_INET6) == MAX_PAYLOAD_IPV6 == 65527


def test_reply_that_fits_is_the_utf8_uppercase() -> None:
    request = "straße \u0390".encode()
    expected = ("STRASSE " + IOTA_DIAERESIS_TONOS).encode()
    assert reply_for(request, limit=65507) == expected
    # Exactly at the limit still fits.
    assert reply_for(request, limit=len(expected)) == expected


def test_reply_that_would_not_fit_is_the_ascii_transform() -> None:
    request = b"abc " + "\u0390".encode() * 10  # 24 bytes; its UTF-8 uppercase is 64
    assert len(upper_bytes(request)) == 64
    reply = reply_for(request, limit=63)
    assert reply == b"ABC " + "\u0390".encode() * 10
    assert len(reply) == len(request)


def test_full_size_datagram_that_grows_gets_the_ascii_transform() -> None:
    request = ("\u0390".encode() * (MAX_PAYLOAD_IPV4 // 2)) + b"z"
    assert len(request) == MAX_PAYLOAD_IPV4
    reply = reply_for(request, limit=max_payload(socket.AF_INET))
    assert reply == request[:-1] + b"Z"


def test_reply_in_ascii_mode_is_always_ascii() -> None:
    request = "héllo ß".encode()
    assert reply_for(request, ascii_only=True, limit=65507) == upper_ascii(request)


@settings(max_examples=200)
@given(byte_inputs, st.integers(0, 64))
def test_reply_never_exceeds_the_limit(request: bytes, extra: int) -> None:
    limit = len(request) + extra
    reply = reply_for(request, limit=limit)
    assert len(reply) <= limit
    assert reply in (upper_bytes(request), request.upper())
    if len(upper_bytes(request)) <= limit:
        assert reply == upper_bytes(request)
    else:
        assert reply == request.upper()


def test_ascii_fallback_is_logged_at_debug_level(caplog: pytest.LogCaptureFixture) -> None:
    request = "\u0390".encode() * 10  # 20 bytes; its UTF-8 uppercase is 60
    with caplog.at_level(logging.DEBUG, logger="trio_upper.udp"):
        assert reply_for(request, limit=59) == request
    [record] = caplog.records
    assert record.name == "trio_upper.udp"
    assert record.levelno == logging.DEBUG
    assert "--ascii" in record.getMessage()


def test_reply_that_fits_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    request = "\u0390".encode() * 10
    with caplog.at_level(logging.DEBUG, logger="trio_upper.udp"):
        assert reply_for(request, limit=60) == upper_bytes(request)
    assert caplog.records == []

"""The uppercase transform, with no I/O in it.

This module is the whole protocol of trio-upper: bytes go in, their uppercase
comes out. It knows nothing about sockets or trio, so it can be tested
exhaustively on its own (in the spirit of h11), and both the TCP and the UDP
side of the server share it.

Two modes:

* UTF-8 (the default): text is uppercased with :meth:`str.upper` semantics
  (``straße`` becomes ``STRASSE``). Bytes that are not valid UTF-8 pass
  through unchanged, so no input is ever rejected and nothing is dropped.
* ASCII: only the bytes ``a``-``z`` change, one byte for one byte, which is
  what the lecture's Python 2 ``str.upper()`` did. Output length always equals
  input length.

A TCP connection is a stream, so a multi-byte character may arrive split
across two reads. :class:`Uppercaser` keeps the incomplete tail of one read
and finishes it with the next, so that for every way of cutting the input
into chunks, the concatenated output equals the one-shot output.
"""

from __future__ import annotations

import codecs
from functools import partial

__all__ = ["MAX_GROWTH", "Uppercaser", "upper_ascii", "upper_bytes"]

# "surrogateescape" maps every byte that is not part of valid UTF-8 to a lone
# surrogate (U+DC80..U+DCFF) on decode and back to the very same byte on
# encode. Lone surrogates have no case, so str.upper() leaves them alone: this
# one error handler is what makes invalid bytes pass through untouched.
_ERRORS = "surrogateescape"

# The largest factor by which the UTF-8 transform can grow its input, in bytes:
# U+0390 (2 bytes) uppercases to three code points of 2 bytes each. The test
# suite checks this bound against every code point; the README quotes it, as
# the most reply bytes one request byte can cause. --ascii never grows.
MAX_GROWTH = 3


_new_decoder = partial(codecs.getincrementaldecoder("utf-8"), _ERRORS)


def upper_ascii(data: bytes) -> bytes:
    """Uppercase only ``a``-``z``, byte for byte (``bytes.upper`` is exactly that)."""
    return data.upper()


def upper_bytes(data: bytes, *, ascii_only: bool = False) -> bytes:
    """Return the uppercase of a complete message, such as one UDP datagram.

    Equivalent to feeding ``data`` to a fresh :class:`Uppercaser` and flushing
    it. Never raises on any input.
    """
    if ascii_only or data.isascii():
        return data.upper()
    return data.decode("utf-8", _ERRORS).upper().encode("utf-8", _ERRORS)


class Uppercaser:
    """Incremental uppercase transform of one byte stream (one TCP connection).

    Call :meth:`feed` with each chunk as it arrives and send back what it
    returns; call :meth:`flush` once at end of stream. The concatenated output
    does not depend on how the input was cut into chunks.

    Args:
      ascii_only: If true, only ``a``-``z`` change and nothing is ever held
          back between chunks.
    """

    __slots__ = ("_ascii_only", "_decoder", "_holding")

    def __init__(self, *, ascii_only: bool = False) -> None:
        self._ascii_only = ascii_only
        # Made on the first non-ASCII chunk: most connections never need one,
        # and a server holds one Uppercaser per open connection.
        self._decoder: codecs.IncrementalDecoder | None = None
        # True while the decoder holds the first bytes of a character split
        # across chunks. Kept as a flag so the ASCII fast path costs one check.
        self._holding = False

    def feed(self, data: bytes) -> bytes:
        """Return the uppercase of ``data``, holding back at most 3 bytes of an
        incomplete UTF-8 sequence at its end until the next call.

        Never raises on any input.
        """
        if self._ascii_only or (not self._holding and data.isascii()):
            # The common case: bytes.upper() is a single C loop, so UTF-8 mode
            # costs nearly nothing on ASCII traffic.
            return data.upper()
        if self._decoder is None:
            self._decoder = _new_decoder()
        text = self._decoder.decode(data)
        self._holding = bool(self._decoder.getstate()[0])
        return text.upper().encode("utf-8", _ERRORS)

    def flush(self) -> bytes:
        """End the stream: return any held-back incomplete sequence, unchanged."""
        if self._decoder is None:
            return b""
        text = self._decoder.decode(b"", final=True)
        self._holding = False
        return text.encode("utf-8", _ERRORS)

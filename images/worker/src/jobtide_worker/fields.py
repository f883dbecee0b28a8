"""AMQP field values (message headers) read and written back without loss.

pika 1.4 decodes some field types lossily or not at all: a float or double becomes an int
(3.75 reads as 3) and NaN or infinity raises while the frame is parsed; a timestamp beyond
datetime's range raises too; a decimal's digits are read as signed; a long string that is not
UTF-8 comes back as bytes and is written again as a byte array; every integer type is written
again as a 32- or 64-bit one. A publisher other than pika sends all of these, so a header could
kill the consumer, and the dead-letter copy would not carry the headers the message came with.

`install()` makes pika decode those values into the types below, which remember their field
type, and encode them back as they came: a dead letter carries the original headers, and a
handler sees the real number. Values of plain Python types encode as pika always did. The
change is process-wide (pika's codec is module state); the worker installs it when it starts
consuming, and `install()` may be called again.
"""

from __future__ import annotations

import datetime
import decimal
import struct
from collections.abc import Callable
from typing import Any

import pika.data  # type: ignore[import-untyped]


class FieldInt(int):
    """An integer header with its AMQP field type: `tag` is one of b B s u I i l L, or T for a
    timestamp that a datetime cannot hold (beyond year 9999)."""

    tag: str

    def __new__(cls, value: int, tag: str) -> FieldInt:
        self = super().__new__(cls, value)
        self.tag = tag
        return self

    def __repr__(self) -> str:
        return f"FieldInt({int(self)}, {self.tag!r})"


class FieldFloat(float):
    """A float (`tag` f, 32 bits) or double (d) header."""

    tag: str

    def __new__(cls, value: float, tag: str) -> FieldFloat:
        self = super().__new__(cls, value)
        self.tag = tag
        return self

    def __repr__(self) -> str:
        return f"FieldFloat({float(self)!r}, {self.tag!r})"


class FieldDecimal(decimal.Decimal):
    """A decimal header: `digits` (unsigned 32 bits) scaled down by `places` decimal places."""

    places: int
    digits: int

    def __new__(cls, places: int, digits: int) -> FieldDecimal:
        self = super().__new__(cls, decimal.Decimal(digits).scaleb(-places))
        self.places = places
        self.digits = digits
        return self


class LongString(bytes):
    """A long-string header that is not UTF-8 (bytes; a byte array header is plain bytes)."""


class RawField(bytes):
    """A table or array nested deeper than MAX_DEPTH, kept as it was encoded (its type tag
    first): pika decodes tables by recursion, and a publisher can nest them deeper than
    Python's stack."""


# Far deeper than any header a program means to send; far below Python's recursion limit.
MAX_DEPTH = 32


_Decoded = tuple[Any, int]
_FIXED: dict[bytes, tuple[str, type[FieldInt] | type[FieldFloat]]] = {
    b"b": (">b", FieldInt),
    b"B": (">B", FieldInt),
    b"s": (">h", FieldInt),
    b"u": (">H", FieldInt),
    b"I": (">i", FieldInt),
    b"i": (">I", FieldInt),
    b"l": (">q", FieldInt),
    b"L": (">Q", FieldInt),
    b"f": (">f", FieldFloat),
    b"d": (">d", FieldFloat),
}


def decode_value(encoded: bytes, offset: int, depth: int = 0) -> _Decoded:
    """pika.data.decode_value without its losses; other types as pika decodes them. `depth`:
    how many tables and arrays this value is nested in."""
    kind = encoded[offset : offset + 1]
    fixed = _FIXED.get(kind)
    if fixed is not None:
        fmt, make = fixed
        (value,) = struct.unpack_from(fmt, encoded, offset + 1)
        return make(value, kind.decode()), offset + 1 + struct.calcsize(fmt)
    if kind == b"D":
        places, digits = struct.unpack_from(">BI", encoded, offset + 1)
        return FieldDecimal(places, digits), offset + 6
    if kind == b"T":
        (seconds,) = struct.unpack_from(">Q", encoded, offset + 1)
        try:
            return datetime.datetime.fromtimestamp(seconds, datetime.UTC), offset + 9
        except (OverflowError, OSError, ValueError):
            return FieldInt(seconds, "T"), offset + 9
    if kind == b"S":
        (length,) = struct.unpack_from(">I", encoded, offset + 1)
        start = offset + 5
        raw = encoded[start : start + length]
        try:
            return raw.decode("utf-8"), start + length
        except UnicodeDecodeError:
            return LongString(raw), start + length
    if kind in (b"A", b"F"):
        (length,) = struct.unpack_from(">I", encoded, offset + 1)
        end = offset + 5 + length
        if depth >= MAX_DEPTH:
            return RawField(encoded[offset:end]), end
        offset += 5
        if kind == b"F":
            table: dict[Any, Any] = {}
            while offset < end:
                key, offset = pika.data.decode_short_string(encoded, offset)
                table[key], offset = decode_value(encoded, offset, depth + 1)
            return table, end
        values = []
        while offset < end:
            value, offset = decode_value(encoded, offset, depth + 1)
            values.append(value)
        return values, end
    return _pika_decode_value(encoded, offset)


def encode_value(pieces: list[bytes], value: Any) -> int:
    """pika.data.encode_value, writing the types above back as they were read."""
    if isinstance(value, RawField):
        return _append(pieces, bytes(value))
    if isinstance(value, FieldInt):
        fmt = ">Q" if value.tag == "T" else _FIXED[value.tag.encode()][0]
        return _append(pieces, struct.pack(">c", value.tag.encode()) + struct.pack(fmt, value))
    if isinstance(value, FieldFloat):
        fmt = _FIXED[value.tag.encode()][0]
        return _append(pieces, struct.pack(">c", value.tag.encode()) + struct.pack(fmt, value))
    if isinstance(value, float):
        # pika cannot write a plain float at all; a double holds every one.
        return _append(pieces, struct.pack(">cd", b"d", value))
    if isinstance(value, FieldDecimal):
        return _append(pieces, struct.pack(">cBI", b"D", value.places, value.digits))
    if isinstance(value, LongString):
        return _append(pieces, struct.pack(">cI", b"S", len(value)) + bytes(value))
    if isinstance(value, list):
        # pika's own list encoding calls its encode_value by name: the elements come here.
        inner: list[bytes] = []
        for item in value:
            encode_value(inner, item)
        body = b"".join(inner)
        return _append(pieces, struct.pack(">cI", b"A", len(body)) + body)
    return _pika_encode_value(pieces, value)


def _append(pieces: list[bytes], piece: bytes) -> int:
    pieces.append(piece)
    return len(piece)


_pika_decode_value: Callable[[bytes, int], _Decoded] = pika.data.decode_value
_pika_encode_value: Callable[[list[bytes], Any], int] = pika.data.encode_value


def install() -> None:
    """Route pika's table codec through this module (its decode_table and encode_table look
    both functions up by name in pika.data at each call)."""
    pika.data.decode_value = decode_value
    pika.data.encode_value = encode_value

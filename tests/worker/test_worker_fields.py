"""The lossless AMQP field codec (jobtide_worker.fields): header tables as a client other than
pika writes them decode to the right values and encode back to the same bytes."""

from __future__ import annotations

import datetime
import math
import struct
from decimal import Decimal

import pika.data
import pytest
from jobtide_worker import fields

pytestmark = pytest.mark.unit


def _table(*items: tuple[bytes, bytes]) -> bytes:
    body = b"".join(bytes([len(key)]) + key + value for key, value in items)
    return struct.pack(">I", len(body)) + body


def _round_trip(table: bytes) -> dict[str, object]:
    fields.install()
    decoded, end = pika.data.decode_table(table, 0)
    assert end == len(table)
    pieces: list[bytes] = []
    pika.data.encode_table(pieces, decoded)
    assert b"".join(pieces) == table
    return decoded


def test_every_field_type_reads_right_and_writes_back_byte_for_byte() -> None:
    table = _table(
        (b"double", b"d" + struct.pack(">d", 3.75)),
        (b"float", b"f" + struct.pack(">f", 1.5)),
        (b"nan", b"d" + struct.pack(">d", math.nan)),
        (b"decimal", b"D" + struct.pack(">BI", 2, 150)),
        (b"unsigned-decimal", b"D" + struct.pack(">BI", 0, 4_000_000_000)),
        (b"timestamp", b"T" + struct.pack(">Q", 1_700_000_000)),
        (b"far-timestamp", b"T" + struct.pack(">Q", 2**62)),
        (b"uint8", b"B" + struct.pack(">B", 200)),
        (b"int8", b"b" + struct.pack(">b", -3)),
        (b"uint16", b"u" + struct.pack(">H", 60_000)),
        (b"uint32", b"i" + struct.pack(">I", 4_000_000_000)),
        (b"int64", b"l" + struct.pack(">q", -(2**63))),
        (b"not-utf8", b"S" + struct.pack(">I", 2) + b"\xff\xfe"),
        (b"bytes", b"x" + struct.pack(">I", 2) + b"\xff\xfe"),
        (b"void", b"V"),
        (b"array", b"A" + struct.pack(">I", 4) + b"b\x05b\x06"),
    )
    headers = _round_trip(table)
    assert headers["double"] == 3.75  # pika alone: 3
    assert headers["float"] == 1.5
    assert math.isnan(headers["nan"])  # type: ignore[arg-type]
    assert headers["decimal"] == Decimal("1.50")
    assert headers["unsigned-decimal"] == 4_000_000_000  # pika alone: negative
    assert headers["timestamp"] == datetime.datetime.fromtimestamp(1_700_000_000, datetime.UTC)
    assert headers["far-timestamp"] == 2**62  # pika alone: fails on the frame
    assert headers["uint8"] == 200
    assert headers["int64"] == -(2**63)
    assert headers["not-utf8"] == headers["bytes"] == b"\xff\xfe"
    assert isinstance(headers["not-utf8"], fields.LongString)
    assert headers["void"] is None
    assert headers["array"] == [5, 6]


def test_tables_nested_past_the_stack_are_kept_as_their_bytes() -> None:
    value = b"V"
    for _ in range(5000):
        value = b"F" + struct.pack(">I", len(value) + 2) + b"\x01n" + value
    headers = _round_trip(_table((b"deep", value)))
    level = headers["deep"]
    for _ in range(fields.MAX_DEPTH):
        assert isinstance(level, dict)
        level = level["n"]
    assert isinstance(level, fields.RawField)


def test_plain_values_encode_as_pika_always_did_and_floats_as_doubles() -> None:
    fields.install()
    pieces: list[bytes] = []
    pika.data.encode_table(pieces, {"i": 5, "s": "x", "f": 0.5})
    assert b"".join(pieces) == _table(
        (b"i", b"I" + struct.pack(">i", 5)),
        (b"s", b"S" + struct.pack(">I", 1) + b"x"),
        (b"f", b"d" + struct.pack(">d", 0.5)),
    )

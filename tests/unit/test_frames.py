"""Frame codec: what the data path relies on, without a broker."""

from __future__ import annotations

import struct

import pytest
from pamqp import commands

from amqproxy_mp.amqp import frames, methods, spec, validate
from amqproxy_mp.amqp.frames import FrameError


def test_frame_roundtrip_through_pamqp() -> None:
    encoded = methods.encode_method(7, commands.Basic.Qos(prefetch_count=10))
    frame_type, channel, size = frames.FRAME_HEADER.unpack_from(encoded)
    assert (frame_type, channel, size) == (frames.METHOD, 7, len(encoded) - frames.OVERHEAD)
    assert encoded[-1] == frames.FRAME_END
    payload = memoryview(encoded)[frames.HEADER_SIZE : -1]
    assert frames.method_id(payload) == 0x003C000A
    assert validate.method_arguments(spec.BASIC_QOS, payload) == [0, 10, False]
    decoded = methods.decode_broker_method(payload)
    assert isinstance(decoded, commands.Basic.Qos)
    assert decoded.prefetch_count == 10


def test_frame_rewrites_channel_and_keeps_payload() -> None:
    payload = b"\x00\x3c\x00\x28" + b"opaque-bytes"
    out = frames.frame(frames.METHOD, 513, payload)
    assert out == b"\x01\x02\x01\x00\x00\x00\x10" + payload + b"\xce"


@pytest.mark.parametrize("size", [0, 1, 4088, 4089, 4096 * 3, 100_000])
def test_body_frames_fit_frame_max_and_keep_bytes(size: int) -> None:
    body = bytes(range(256)) * (size // 256 + 1)
    body = body[:size]
    parts = frames.body_frames(3, body, 4096)
    assert all(len(part) <= 4096 for part in parts)
    rebuilt = b""
    for part in parts:
        frame_type, channel, length = frames.FRAME_HEADER.unpack_from(part)
        assert (frame_type, channel) == (frames.BODY, 3)
        assert part[-1] == frames.FRAME_END
        rebuilt += part[frames.HEADER_SIZE : frames.HEADER_SIZE + length]
    assert rebuilt == body
    assert len(parts) == max(1, -(-size // (4096 - frames.OVERHEAD)))


def test_content_header_body_size() -> None:
    header = commands.Basic.Properties(content_type="text/plain")
    from pamqp.header import ContentHeader

    payload = ContentHeader(0, 123456789, header).marshal()
    assert validate.check_content_header(payload) == 123456789
    with pytest.raises(FrameError) as err:
        validate.check_content_header(b"\x00\x3c")
    assert (err.value.code, err.value.text) == (
        501,
        "FRAME_ERROR - type 2, all octets = <<0,60>>: unknown_frame",
    )
    with pytest.raises(FrameError) as err:  # a content header of another class
        validate.check_content_header(b"\x00\x28" + payload[2:])
    assert (err.value.code, err.value.class_id, err.value.method_id) == (505, 60, 40)


def headers_property(entries: bytes) -> bytes:
    """A content header whose only property is a headers table with these entries."""
    table = struct.pack(">I", len(entries)) + entries
    return struct.pack(">HHQH", 60, 0, 1, 0x2000) + table


@pytest.mark.parametrize(
    ("value", "accepted"),
    [
        (b"L" + struct.pack(">q", -(2**63)), True),  # RabbitMQ reads 'L' as signed 64-bit
        (b"l" + struct.pack(">q", 2**63 - 1), True),
        (b"d" + struct.pack(">d", 1.5), True),
        (b"d" + struct.pack(">d", float("nan")), False),  # Erlang's float pattern fails
        (b"d" + struct.pack(">d", float("-inf")), False),
        (b"f" + struct.pack(">f", float("inf")), False),
        (b"f" + struct.pack(">f", -0.0), True),
        (b"A" + struct.pack(">I", 0), True),
        (b"F" + struct.pack(">I", 0), True),
        (b"S" + struct.pack(">I", 0), True),
        (b"x" + struct.pack(">I", 2) + b"\xff\x00", True),
        (b"V", True),
        (b"D\x02" + struct.pack(">I", 5), True),
        (b"T" + struct.pack(">Q", 2**64 - 1), True),
        (b"U" + struct.pack(">H", 1), False),  # not a tag RabbitMQ knows
        (b"S" + struct.pack(">I", 5) + b"ab", False),  # runs past the table
    ],
)
def test_header_field_values_as_rabbitmq_reads_them(value: bytes, accepted: bool) -> None:
    payload = headers_property(b"\x01k" + value)
    if accepted:
        assert validate.check_content_header(payload) == 1
    else:
        with pytest.raises(FrameError) as err:
            validate.check_content_header(payload)
        assert (err.value.code, err.value.text) == (541, "INTERNAL_ERROR")


def test_deeply_nested_tables_are_walked_without_recursion() -> None:
    """RabbitMQ parses a table nested 20 000 deep; the proxy must not run out of stack."""
    inner = b""
    for _ in range(20000):
        inner = b"\x00F" + struct.pack(">I", len(inner)) + inner
    assert validate.check_content_header(headers_property(inner)) == 1
    nested_arrays = b""
    for _ in range(20000):
        nested_arrays = b"A" + struct.pack(">I", len(nested_arrays)) + nested_arrays
    assert validate.check_content_header(headers_property(b"\x01k" + nested_arrays)) == 1


def test_method_arguments_as_rabbitmq_reads_them() -> None:
    declare = methods.encode_method(1, commands.Queue.Declare(queue="q", exclusive=True))[7:-1]
    assert validate.method_arguments(spec.QUEUE_DECLARE, declare)[:7] == [
        0,
        "q",
        False,
        False,
        True,
        False,
        False,
    ]
    with pytest.raises(FrameError) as err:  # one byte too many: the broker's 501, quoted
        validate.method_arguments(spec.QUEUE_DECLARE, declare + b"\x00")
    assert (err.value.code, err.value.class_id, err.value.method_id) == (501, 50, 10)
    assert err.value.text == "FRAME_ERROR - cannot decode <<0,0,1,113,4,0,0,0,0,0>>"
    bad_utf8 = declare.replace(b"\x01q", b"\x01\x80")
    with pytest.raises(FrameError) as err:
        validate.method_arguments(spec.QUEUE_DECLARE, bad_utf8)
    assert (err.value.code, err.value.text) == (501, "FRAME_ERROR - Malformed UTF-8 in shortstr")
    unknown_tag = declare[:-4] + struct.pack(">I", 4) + b"\x01kU\x00"
    with pytest.raises(FrameError) as err:  # its parser crashes: the socket just closes
        validate.method_arguments(spec.QUEUE_DECLARE, unknown_tag)
    assert err.value.code == validate.DROP


def test_method_arguments_read_again_are_the_same_and_errors_stay_errors() -> None:
    """Small payloads read before are answered from a cache: the same values (a list the
    caller may change without changing the next answer), the same error every time, and a
    cache that does not grow without bound."""
    declare = methods.encode_method(1, commands.Queue.Declare(queue="q2", durable=True))[7:-1]
    first = validate.method_arguments(spec.QUEUE_DECLARE, declare)
    first.append("changed")
    again = validate.method_arguments(spec.QUEUE_DECLARE, memoryview(declare))
    assert again == first[:-1] and again[1:3] == ["q2", False]
    for _ in range(2):
        with pytest.raises(FrameError):
            validate.method_arguments(spec.QUEUE_DECLARE, declare + b"\x00")
    for n in range(3 * validate._RECENT_ENTRIES):
        qos = struct.pack(">IIHB", spec.BASIC_QOS, 0, n, 0)
        assert validate.method_arguments(spec.BASIC_QOS, qos) == [0, n, False]
    assert len(validate._RECENT) <= validate._RECENT_ENTRIES


def test_methods_with_credentials_are_never_kept() -> None:
    """A StartOk is read afresh every time (a refused password would otherwise stay in the
    cache); only its client-properties table, which holds no credentials, is remembered."""
    start_ok = methods.encode_method(
        0, commands.Connection.StartOk({"product": "x"}, "PLAIN", "\0user\0secret-pw", "en_US")
    )[7:-1]
    values = validate.method_arguments(spec.CONNECTION_START_OK, start_ok)
    assert values[1:3] == ["PLAIN", b"\0user\0secret-pw"]
    assert not any(b"secret-pw" in key for _, key in validate._RECENT)
    assert not any(b"secret-pw" in table for table in validate._CHECKED_TABLES)
    start, end = values[0]
    assert bytes(start_ok[start:end]) in validate._CHECKED_TABLES
    unreadable = start_ok.replace(b"productS", b"productU", 1)  # a tag the broker lacks
    for _ in range(2):  # a table that failed is not remembered as checked
        with pytest.raises(FrameError) as err:
            validate.method_arguments(spec.CONNECTION_START_OK, unreadable)
        assert err.value.code == validate.DROP


def test_long_reply_texts_are_cut_as_rabbitmq_cuts_them() -> None:
    assert frames.amqp_error_text("x" * 255) == "x" * 255
    assert frames.amqp_error_text("x" * 300) == "x" * 252 + "..."


def test_sasl_plain_and_amqplain() -> None:
    assert methods.parse_sasl_response("PLAIN", b"\0alice\0s3cret") == ("alice", "s3cret")
    from pamqp import encode

    table = encode.field_table({"LOGIN": "bob", "PASSWORD": "pw\0x"})[4:]
    assert methods.parse_sasl_response("AMQPLAIN", table) == ("bob", "pw\0x")
    for mechanism, response in [("PLAIN", b"nouser"), ("AMQPLAIN", b"\x05LOG"), ("EXTERNAL", b"")]:
        with pytest.raises(ValueError):
            methods.parse_sasl_response(mechanism, response)


@pytest.mark.parametrize("tag", [b"t", b"b", b"B", b"s", b"u", b"I", b"i", b"l", b"L", b"f",
                                 b"d", b"D", b"T", b"V", b"x", b"F", b"A"])  # fmt: skip
@pytest.mark.parametrize("field", [b"LOGIN", b"PASSWORD"])
def test_amqplain_fields_must_be_strings(tag: bytes, field: bytes) -> None:
    """A LOGIN of type I claiming 512 MiB must be refused, not allocated; long strings (S)
    and binaries (x) are what RabbitMQ reads as a login."""
    values = {
        b"t": b"\x01", b"b": b"\x01", b"B": b"\x01", b"s": b"\x00\x01", b"u": b"\x00\x01",
        b"I": struct.pack(">I", 2**29), b"i": struct.pack(">I", 2**29),
        b"l": struct.pack(">q", 2**29), b"L": struct.pack(">q", 2**29),
        b"f": struct.pack(">f", 1.0), b"d": struct.pack(">d", 1.0), b"D": b"\x00" * 5,
        b"T": struct.pack(">Q", 2**29), b"V": b"", b"x": struct.pack(">I", 1) + b"u",
        b"F": struct.pack(">I", 0), b"A": struct.pack(">I", 0),
    }  # fmt: skip
    other = b"PASSWORD" if field == b"LOGIN" else b"LOGIN"
    response = (
        bytes([len(field)]) + field + tag + values[tag]
        + bytes([len(other)]) + other + b"S" + struct.pack(">I", 1) + b"u"
    )  # fmt: skip
    if tag == b"x":
        assert "u" in methods.parse_sasl_response("AMQPLAIN", response)
        return
    with pytest.raises(methods.WrongSaslType, match="is not a string"):
        methods.parse_sasl_response("AMQPLAIN", response)

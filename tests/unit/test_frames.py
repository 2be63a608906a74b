"""Frame codec: what the data path relies on, without a broker."""

from __future__ import annotations

import pytest
from pamqp import commands

from amqproxy_mp.amqp import frames, methods, validate
from amqproxy_mp.amqp.frames import FrameError


def test_frame_roundtrip_through_pamqp() -> None:
    encoded = methods.encode_method(7, commands.Basic.Qos(prefetch_count=10))
    frame_type, channel, size = frames.FRAME_HEADER.unpack_from(encoded)
    assert (frame_type, channel, size) == (frames.METHOD, 7, len(encoded) - frames.OVERHEAD)
    assert encoded[-1] == frames.FRAME_END
    payload = memoryview(encoded)[frames.HEADER_SIZE : -1]
    assert frames.method_id(payload) == 0x003C000A
    decoded = methods.decode_method(payload)
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
    assert err.value.code == 501
    with pytest.raises(FrameError) as err:  # a content header of another class
        validate.check_content_header(b"\x00\x28" + payload[2:])
    assert err.value.code == 505


def test_decode_unknown_and_malformed_methods() -> None:
    with pytest.raises(FrameError) as err:
        methods.decode_method(b"\x00\x63\x00\x01")
    assert err.value.code == 503
    assert "unknown method 99.1" in err.value.text
    with pytest.raises(FrameError) as err:
        methods.decode_method(b"\x00\x0a\x00\x28\xff")  # Connection.Open, truncated shortstr
    assert err.value.code == 502
    with pytest.raises(FrameError):
        frames.method_id(b"\x00")


def test_sasl_plain_and_amqplain() -> None:
    assert methods.parse_sasl_response("PLAIN", "\0alice\0s3cret") == ("alice", "s3cret")
    from pamqp import encode

    table = encode.field_table({"LOGIN": "bob", "PASSWORD": "pw\0x"})[4:]
    assert methods.parse_sasl_response("AMQPLAIN", table) == ("bob", "pw\0x")
    for mechanism, response in [("PLAIN", "nouser"), ("AMQPLAIN", b"\x05LOG"), ("EXTERNAL", "")]:
        with pytest.raises(ValueError):
            methods.parse_sasl_response(mechanism, response)

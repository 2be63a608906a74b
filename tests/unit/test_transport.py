"""FramedProtocol's reassembly: frames come out whole and in order however the reads split
them, across pauses, and nothing after a protocol error is handed on."""

from __future__ import annotations

import asyncio
import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amqproxy_mp.amqp.frames import BODY, METHOD, FrameError, frame
from amqproxy_mp.amqp.transport import FramedProtocol


class Recorder(FramedProtocol):
    """Keeps every frame it is handed."""

    def __init__(self, pause_every: int = 0) -> None:
        loop = asyncio.new_event_loop()
        loop.close()  # only sending uses the loop, and nothing is sent here
        super().__init__(loop)
        self.frame_max = 131072
        self.frames: list[tuple[int, int, bytes]] = []
        self.errors: list[FrameError] = []
        self.pause_every = pause_every

    def frame_received(self, frame_type: int, channel: int, payload: memoryview) -> None:
        self.frames.append((frame_type, channel, bytes(payload)))
        if self.pause_every and len(self.frames) % self.pause_every == 0:
            self.pause_parsing()

    def protocol_error(self, exc: FrameError) -> None:
        self.errors.append(exc)
        self.closed = True


def stream(count: int, seed: int) -> tuple[bytes, list[tuple[int, int, bytes]]]:
    rng = random.Random(seed)
    frames = []
    for i in range(count):
        payload = rng.randbytes(rng.choice([0, 1, 6, 7, 8, 100, 5000, 70000]))
        frames.append((rng.choice([METHOD, BODY]), i % 7 + 1, payload))
    return b"".join(frame(t, c, p) for t, c, p in frames), frames


def feed(proto: Recorder, data: bytes, cuts: list[int]) -> None:
    edges = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    for a, b in itertools.pairwise(edges):
        proto.data_received(data[a:b])
        while proto._parsing_paused:
            proto.resume_parsing()


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    cuts=st.lists(st.integers(0, 10**6), max_size=40),
    pause_every=st.sampled_from([0, 1, 3]),
)
def test_frames_survive_any_split(seed: int, cuts: list[int], pause_every: int) -> None:
    data, expected = stream(12, seed)
    proto = Recorder(pause_every)
    feed(proto, data, cuts)
    assert proto.frames == expected
    assert not proto._buf


def test_byte_by_byte() -> None:
    data, expected = stream(4, 2)
    proto = Recorder()
    for i in range(len(data)):
        proto.data_received(data[i : i + 1])
    assert proto.frames == expected


@pytest.mark.parametrize("split", [3, 7, 10])
def test_nothing_after_a_bad_frame_end_is_handed_on(split: int) -> None:
    good = frame(METHOD, 1, b"abc")
    bad = bytearray(frame(METHOD, 1, b"xyz"))
    bad[-1] = 0
    proto = Recorder()
    proto.data_received(good[:split])
    proto.data_received(good[split:] + bytes(bad) + frame(METHOD, 1, b"after"))
    assert proto.frames == [(METHOD, 1, b"abc")]
    assert [e.code for e in proto.errors] == [501]
    assert not proto._buf


def test_oversized_frame_is_refused_before_it_arrives() -> None:
    proto = Recorder()
    proto.frame_max = 4096
    proto.data_received(frame(METHOD, 1, b"ok")[:5])
    proto.data_received(frame(METHOD, 1, b"ok")[5:] + frame(BODY, 1, b"x" * 5000)[:100])
    assert proto.frames == [(METHOD, 1, b"ok")]
    assert "{frame_too_large,5000,4088}" in proto.errors[0].text


def test_a_payload_may_reach_frame_max_itself() -> None:
    """RabbitMQ accepts payloads up to frame_max (not frame_max - 8): so does the proxy."""
    proto = Recorder()
    proto.frame_max = 4096
    proto.data_received(frame(BODY, 1, b"x" * 4096) + frame(BODY, 1, b"x" * 4097))
    assert proto.frames == [(BODY, 1, b"x" * 4096)]
    assert "{frame_too_large,4097,4088}" in proto.errors[0].text


class Keeper(Recorder):
    """Keeps a view of each frame past its handling, as an exception's traceback can."""

    def __init__(self) -> None:
        super().__init__()
        self.views: list[memoryview] = []

    def frame_received(self, frame_type: int, channel: int, payload: memoryview) -> None:
        super().frame_received(frame_type, channel, payload)
        self.views.append(payload)


def test_a_frame_view_kept_past_its_handling_does_not_stop_the_reading() -> None:
    data, expected = stream(6, 3)
    proto = Keeper()
    half = len(data) // 2
    proto.data_received(data[:half])
    proto.data_received(data[half:])
    assert proto.frames == expected
    assert not proto.errors

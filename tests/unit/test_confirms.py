"""The bookkeeping of the proxy's upstream confirms (confirms.py) and frame renumbering."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from pamqp import body as pbody
from pamqp import commands, frame
from pamqp import header as pheader

from amqproxy_mp.amqp.frames import frame as encode_frame
from amqproxy_mp.amqp.frames import renumbered
from amqproxy_mp.proxy.confirms import (
    ClientConfirms,
    Unconfirmed,
    UnconfirmedBuffer,
    UpstreamConfirms,
)


class Client:
    """What a client session is to confirms: what it is sent, and whether it is read."""

    def __init__(self) -> None:
        self.sent = b""
        self.holders: set[object] = set()

    def deliver(self, frame_type: int, channel: int, payload: memoryview) -> None:
        self.sent += encode_frame(frame_type, channel, payload)

    def hold_reading(self, holder: object) -> None:
        self.holders.add(holder)

    def release_reading(self, holder: object) -> None:
        self.holders.discard(holder)

    def answers(self) -> list[tuple[str, int, bool]]:
        """(Ack or Nack, delivery tag, multiple) of what it was sent, and forget it."""
        out = []
        data, self.sent = self.sent, b""
        while data:
            size, _channel, method = frame.unmarshal(data)
            data = data[size:]
            assert isinstance(method, commands.Basic.Ack | commands.Basic.Nack)
            out.append((type(method).__name__, method.delivery_tag, method.multiple))
        return out


def publish(number: int, body: bytes, routing_key: str = "rk") -> bytes:
    data = frame.marshal(commands.Basic.Publish(exchange="ex", routing_key=routing_key), number)
    data += frame.marshal(pheader.ContentHeader(0, len(body), commands.Basic.Properties()), number)
    return data + (frame.marshal(pbody.ContentBody(body), number) if body else b"")


def test_a_client_is_answered_under_its_own_numbers() -> None:
    client = Client()
    buffer = UnconfirmedBuffer(1 << 20)
    upstream = UpstreamConfirms(buffer)
    for _ in range(3):  # an earlier client's, which asked for no confirms
        upstream.add(Unconfirmed(publish(5, b"x"), None), None)
    mine = ClientConfirms(client, 7)
    for _ in range(4):
        upstream.add(Unconfirmed(publish(5, b"y"), mine), client)
    assert buffer.count == 7
    # the broker acks 1..5 at once: the earlier client's three and the first two of mine
    settled = upstream.settle(5, multiple=True)
    mine.answer([m.client_seq for m in settled if m.confirms is mine], True)
    assert client.answers() == [("Ack", 2, True)]
    # 7 before 6: 6 is still due, so no multiple ack may cover it
    mine.answer([m.client_seq for m in upstream.settle(7, multiple=False)], True)
    assert client.answers() == [("Ack", 4, False)]
    mine.answer([m.client_seq for m in upstream.settle(6, multiple=False)], False)
    assert client.answers() == [("Nack", 3, False)]
    assert buffer.count == 0 and buffer.size == 0 and not len(upstream)


def test_answers_for_a_client_that_left_are_dropped() -> None:
    client = Client()
    confirms = ClientConfirms(client, 1)
    message = Unconfirmed(publish(1, b"z"), confirms)
    confirms.client = None
    confirms.answer([message.client_seq], True)
    assert client.sent == b""


def test_the_buffer_holds_publishers_over_its_limit_until_half_is_confirmed() -> None:
    a, b = Client(), Client()
    buffer = UnconfirmedBuffer(1000)
    upstream = UpstreamConfirms(buffer)
    size = len(publish(1, b"." * 300))
    for client in (a, b, a, b):
        upstream.add(Unconfirmed(publish(1, b"." * 300), None), client)
    assert buffer.size == 4 * size > 1000
    assert a.holders == {buffer} and b.holders == {buffer}
    upstream.settle(2, multiple=True)  # still over half
    assert a.holders and b.holders
    upstream.settle(3, multiple=False)
    assert buffer.size == size <= 500
    assert not a.holders and not b.holders


def test_take_keeps_the_order_and_the_count_for_the_next_channel() -> None:
    buffer = UnconfirmedBuffer(1 << 20)
    old = UpstreamConfirms(buffer)
    messages = [Unconfirmed(publish(3, str(i).encode()), None) for i in range(5)]
    for message in messages:
        old.add(message, None)
    old.settle(2, multiple=False)
    taken = old.take()
    assert taken == [messages[0], *messages[2:]] and buffer.count == 4
    new = UpstreamConfirms(buffer)
    for message in taken:
        new.adopt(message)
    assert list(new.pending) == taken and new.first_seq == 1 and buffer.count == 4
    new.settle(4, multiple=True)
    assert buffer.count == 0 and buffer.size == 0


def test_destination_names_exchange_and_routing_key() -> None:
    message = Unconfirmed(publish(1, b"", routing_key="orders.créées"), None)
    assert message.destination() == "exchange 'ex', routing key 'orders.créées'"


@given(
    body=st.binary(max_size=20_000),
    frame_max=st.integers(min_value=4096, max_value=16384),
    number=st.integers(min_value=1, max_value=65535),
)
def test_renumbered_frames_carry_the_same_message(body: bytes, frame_max: int, number: int) -> None:
    original = publish(9, body)
    moved = renumbered(original, number, frame_max)
    frames = []
    data = moved
    while data:
        size, channel, value = frame.unmarshal(data)
        assert channel == number and size <= frame_max
        frames.append(value)
        data = data[size:]
    assert isinstance(frames[0], commands.Basic.Publish)
    assert isinstance(frames[1], pheader.ContentHeader) and frames[1].body_size == len(body)
    assert b"".join(f.value for f in frames[2:]) == body


@given(
    st.lists(
        st.tuples(st.integers(min_value=0, max_value=40), st.booleans()),
        max_size=30,
    )
)
def test_settle_answers_each_message_once_in_order(acks: list[tuple[int, bool]]) -> None:
    """Against the plain model: an ack answers its tag, a multiple one every tag up to it;
    each message once, in order, and the buffer counts what is left."""
    buffer = UnconfirmedBuffer(1 << 30)
    upstream = UpstreamConfirms(buffer)
    messages = {seq: Unconfirmed(publish(1, b"m"), None) for seq in range(1, 31)}
    for message in messages.values():
        upstream.add(message, None)
    left = dict(messages)
    for tag, multiple in acks:
        expected = [left.pop(seq) for seq in sorted(left) if seq == tag or (multiple and seq < tag)]
        assert upstream.settle(tag, multiple) == expected
        assert len(upstream) == len(left) == buffer.count
    upstream.add(Unconfirmed(publish(1, b"next"), None), None)  # (numbered 31 whatever came)
    assert upstream.settle(31, multiple=False) and len(upstream) == len(left)

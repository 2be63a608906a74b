"""The harness forgives exactly the differences docs/differences.md lists, and no more."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .compare import INTENDED, first_difference, normalise
from .runner import Observation
from .wire import Event

DIFFERENCES = Path(__file__).parents[2] / "docs" / "differences.md"

CAPABILITIES = {"publisher_confirms": True, "basic.nack": True}


def start(product: str, capabilities: dict[str, bool], mechanisms: str = "PLAIN AMQPLAIN") -> Event:
    properties = {"product": product, "capabilities": capabilities}
    return Event(
        "Connection.Start",
        {"server_properties": properties, "mechanisms": mechanisms, "locales": "en_US"},
    )


def differs(a: list[tuple[int, Event]], b: list[tuple[int, Event]]) -> bool:
    steps = [0] * 10
    one = normalise(Observation({0: [a]}, {}), "P")
    two = normalise(Observation({0: [b]}, {}), "P")
    return first_difference(one, two, steps) is not None


@pytest.mark.parametrize("title", INTENDED)
def test_every_forgiven_difference_is_listed_in_the_docs(title: str) -> None:
    text = re.sub(r"\s+", " ", DIFFERENCES.read_text())
    assert f"**{title}**" in text


def test_the_proxys_start_is_forgiven_its_server_properties_only() -> None:
    broker = start("RabbitMQ", CAPABILITIES)
    assert not differs([(0, broker)], [(0, start("amqproxy-mp", CAPABILITIES))])
    assert differs([(0, broker)], [(0, start("amqproxy-mp", {"basic.nack": True}))])
    assert differs([(0, broker)], [(0, start("RabbitMQ", CAPABILITIES, "PLAIN"))])


def test_reply_texts_are_forgiven_their_line_wrapping_only() -> None:
    def close(text: str) -> Event:
        return Event("Connection.Close", {"reply_code": 501, "reply_text": text})

    wrapped = close("FRAME_ERROR - {invalid_frame_end_marker,\n   0}")
    assert not differs([(0, wrapped)], [(0, close("FRAME_ERROR - {invalid_frame_end_marker,0}"))])
    assert differs([(0, wrapped)], [(0, close("FRAME_ERROR - {invalid_frame_end_marker,1}"))])


def test_after_a_clients_close_only_closes_are_compared() -> None:
    closing = Event("client sent Connection.Close")
    deliver = Event("Basic.Deliver", {"delivery_tag": 1}, body=b"m")
    close_ok = Event("Connection.CloseOk")
    channel_close = Event("Channel.Close", {"reply_code": 404, "reply_text": "NOT_FOUND"})
    assert not differs([(0, closing), (1, deliver), (0, close_ok)], [(0, closing), (0, close_ok)])
    # a delivery before the close, and a channel's error after it, still count
    assert differs([(1, deliver), (0, closing), (0, close_ok)], [(0, closing), (0, close_ok)])
    assert differs([(0, closing), (1, channel_close), (0, close_ok)], [(0, closing), (0, close_ok)])

"""Large messages, with a small frame_max on one side so body frames are split per hop."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import pika
import pytest

from tests.support.broker import BROKER_HOST, BROKER_PORT
from tests.support.pika_client import drain
from tests.support.targets import Target

MIB = 1024 * 1024


def payload(size: int) -> bytes:
    # not compressible, not periodic with any frame size
    seed = os.urandom(64)
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha512(seed + counter.to_bytes(8, "big")).digest()
        counter += 1
    return bytes(out[:size])


def connect(via: str, proxy: Target, frame_max: int) -> pika.BlockingConnection:
    if via == "proxy":
        return proxy.connect(frame_max=frame_max)
    return pika.BlockingConnection(
        pika.ConnectionParameters(BROKER_HOST, BROKER_PORT, frame_max=frame_max)
    )


@pytest.mark.parametrize(
    ("size", "pub_via", "pub_frame", "con_via", "con_frame"),
    [
        (10 * MIB, "proxy", 4096, "proxy", 131072),
        (10 * MIB, "proxy", 131072, "proxy", 4096),
        (MIB + 1, "proxy", 4096, "proxy", 4096),
        (MIB + 1, "proxy", 4096, "broker", 131072),
        (MIB + 1, "broker", 131072, "proxy", 4096),
    ],
    ids=[
        "10MiB-4k-to-128k",
        "10MiB-128k-to-4k",
        "1MiB+1-4k-to-4k",
        "1MiB+1-4k-to-direct",
        "1MiB+1-direct-to-4k",
    ],
)
def test_large_message_byte_exact(
    proxy: Target, names: Any, size: int, pub_via: str, pub_frame: int, con_via: str, con_frame: int
) -> None:
    q = names.queue("big")
    data = payload(size)
    pub = connect(pub_via, proxy, pub_frame)
    con = connect(con_via, proxy, con_frame)
    try:
        pch = pub.channel()
        pch.queue_declare(q)
        props = pika.BasicProperties(message_id=f"big-{size}", headers={"size": size})
        pch.basic_publish("", q, data, props)
        pch.basic_publish("", q, b"small-after", pika.BasicProperties(message_id="small"))
        got: list[tuple[Any, bytes]] = []
        cch = con.channel()
        cch.basic_consume(q, lambda _c, _m, p, b: got.append((p, b)), auto_ack=True)
        drain(con, lambda: len(got) == 2, timeout=60, what="the large and the small message")
        (p1, b1), (p2, b2) = got
        assert len(b1) == size
        assert hashlib.sha256(b1).hexdigest() == hashlib.sha256(data).hexdigest()
        assert (p1.message_id, p1.headers) == (f"big-{size}", {"size": size})
        assert (p2.message_id, b2) == ("small", b"small-after")
        # the publisher's connection is still healthy
        pch.queue_declare(q, passive=True)
    finally:
        pub.close()
        con.close()

"""What a client sends before it has authenticated costs the proxy a few KiB at most, and its
login is read as RabbitMQ reads it."""

from __future__ import annotations

import struct
from typing import Any

import pika
import pytest
from pamqp import commands, encode

from tests.support.broker import Names, RabbitAdmin
from tests.support.memory import RssSampler
from tests.support.proxy import ProxyProcess
from tests.support.raw_client import AMQP_HEADER, RawClient, RawClosed
from tests.support.targets import DirectTarget, ProxyFactory, Target

pytestmark = pytest.mark.usefixtures("require_proxy")

#: One value of every field type, the integers claiming 512 MiB.
VALUES = {
    b"t": b"\x01", b"b": b"\x01", b"B": b"\x01", b"s": b"\x00\x01", b"u": b"\x00\x01",
    b"I": struct.pack(">I", 2**29), b"i": struct.pack(">I", 2**29),
    b"l": struct.pack(">q", 2**29), b"L": struct.pack(">q", 2**29),
    b"f": struct.pack(">f", 1.0), b"d": struct.pack(">d", 1.0),
    b"D": b"\x00" + struct.pack(">I", 2**29),
    b"T": struct.pack(">Q", 2**29), b"V": b"", b"F": struct.pack(">I", 0),
    b"A": struct.pack(">I", 0), b"S": struct.pack(">I", 5) + b"guest",
    b"x": struct.pack(">I", 5) + b"guest",
}  # fmt: skip
CAPABLE = {"capabilities": {"authentication_failure_close": True}}


def entry(key: bytes, tag: bytes, value: bytes) -> bytes:
    return bytes([len(key)]) + key + tag + value


def amqplain(login: tuple[bytes, bytes], password: tuple[bytes, bytes]) -> bytes:
    return entry(b"LOGIN", *login) + entry(b"PASSWORD", *password)


def start_ok(mechanism: str, response: bytes) -> bytes:
    """Connection.StartOk with exactly these response bytes (pamqp would re-encode them)."""
    payload = (
        struct.pack(">HH", 10, 11)
        + encode.field_table(CAPABLE)
        + bytes([len(mechanism)]) + mechanism.encode()
        + struct.pack(">I", len(response)) + response
        + b"\x05en_US"
    )  # fmt: skip
    return struct.pack(">BHI", 1, 0, len(payload)) + payload + b"\xce"


def answer_to_start_ok(target: Target, mechanism: str, response: bytes) -> Any:
    """The proxy's answer to this StartOk: "Tune", (403, text), or "dropped"."""
    c = RawClient(target.host, target.port)
    try:
        c.send_raw(AMQP_HEADER)
        c.read_method()
        c.send_raw(start_ok(mechanism, response))
        _, method = c.read_method()
    except (RawClosed, OSError):
        return "dropped"
    finally:
        c.close()
    if isinstance(method, commands.Connection.Close):
        return method.reply_code, method.reply_text
    return type(method).__name__


def test_every_field_type_in_every_amqplain_position(
    proxy_factory: ProxyFactory, names: Names
) -> None:
    """Long strings and binaries are a login, as RabbitMQ reads them; anything else is
    refused like a wrong password, without allocating what an integer claims."""
    p = proxy_factory(direct_ok=False)
    assert isinstance(p, ProxyProcess)
    guest = (b"S", VALUES[b"S"])
    refused = (
        403,
        "ACCESS_REFUSED - Login was refused using authentication mechanism AMQPLAIN. "
        "For details see the broker logfile.",
    )
    pika.BlockingConnection(p.params()).close()  # the worker is warm
    with RssSampler(p, interval=0.05) as rss:
        for _ in range(3):
            for tag, value in VALUES.items():
                for response in (amqplain((tag, value), guest), amqplain(guest, (tag, value))):
                    got = answer_to_start_ok(p, "AMQPLAIN", response)
                    assert got == ("Tune" if tag in (b"S", b"x") else refused), (tag, got)
    assert rss.growth < 8 * 2**20, f"worker RSS grew by {rss.growth / 2**20:.1f} MiB"


@pytest.mark.parametrize(
    ("mechanism", "response"),
    [
        ("PLAIN", b"no separators"),
        ("PLAIN", b"\0too\0many\0parts"),
        ("EXTERNAL", b""),
        ("AMQPLAIN", b"\x05LOG"),
        ("AMQPLAIN", entry(b"LOGIN", b"S", VALUES[b"S"])),
        ("PLAIN", b"\0gu\xffest\0guest"),  # not UTF-8: a user that does not exist
    ],
)
def test_an_unusable_login_is_answered_as_rabbitmq_answers_it(
    proxy_factory: ProxyFactory, mechanism: str, response: bytes
) -> None:
    p = proxy_factory(direct_ok=False)
    direct = answer_to_start_ok(DirectTarget(), mechanism, response)
    assert answer_to_start_ok(p, mechanism, response) == direct


def test_credentials_beyond_ascii(proxy_factory: ProxyFactory) -> None:
    admin = RabbitAdmin()
    user, password = admin.add_user(password="pässwörd-ü")
    admin.grant(user, "/")
    try:
        p = proxy_factory(direct_ok=False)
        for target in (DirectTarget(), p):
            conn = pika.BlockingConnection(target.params(user, password))
            conn.channel().queue_declare("", exclusive=True)
            conn.close()
    finally:
        admin.cleanup()

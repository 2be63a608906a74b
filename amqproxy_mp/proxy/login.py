"""Who an upstream connection logs in as, and how the broker is reached.

Every upstream connection logs in with a client's own credentials and mechanism, so the
broker decides every login; the proxy announces itself in the client properties.
"""

from __future__ import annotations

import platform
import struct
from dataclasses import dataclass
from typing import Final

from pamqp import encode
from pamqp.common import FieldTable

from amqproxy_mp import __version__
from amqproxy_mp.amqp import spec
from amqproxy_mp.amqp.frames import METHOD, frame

CLIENT_PROPERTIES: Final[FieldTable] = {
    "product": "amqproxy-mp",
    "version": __version__,
    "platform": f"Python {platform.python_version()}",
    "connection_name": "amqproxy-mp",
    "capabilities": {
        "authentication_failure_close": True,
        "basic.nack": True,
        "connection.blocked": True,
        "consumer_cancel_notify": True,
        "exchange_exchange_bindings": True,
        "publisher_confirms": True,
    },
}

CLIENT_PROPERTIES_TABLE: Final = encode.field_table(CLIENT_PROPERTIES)


class UpstreamError(Exception):
    """The broker refused or lost a connection; code/text are what the client is told."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text


@dataclass(frozen=True)
class UpstreamSettings:
    """What every upstream connection gets, whichever node it goes to (nodes.py)."""

    #: Seconds a client waits for an upstream connection, over every node tried.
    connect_timeout: float
    heartbeat: int


@dataclass(frozen=True)
class Login:
    """Who an upstream connection logs in as: the client's own credentials and mechanism."""

    user: str
    password: str
    mechanism: str = "PLAIN"

    def response(self) -> bytes:
        if self.mechanism == "AMQPLAIN":
            return b"".join(
                bytes([len(key)]) + key + b"S" + struct.pack(">I", len(value)) + value
                for key, value in (
                    (b"LOGIN", self.user.encode("utf-8", "surrogateescape")),
                    (b"PASSWORD", self.password.encode("utf-8", "surrogateescape")),
                )
            )
        return f"\0{self.user}\0{self.password}".encode("utf-8", "surrogateescape")

    def start_ok(self) -> bytes:
        """Connection.StartOk with the response's exact bytes (pamqp would re-encode them)."""
        mechanism = self.mechanism.encode()
        response = self.response()
        payload = b"".join(
            (
                struct.pack(">I", spec.CONNECTION_START_OK),
                CLIENT_PROPERTIES_TABLE,
                bytes([len(mechanism)]), mechanism,
                struct.pack(">I", len(response)), response,
                b"\x05en_US",
            )
        )  # fmt: skip
        return frame(METHOD, 0, payload)

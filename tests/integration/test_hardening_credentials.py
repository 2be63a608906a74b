"""Issue 4 / docs/security.md: what the broker's credential checks mean behind a pool.

The broker checks a password when a connection is opened. A client of the proxy is admitted
on a pooled upstream connection that was opened with exactly its (user, password, vhost), so
the broker is asked again only when the pool opens a new one: a password changed on the broker
keeps working through the proxy until the pooled connection reaches upstream_max_lifetime.
A deleted user is different: RabbitMQ closes its connections at once, and the proxy passes the
close on.
"""

from __future__ import annotations

import time
import uuid

import pika
import pika.exceptions
import pytest

from tests.support.broker import RabbitAdmin, rabbitmqctl
from tests.support.pika_client import close_reason
from tests.support.targets import ProxyFactory, Target

ACCESS_REFUSED_PLAIN = (
    "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN. "
    "For details see the broker logfile."
)


def refused(target: Target, user: str, password: str) -> tuple[int, str]:
    with pytest.raises(pika.exceptions.AMQPConnectionError) as info:
        target.connect(user, password).close()
    return close_reason(info.value)


def works(target: Target, user: str, password: str) -> None:
    conn = target.connect(user, password)
    conn.channel().queue_declare("", exclusive=True)
    conn.close()


def test_a_changed_password_is_trusted_until_the_pooled_connection_retires(
    proxy_factory: ProxyFactory, admin: RabbitAdmin
) -> None:
    p = proxy_factory("--upstream-max-lifetime", "3", "-t", "60", direct_ok=False)
    user, old = admin.add_user(prefix="pw")
    admin.grant(user, "/")
    first = p.connect(user, old)  # the pool's upstream connection opens with the old password
    first.channel()
    new = uuid.uuid4().hex
    rabbitmqctl("change_password", user, new)
    works(p, user, old)  # served by the pooled connection: the broker is not asked
    works(p, user, new)  # a pool of its own, checked by the broker
    p.wait_log(r"reached its max lifetime \(3 s\): retiring it", timeout=6)
    # the next client with the old password needs a new upstream connection: refused now
    assert refused(p, user, old) == (403, ACCESS_REFUSED_PLAIN)
    works(p, user, new)
    assert first.is_open  # what is connected stays connected
    first.close()


def test_a_deleted_user_is_disconnected_at_once(
    proxy_factory: ProxyFactory, admin: RabbitAdmin
) -> None:
    p = proxy_factory("-t", "60")
    user, password = admin.add_user(prefix="del")
    admin.grant(user, "/")
    conns = [p.connect(user, password) for _ in range(2)]
    for conn in conns:
        conn.channel()
    rabbitmqctl("delete_user", user)
    for conn in conns:
        deadline = time.monotonic() + 10
        with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as info:
            while time.monotonic() < deadline:
                conn.process_data_events(time_limit=0.05)
        assert (info.value.reply_code, info.value.reply_text) == (
            320,
            f"CONNECTION_FORCED - user '{user}' is deleted",
        )
    assert refused(p, user, password) == (403, ACCESS_REFUSED_PLAIN)

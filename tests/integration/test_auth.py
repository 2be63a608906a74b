"""Credentials are checked at connect time, by the broker, and refusals reach the client
with the broker's own code and text (never Connection.OpenOk)."""

from __future__ import annotations

import re
import uuid

import pika
import pika.exceptions
import pytest
from pamqp import commands

from tests.support.broker import Aux
from tests.support.pika_client import close_reason
from tests.support.raw_client import RawClient
from tests.support.targets import ProxyFactory, Target

ACCESS_REFUSED_PLAIN = (
    "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN. "
    "For details see the broker logfile."
)
ACCESS_REFUSED_RX = re.compile(
    r"ACCESS_REFUSED - Login was refused using authentication mechanism (PLAIN|AMQPLAIN)\. "
    r"For details see the broker logfile\."
)


def refused(target: Target, user: str, password: str, vhost: str) -> tuple[int, str]:
    with pytest.raises(pika.exceptions.AMQPConnectionError) as info:
        conn = target.connect(user, password, vhost)
        conn.close()  # not reached when refused
    return close_reason(info.value)


def test_wrong_password_403(proxy: Target) -> None:
    # a guest connection is open (pooled) while another client tries a wrong password
    keep = proxy.connect()
    keep.channel().queue_declare("", exclusive=True)
    try:
        assert refused(proxy, "guest", "wrong-" + uuid.uuid4().hex, "/") == (
            403,
            ACCESS_REFUSED_PLAIN,
        )
        assert keep.is_open
    finally:
        keep.close()


def test_unknown_user_403(proxy: Target) -> None:
    assert refused(proxy, "nobody-" + uuid.uuid4().hex[:8], "x", "/") == (
        403,
        ACCESS_REFUSED_PLAIN,
    )


def test_unknown_vhost_530(proxy: Target) -> None:
    vhost = "itest-missing-" + uuid.uuid4().hex[:8]
    assert refused(proxy, "guest", "guest", vhost) == (
        530,
        f"NOT_ALLOWED - vhost {vhost} not found",
    )


def test_user_without_permission_530_even_when_vhost_is_pooled(proxy: Target, aux: Aux) -> None:
    expected = (530, f"NOT_ALLOWED - access to vhost '{aux.vhost}' refused for user '{aux.noperm}'")
    assert refused(proxy, aux.noperm, aux.noperm_password, aux.vhost) == expected
    # guest (who has permissions there) now holds a pooled upstream connection on that vhost
    guest = proxy.connect("guest", "guest", aux.vhost)
    ch = guest.channel()
    ch.queue_declare("", exclusive=True)
    try:
        assert refused(proxy, aux.noperm, aux.noperm_password, aux.vhost) == expected
        # ... and the same user with a wrong password too
        code, text = refused(proxy, aux.noperm, "wrong", aux.vhost)
        assert (code, text) == (403, ACCESS_REFUSED_PLAIN)
        # the refusals did not disturb guest's connection on the shared upstream
        ok = ch.queue_declare("", exclusive=True)
        assert ok.method.queue.startswith("amq.gen-")
        # the permitted user still gets in
        other = proxy.connect(aux.user, aux.password, aux.vhost)
        other.channel().queue_declare("", exclusive=True)
        other.close()
    finally:
        guest.close()


@pytest.mark.parametrize("mechanism", ["PLAIN", "AMQPLAIN"])
def test_raw_refusals_are_connection_close_never_open_ok(
    proxy: Target, aux: Aux, mechanism: str
) -> None:
    cases = [
        ("guest", "bad-password", "/", 403, None),
        (
            "guest",
            "guest",
            "itest-nope-" + uuid.uuid4().hex[:6],
            530,
            "NOT_ALLOWED - vhost {v} not found",
        ),
        (
            aux.noperm,
            aux.noperm_password,
            aux.vhost,
            530,
            "NOT_ALLOWED - access to vhost '{v}' refused for user '{u}'",
        ),
    ]
    for user, password, vhost, code, text in cases:
        with RawClient(proxy.host, proxy.port) as c:
            res = c.handshake(user, password, vhost, mechanism=mechanism)
            assert "open_ok" not in res, f"{user}@{vhost}: got Connection.OpenOk"
            close = res["close"]
            assert isinstance(close, commands.Connection.Close)
            assert close.reply_code == code, (user, vhost, close.reply_code, close.reply_text)
            if text is None:
                assert ACCESS_REFUSED_RX.fullmatch(close.reply_text), close.reply_text
            else:
                assert close.reply_text == text.format(v=vhost, u=user)
            # the client acknowledges; the server side ends the connection
            c.send(commands.Connection.CloseOk())
            assert c.read_until_closed() == b""


def test_auth_failure_log_names_user_and_vhost_not_password(
    proxy_factory: ProxyFactory, aux: Aux
) -> None:
    """A wrong password is refused in answer to StartOk, as the broker does, before the
    client names its vhost: that line names the user; a refused vhost's names both."""
    p = proxy_factory(direct_ok=False)
    bad_password = "pw-" + uuid.uuid4().hex
    assert refused(p, aux.user, bad_password, aux.vhost)[0] == 403
    m = p.wait_log(rf"^.*authentication failed.*{re.escape(aux.user)}.*$", flags=re.M)
    assert "ACCESS_REFUSED" in m.group(0)
    # a successful login of the same user: its password must not be logged either
    conn = p.connect(aux.user, aux.password, aux.vhost)
    conn.channel().queue_declare("", exclusive=True)
    conn.close()
    missing_vhost = "itest-nolog-" + uuid.uuid4().hex[:6]
    assert refused(p, aux.user, aux.password, missing_vhost)[0] == 530
    line = p.wait_log(rf"^.*{re.escape(missing_vhost)}.*$", flags=re.M).group(0)
    assert aux.user in line, line
    log = p.log_text()
    assert bad_password not in log
    assert aux.password not in log

"""Fixtures for the integration suite (real RabbitMQ on 127.0.0.1:5672, real clients).

Direct mode (``--direct`` or ``AMQPROXY_TEST_DIRECT=1``) points every "proxy" at RabbitMQ
itself: it proves the tests' expectations against the real broker. Tests that are about the
proxy alone skip in that mode.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pika
import pika.exceptions
import pytest

from tests.support.broker import BROKER_HOST, BROKER_PORT, Aux, Names, RabbitAdmin
from tests.support.proxy import ProxyProcess
from tests.support.raw_client import amqp_answers
from tests.support.targets import DirectTarget, ProxyFactory, Target
from tests.support.util import wait_for

# pika logs every broker Channel.Close at WARNING; the tests provoke many on purpose
logging.getLogger("pika").setLevel(logging.ERROR)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--direct",
        action="store_true",
        default=False,
        help="run the integration tests straight against RabbitMQ (no proxy); "
        "same as AMQPROXY_TEST_DIRECT=1",
    )


def _direct(config: pytest.Config) -> bool:
    return bool(config.getoption("--direct")) or os.environ.get("AMQPROXY_TEST_DIRECT", "") in {
        "1",
        "true",
        "yes",
    }


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


def _failed(request: pytest.FixtureRequest) -> bool:
    node = request.node
    return any(
        getattr(getattr(node, f"rep_{when}", None), "failed", False) for when in ("setup", "call")
    )


def _tail(text: str, lines: int = 150) -> str:
    return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------- broker


@pytest.fixture(scope="session")
def direct_mode(pytestconfig: pytest.Config) -> bool:
    return _direct(pytestconfig)


@pytest.fixture(scope="session", autouse=True)
def rabbitmq() -> None:
    """RabbitMQ must answer on 127.0.0.1:5672; fail loudly (not skip) otherwise."""
    if not amqp_answers(BROKER_HOST, BROKER_PORT):
        pytest.fail(
            f"RabbitMQ does not answer AMQP on {BROKER_HOST}:{BROKER_PORT}. Start it "
            "(`rabbitmq-server -detached`) or run scripts/test, which installs and starts it.",
            pytrace=False,
        )
    try:
        pika.BlockingConnection(pika.ConnectionParameters(BROKER_HOST, BROKER_PORT)).close()
    except pika.exceptions.AMQPError as exc:
        pytest.fail(f"cannot log in to RabbitMQ as guest/guest on vhost /: {exc!r}", pytrace=False)


@pytest.fixture
def broker() -> Iterator[pika.BlockingConnection]:
    """A pika connection straight to RabbitMQ, for setting up and checking (the oracle)."""
    conn = pika.BlockingConnection(pika.ConnectionParameters(BROKER_HOST, BROKER_PORT))
    yield conn
    with contextlib.suppress(Exception):
        conn.close()


@pytest.fixture
def names() -> Iterator[Names]:
    n = Names()
    yield n
    n.cleanup()


@pytest.fixture
def admin() -> Iterator[RabbitAdmin]:
    """Per-test vhosts/users (rabbitmqctl is slow: prefer ``aux`` where it fits)."""
    a = RabbitAdmin()
    yield a
    a.cleanup()


@pytest.fixture(scope="session")
def aux() -> Iterator[Aux]:
    admin = RabbitAdmin()
    a = Aux()
    try:
        a.vhost = admin.add_vhost("vh")
        admin.grant("guest", a.vhost)
        a.user, a.password = admin.add_user(prefix="u")
        admin.grant(a.user, "/")
        admin.grant(a.user, a.vhost)
        a.noperm, a.noperm_password = admin.add_user(prefix="np")
        admin.grant(a.noperm, "/")
        yield a
    finally:
        admin.cleanup()


# --------------------------------------------------------------------------- proxies


@pytest.fixture
def proxy_factory(
    request: pytest.FixtureRequest, tmp_path: Path, direct_mode: bool
) -> Iterator[ProxyFactory]:
    """``proxy_factory(*options, upstream=None, upstream_port=5672, env=None, direct_ok=True)``
    starts a dedicated proxy with the given CLI options (stopped at teardown). In direct mode
    it returns a DirectTarget when ``direct_ok`` and skips the test otherwise."""
    started: list[ProxyProcess] = []

    def factory(
        *options: str,
        upstream: str | None = None,
        upstream_port: int = BROKER_PORT,
        env: dict[str, str] | None = None,
        direct_ok: bool = True,
    ) -> Target:
        if direct_mode:
            if not direct_ok:
                pytest.skip("about the proxy itself: not run in direct mode")
            return DirectTarget()
        p = ProxyProcess(
            tmp_path / f"proxy-{len(started)}.log",
            options,
            upstream=upstream,
            upstream_port=upstream_port,
            env=env,
        )
        started.append(p)
        p.start()
        return p

    yield factory
    for p in started:
        p.close_clients()
        p.stop()
    if _failed(request):
        for p in started:
            print(f"\n===== proxy log {p.log_path} (rc={p.proc and p.proc.returncode}) =====")
            print(_tail(p.log_text()))


@pytest.fixture(scope="session")
def _session_proxy(tmp_path_factory: pytest.TempPathFactory, direct_mode: bool) -> Iterator[Target]:
    if direct_mode:
        yield DirectTarget()
        return
    p = ProxyProcess(tmp_path_factory.mktemp("proxy") / "session-proxy.log")
    p.start()
    yield p
    p.stop()


@pytest.fixture
def proxy(request: pytest.FixtureRequest, _session_proxy: Target) -> Iterator[Target]:
    """The shared default proxy (default options). Its new log lines are printed when the
    test fails."""
    p = _session_proxy
    if isinstance(p, ProxyProcess) and not p.running:
        pytest.fail(
            f"the shared proxy has exited (rc={p.proc and p.proc.poll()}):\n{_tail(p.log_text())}"
        )
    offset = len(p.log_text())
    yield p
    p.close_clients()
    if _failed(request) and isinstance(p, ProxyProcess):
        print(f"\n===== shared proxy log since test start ({p.log_path}) =====")
        print(_tail(p.log_text()[offset:]))


@pytest.fixture
def require_proxy(direct_mode: bool) -> None:
    if direct_mode:
        pytest.skip("about the proxy itself: not run in direct mode")


@pytest.fixture
def restore_watermark() -> Iterator[Callable[[], None]]:
    """Always puts vm_memory_high_watermark back, whatever the test did."""
    from tests.support.broker import memory_high_watermark, rabbitmqctl

    original = memory_high_watermark()

    def restore() -> None:
        rabbitmqctl("set_vm_memory_high_watermark", *original)

    try:
        yield restore
    finally:
        restore()

        # wait until publishing is possible again (the alarm clears asynchronously)
        def alarm_clear() -> bool:
            out = rabbitmqctl("-q", "eval", "rabbit_alarm:get_alarms().", check=False)
            return "memory" not in out

        wait_for(alarm_clear, 30, interval=0.3, what="memory alarm to clear")

"""Upstream TLS (amqps://). RabbitMQ here has no TLS listener, so the test runs its own
TLS-terminating relay on loopback (certificates made with the openssl CLI) that forwards the
plain bytes to RabbitMQ on 127.0.0.1:5672."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika.exceptions
import pytest
from pamqp import commands

from tests.support.broker import BROKER_HOST, BROKER_PORT, Names
from tests.support.hosts import name_in_hosts
from tests.support.pika_client import get_all
from tests.support.proxy import ProxyProcess
from tests.support.raw_client import RawClient
from tests.support.targets import ProxyFactory, Target

pytestmark = pytest.mark.usefixtures("require_proxy")


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if shutil.which("openssl") is None:
        pytest.fail("the openssl CLI is needed to make test certificates (apt-get install openssl)")
    return make_certs(tmp_path_factory.mktemp("tls"))


def make_certs(d: Path) -> dict[str, Path]:
    """A CA, a server certificate for localhost/127.0.0.1/::1 and a client certificate."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl(
        "req",
        "-x509",
        *ec,
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=amqproxy-mp itest CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        "-addext",
        "subjectKeyIdentifier=hash",
        cwd=d,
    )
    (d / "server.ext").write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid,issuer\n"
    )
    (d / "client.ext").write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=clientAuth\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid,issuer\n"
    )
    for name, cn in (("server", "localhost"), ("client", "amqproxy-mp itest client")):
        openssl(
            "req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=d
        )
        openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-extfile",
            f"{name}.ext",
            cwd=d,
        )
    return {n: d / n for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


def server_cert(d: Path, name: str) -> dict[str, Path]:
    """Another server certificate from the CA of `make_certs` (in `d`), for `name` only."""
    stem = name.split(".")[0]
    (d / f"{stem}.ext").write_text(
        f"subjectAltName=DNS:{name}\nextendedKeyUsage=serverAuth\n"
        "authorityKeyIdentifier=keyid,issuer\n"
    )
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", *ec, "-keyout", f"{stem}.key", "-out", f"{stem}.csr", "-subj", f"/CN={name}",
            cwd=d)  # fmt: skip
    openssl("x509", "-req", "-in", f"{stem}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{stem}.pem", "-days", "2", "-extfile", f"{stem}.ext",
            cwd=d)  # fmt: skip
    return {"server.pem": d / f"{stem}.pem", "server.key": d / f"{stem}.key"}


class TlsRelay:
    """TLS server on 127.0.0.1 (and ::1 on the same port when possible) that pipes bytes to
    RabbitMQ. Runs its own event loop in a thread."""

    def __init__(self, certs: dict[str, Path], require_client_cert: bool = False) -> None:
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.load_cert_chain(certs["server.pem"], certs["server.key"])
        if require_client_cert:
            self.ctx.verify_mode = ssl.CERT_REQUIRED
            self.ctx.load_verify_locations(certs["ca.pem"])
        self.accepted = 0  # TLS handshakes completed
        self.writers: set[asyncio.StreamWriter] = set()
        self.loop = asyncio.new_event_loop()
        self.servers: list[asyncio.base_events.Server] = []
        self.port = 0
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            up_r, up_w = await asyncio.open_connection(BROKER_HOST, BROKER_PORT)
        except OSError:
            writer.close()
            return
        self.writers.update((writer, up_w))

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except (OSError, ssl.SSLError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    w.close()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))

    async def _start(self) -> None:
        srv = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.ctx)
        self.servers.append(srv)
        self.port = srv.sockets[0].getsockname()[1]
        with contextlib.suppress(OSError):
            self.servers.append(
                await asyncio.start_server(self._handle, "::1", self.port, ssl=self.ctx)
            )

    def start(self) -> TlsRelay:
        self.loop.set_exception_handler(lambda _loop, _ctx: None)  # quiet on rejected peers
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def stop(self) -> None:
        if not self.thread.is_alive():
            return  # (stopped already)

        async def close() -> None:
            for s in self.servers:
                s.close()
            for w in self.writers:  # the peers see the connections end
                w.close()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def relay(certs: dict[str, Path]) -> Iterator[TlsRelay]:
    r = TlsRelay(certs).start()
    yield r
    r.stop()


@pytest.fixture
def mtls_relay(certs: dict[str, Path]) -> Iterator[TlsRelay]:
    r = TlsRelay(certs, require_client_cert=True).start()
    yield r
    r.stop()


def tls_proxy(proxy_factory: Any, relay: TlsRelay, *options: str) -> Target:
    return proxy_factory(
        *options,
        upstream=f"amqps://localhost:{relay.port}",
        upstream_port=relay.port,
        direct_ok=False,
    )


def works(p: Target, names: Any) -> None:
    q = names.queue("tls")
    conn = p.connect()
    ch = conn.channel()
    ch.queue_declare(q)
    body = b"over tls \x00\xff" * 1000
    ch.basic_publish("", q, body)
    deadline = time.monotonic() + 5
    got: list[Any] = []
    while not got and time.monotonic() < deadline:
        got = get_all(ch, q)
    assert [b for _, _, b in got] == [body]
    conn.close()


def refused_with_close(p: Target) -> commands.Connection.Close:
    """The client gets a Connection.Close (not OpenOk, not a hang) when the upstream TLS
    connection cannot be made."""
    start = time.monotonic()
    with RawClient(p.host, p.port, timeout=15) as c:
        res = c.handshake()
    assert "open_ok" not in res
    close = res["close"]
    assert isinstance(close, commands.Connection.Close)
    assert close.reply_code >= 300, close
    assert time.monotonic() - start < 15
    # pika sees an error at connect time too, not a hang
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        p.connect().close()
    return close


def test_tls_with_ca_file(
    relay: TlsRelay, proxy_factory: ProxyFactory, certs: dict[str, Path], names: Names
) -> None:
    p = tls_proxy(proxy_factory, relay, "--upstream-tls-ca-file", str(certs["ca.pem"]))
    works(p, names)
    assert relay.accepted >= 1


def test_tls_without_ca_fails_verification(proxy_factory: ProxyFactory, relay: TlsRelay) -> None:
    p = tls_proxy(proxy_factory, relay)
    refused_with_close(p)
    p.wait_log(r"certificate verif(y|ication) failed")


def test_tls_insecure_skip_verify(
    relay: TlsRelay, proxy_factory: ProxyFactory, names: Names
) -> None:
    p = tls_proxy(proxy_factory, relay, "--upstream-tls-insecure-skip-verify")
    works(p, names)
    assert relay.accepted >= 1


def test_tls_client_certificate(
    mtls_relay: TlsRelay, proxy_factory: ProxyFactory, certs: dict[str, Path], names: Names
) -> None:
    p = tls_proxy(
        proxy_factory,
        mtls_relay,
        "--upstream-tls-ca-file",
        str(certs["ca.pem"]),
        "--upstream-tls-cert-file",
        str(certs["client.pem"]),
        "--upstream-tls-key-file",
        str(certs["client.key"]),
    )
    works(p, names)


def test_tls_client_certificate_missing(
    mtls_relay: TlsRelay, proxy_factory: ProxyFactory, certs: dict[str, Path]
) -> None:
    p = tls_proxy(proxy_factory, mtls_relay, "--upstream-tls-ca-file", str(certs["ca.pem"]))
    refused_with_close(p)


def test_each_node_is_verified_against_its_own_name(
    proxy_factory: ProxyFactory, certs: dict[str, Path], names: Names
) -> None:
    """Two nodes, each with a certificate for its own name only (both names are 127.0.0.1):
    the proxy checks each node against the name in its URL, so both verify, and when the
    first goes, clients are served by the second."""
    ca = certs["ca.pem"]
    a, b = "node-a.amqproxy-test.internal", "node-b.amqproxy-test.internal"
    relay_a = TlsRelay({**certs, **server_cert(ca.parent, a)}).start()
    relay_b = TlsRelay({**certs, **server_cert(ca.parent, b)}).start()
    try:
        with name_in_hosts(f"{a} {b}", ["127.0.0.1"]):
            p = proxy_factory(
                "--upstream-tls-ca-file", str(ca), "--upstream-policy", "ordered",
                upstream=f"amqps://{a}:{relay_a.port},amqps://{b}:{relay_b.port}",
                direct_ok=False,
            )  # fmt: skip
            assert isinstance(p, ProxyProcess)
            works(p, names)
            assert relay_a.accepted >= 1 and relay_b.accepted == 0
            relay_a.stop()
            p.wait_log(rf"upstream node amqps://{a}:{relay_a.port} is down")
            works(p, names)
            assert relay_b.accepted >= 1
            assert "certificate verif" not in p.log_text()
    finally:
        relay_a.stop()
        relay_b.stop()

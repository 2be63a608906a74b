"""The AMQPS listener (--tls-port, --tls-cert-file, --tls-key-file, optional
--tls-client-ca-file for mutual TLS), beside the plain listener or instead of it (--port 0).
Real pika clients over TLS; the CA and certificates are made by the test with the openssl CLI.
(Upstream TLS, amqps:// towards the broker, is test_tls.py.)"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pika
import pika.exceptions
import pytest

from tests.support.broker import Names
from tests.support.pika_client import get_all
from tests.support.proxy import ProxyProcess
from tests.support.util import free_port, wait_for

pytestmark = pytest.mark.usefixtures("require_proxy")


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(d: Path, name: str) -> None:
    openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
        "-subj", f"/CN=amqproxy-mp itest {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )  # fmt: skip


def make_cert(d: Path, name: str, ca: str, cn: str, usage: str, san: str = "") -> None:
    (d / f"{name}.ext").write_text(
        (f"subjectAltName={san}\n" if san else "")
        + "basicConstraints=critical,CA:FALSE\n"
        + "keyUsage=critical,digitalSignature,keyEncipherment\n"
        + f"extendedKeyUsage={usage}\n"
    )
    openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}",
        cwd=d,
    )  # fmt: skip
    openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
        cwd=d,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None:
        pytest.fail("the openssl CLI is needed to make test certificates (apt-get install openssl)")
    d = tmp_path_factory.mktemp("listener-tls")
    make_ca(d, "ca")
    make_ca(d, "other-ca")
    make_cert(d, "server", "ca", "localhost", "serverAuth", "DNS:localhost,IP:127.0.0.1")
    make_cert(d, "client", "ca", "itest client", "clientAuth")
    make_cert(d, "stranger", "other-ca", "itest stranger", "clientAuth")
    return d


class TlsProxyProcess(ProxyProcess):
    tls_port: int
    plain_port: int


TlsProxy = Callable[..., TlsProxyProcess]


@pytest.fixture
def tls_proxy(tmp_path: Path, pki: Path, request: pytest.FixtureRequest) -> Iterator[TlsProxy]:
    """``tls_proxy(*options, plain=True)``: a proxy with an AMQPS listener on ``p.tls_port``
    (and no plain one unless ``plain``)."""
    started: list[ProxyProcess] = []

    def start(*options: str, plain: bool = True) -> TlsProxyProcess:
        tls_port = free_port()
        args = [
            "--tls-port", str(tls_port),
            "--tls-cert-file", str(pki / "server.pem"),
            "--tls-key-file", str(pki / "server.key"),
            *options,
        ]  # fmt: skip
        if not plain:
            args += ["--port", "0"]
        p = TlsProxyProcess(tmp_path / f"tls-proxy-{len(started)}.log", args)
        p.tls_port, p.plain_port = tls_port, p.port
        if not plain:
            p.port = tls_port  # start() waits until this port accepts
        started.append(p)
        p.start()
        return p

    yield start
    for p in started:
        p.close_clients()
        p.stop()
        if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
            print(f"\n===== {p.log_path} =====\n{p.log_text()[-5000:]}")


def client_context(pki: Path, cert: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    if cert:
        ctx.load_cert_chain(str(pki / f"{cert}.pem"), str(pki / f"{cert}.key"))
    return ctx


def tls_connect(p: TlsProxyProcess, ctx: ssl.SSLContext) -> pika.BlockingConnection:
    params = pika.ConnectionParameters(
        "127.0.0.1",
        p.tls_port,
        credentials=pika.PlainCredentials("guest", "guest"),
        ssl_options=pika.SSLOptions(ctx, "localhost"),
        connection_attempts=1,
        socket_timeout=10,
    )
    conn = pika.BlockingConnection(params)
    p.__dict__.setdefault("_clients", []).append(conn)
    return conn


def roundtrip(conn: pika.BlockingConnection, q: str, body: bytes) -> None:
    ch = conn.channel()
    ch.queue_declare(q)
    ch.basic_publish("", q, body)
    got: list[bytes] = []
    wait_for(
        lambda: got.extend(m for _, _, m in get_all(ch, q)) or got == [body],
        5,
        what="the message back",
    )


def test_tls_listener_beside_the_plain_one(tls_proxy: TlsProxy, pki: Path, names: Names) -> None:
    p = tls_proxy()
    q = names.queue("tls-listener")
    over_tls = tls_connect(p, client_context(pki))
    roundtrip(over_tls, q, b"over TLS \x00\xff" * 5000)
    plain = p.connect()  # the plain listener is still there
    roundtrip(plain, q, b"plain")
    # both kinds of clients share the pool's upstream connection
    assert len(p.upstream_local_ports()) == 1
    p.wait_log(rf"listening on .*\('127\.0\.0\.1', {p.tls_port}\)")
    # plain AMQP on the TLS port gets no AMQP answer
    with socket.create_connection(("127.0.0.1", p.tls_port), timeout=5) as s:
        s.sendall(b"AMQP\x00\x00\x09\x01")
        with contextlib.suppress(ConnectionResetError):
            assert not s.recv(100).startswith(b"\x01\x00\x00")
    over_tls.close()
    plain.close()


def test_tls_only_listener_with_port_0(tls_proxy: TlsProxy, pki: Path, names: Names) -> None:
    p = tls_proxy(plain=False)
    conn = tls_connect(p, client_context(pki))
    roundtrip(conn, names.queue("tls-only"), b"only TLS")
    conn.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", p.plain_port), timeout=5).close()
    p.wait_log(rf"master started: 1 workers on tls:127\.0\.0\.1:{p.tls_port},")


def test_mutual_tls_needs_a_client_certificate_from_the_ca(
    tls_proxy: TlsProxy, pki: Path, names: Names
) -> None:
    p = tls_proxy("--tls-client-ca-file", str(pki / "ca.pem"))
    for cert in (None, "stranger"):  # no certificate; one from another CA
        with pytest.raises(pika.exceptions.AMQPConnectionError):
            tls_connect(p, client_context(pki, cert)).close()
        # raw: whatever TLS version, no AMQP byte ever comes back
        ctx = client_context(pki, cert)
        with socket.create_connection(("127.0.0.1", p.tls_port), timeout=5) as raw:
            got = b""
            with (
                contextlib.suppress(ssl.SSLError, ConnectionResetError, BrokenPipeError),
                ctx.wrap_socket(raw, server_hostname="localhost") as s,
            ):
                s.sendall(b"AMQP\x00\x00\x09\x01")
                got = s.recv(100)
            assert got == b"", got
    conn = tls_connect(p, client_context(pki, "client"))
    roundtrip(conn, names.queue("mtls"), b"with a client certificate")
    conn.close()


def test_tls_handshake_timeout(tls_proxy: TlsProxy, pki: Path) -> None:
    p = tls_proxy("--client-handshake-timeout", "1")
    with socket.create_connection(("127.0.0.1", p.tls_port), timeout=10) as s:
        started = time.monotonic()
        with contextlib.suppress(ConnectionResetError):
            assert s.recv(100) == b""  # no ClientHello from us: dropped
        assert 0.9 <= time.monotonic() - started < 3.0


@pytest.mark.parametrize("broken", ["garbage certificate", "key of another certificate"])
def test_unusable_certificate_stops_the_start_with_exit_2(
    tmp_path: Path, pki: Path, broken: str
) -> None:
    cert, key = pki / "server.pem", pki / "server.key"
    if broken == "garbage certificate":
        cert = tmp_path / "garbage.pem"
        cert.write_text(
            "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n"
        )
    else:
        key = pki / "client.key"
    p = ProxyProcess(
        tmp_path / "bad-tls.log",
        ["--tls-port", str(free_port()), "--tls-cert-file", str(cert), "--tls-key-file", str(key)],
    )
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="proxy exited with code 2"):
        p.start()
    assert time.monotonic() - started < 10
    assert p.proc is not None and p.proc.returncode == 2
    p.stop()
    log = p.log_text()
    assert "tls_cert_file/tls_key_file/tls_client_ca_file unusable: " in log, log
    assert "worker" not in log.split("unusable", 1)[1], "workers were started"

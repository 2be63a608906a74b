"""The docker-compose application without Docker: Debian's nginx and php-fpm on loopback ports,
running the exact deploy/php/index.php and deploy/nginx/default.conf of the compose file,
publishing one message per HTTP request through a real amqproxy to RabbitMQ.

Only what Docker would provide differs: nginx reaches PHP-FPM on 127.0.0.1 instead of `php`,
both listen on test ports, the document root is deploy/php, and the AMQP_* settings point at the
test's proxy and queue (given to php-fpm's environment as the compose file gives them, with the
pool's clear_env = no as in the official PHP-FPM image).
"""

from __future__ import annotations

import http.client
import json
import shutil
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pika
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.proxy import ProxyProcess, proxy_env
from tests.support.util import wait_for

from .deploy_helpers import (
    DEPLOY,
    Daemon,
    broker,
    free_ports,
    http_get,
    port_open,
    require_tool,
    substitute,
    temp_queue,
)

PHP_DIR = DEPLOY / "php"
SITE_CONF = DEPLOY / "nginx" / "default.conf"
REQUESTS = 1000
CONCURRENCY = 8
FPM_CHILDREN = 8


@dataclass
class Stack:
    nginx_port: int
    queue: str
    proxy: ProxyProcess
    fpm: Daemon
    nginx: Daemon


def metric_values(http_port: int) -> dict[str, float]:
    status, text = http_get(f"http://127.0.0.1:{http_port}/metrics")
    assert status == 200
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.labels:
                values[sample.name] = sample.value
    return values


def start_fpm(tmp_path: Path, fpm_port: int, proxy_port: int, queue: str) -> Daemon:
    fpm_bin = require_tool("php-fpm8.2", "php-fpm", package="php-fpm")
    (tmp_path / "php-fpm.conf").write_text(
        f"""\
[global]
pid = {tmp_path}/php-fpm.pid
error_log = {tmp_path}/php-fpm.log
daemonize = no

[app]
listen = 127.0.0.1:{fpm_port}
user = root
group = root
pm = static
pm.max_children = {FPM_CHILDREN}
clear_env = no
catch_workers_output = yes
php_admin_value[error_log] = {tmp_path}/php-errors.log
"""
    )
    env = proxy_env(
        {
            "AMQP_HOST": "127.0.0.1",
            "AMQP_PORT": str(proxy_port),
            "AMQP_USER": "guest",
            "AMQP_PASSWORD": "guest",
            "AMQP_VHOST": "/",
            "AMQP_QUEUE": queue,
        }
    )
    # -R: the test runs as root, and php-fpm refuses root pools without it
    fpm = Daemon(
        [fpm_bin, "--nodaemonize", "--allow-to-run-as-root", "--fpm-config",
         str(tmp_path / "php-fpm.conf")],
        tmp_path / "php-fpm.out",
        env=env,
    )  # fmt: skip
    fpm.wait_port(fpm_port, what="php-fpm")
    return fpm


def start_nginx(tmp_path: Path, nginx_port: int, fpm_port: int) -> Daemon:
    nginx_bin = require_tool("nginx", package="nginx")
    site = substitute(
        SITE_CONF.read_text(),
        {
            "server php:9000;": f"server 127.0.0.1:{fpm_port};",
            "listen 80;": f"listen 127.0.0.1:{nginx_port};",
            "root /var/www/html;": f"root {PHP_DIR};",
        },
        SITE_CONF.name,
    )
    conf_dir = tmp_path / "nginx"
    conf_dir.mkdir()
    (conf_dir / "site.conf").write_text(site)
    shutil.copy("/etc/nginx/fastcgi_params", conf_dir / "fastcgi_params")
    temp = conf_dir / "temp"
    temp.mkdir()
    (conf_dir / "nginx.conf").write_text(
        f"""\
worker_processes 2;
pid {conf_dir}/nginx.pid;
error_log {conf_dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {conf_dir}/access.log;
    client_body_temp_path {temp}/body;
    fastcgi_temp_path {temp}/fastcgi;
    proxy_temp_path {temp}/proxy;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    include {conf_dir}/site.conf;
}}
"""
    )
    nginx = Daemon(
        [nginx_bin, "-p", str(conf_dir), "-c", str(conf_dir / "nginx.conf"),
         "-e", str(conf_dir / "error.log"), "-g", "daemon off;"],
        tmp_path / "nginx.out",
    )  # fmt: skip
    nginx.wait_port(nginx_port, what="nginx")
    return nginx


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    nginx_port, fpm_port = free_ports(2)
    proxy = ProxyProcess(
        tmp_path / "amqproxy.log", ["--workers", "2", "--idle-connection-timeout", "30"]
    )
    daemons: list[Daemon] = []
    with temp_queue("php") as queue:
        try:
            proxy.start()
            fpm = start_fpm(tmp_path, fpm_port, proxy.port, queue)
            daemons.append(fpm)
            nginx = start_nginx(tmp_path, nginx_port, fpm_port)
            daemons.append(nginx)
            yield Stack(nginx_port, queue, proxy, fpm, nginx)
        finally:
            for daemon in reversed(daemons):
                daemon.stop(signal.SIGQUIT)
            proxy.stop()
            for name in ("amqproxy.log", "php-fpm.log", "php-errors.log", "nginx/error.log"):
                path = tmp_path / name
                if path.exists():
                    print(f"===== {name} =====\n{path.read_text(errors='replace')[-3000:]}")


def request(port: int, path: str) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read().decode()
    finally:
        conn.close()
    try:
        return response.status, json.loads(body)
    except json.JSONDecodeError:
        return response.status, {"raw": body}


def test_every_request_publishes_one_message_through_amqproxy(stack: Stack) -> None:
    before = metric_values(stack.proxy.http_port)

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        results = list(
            pool.map(lambda i: request(stack.nginx_port, f"/?id=req-{i}"), range(REQUESTS))
        )
    failed = [(i, r) for i, r in enumerate(results) if r[0] != 200 or not r[1].get("published")]
    assert not failed, f"{len(failed)} of {REQUESTS} requests failed, e.g. {failed[:3]}"
    assert [r[1]["id"] for r in results] == [f"req-{i}" for i in range(REQUESTS)]

    # every request's message is in RabbitMQ, once, with the app's properties
    conn = broker()
    ch = conn.channel()
    got: list[tuple[Any, bytes]] = []
    while True:
        method, props, body = ch.basic_get(stack.queue, auto_ack=True)
        if method is None:
            break
        got.append((props, body))
    conn.close()
    ids = sorted(json.loads(body)["id"] for _, body in got)
    assert ids == sorted(f"req-{i}" for i in range(REQUESTS))
    props = got[0][0]
    assert isinstance(props, pika.BasicProperties)
    assert (props.content_type, props.delivery_mode) == ("application/json", 2)
    assert {p.message_id for p, _ in got} == set(ids)

    # ... and they went through the proxy: its counters saw every client and message, while
    # RabbitMQ saw at most one connection per worker
    # (workers export their counters every second)
    def counted() -> dict[str, float]:
        after = metric_values(stack.proxy.http_port)
        published = after.get("amqproxy_messages_published_total", 0) - before.get(
            "amqproxy_messages_published_total", 0
        )
        assert published == REQUESTS, f"the proxy counted {published} published messages"
        return after

    after = wait_for(counted, 5, interval=0.2, what="the proxy's published-message counter")
    assert after["amqproxy_upstream_connections"] <= 2
    assert after["amqproxy_client_connections"] == 0  # every PHP request disconnected


def test_the_app_reports_503_when_amqproxy_is_down(stack: Stack) -> None:
    status, body = request(stack.nginx_port, "/?id=before")
    assert (status, body.get("published")) == (200, True), body
    stack.proxy.stop()  # SIGTERM
    assert not port_open(stack.proxy.port)
    status, body = request(stack.nginx_port, "/?id=during")
    assert status == 503 and body["published"] is False and body["error"], body

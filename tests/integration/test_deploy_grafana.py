"""deploy/grafana/amqproxy.json: a well-formed, importable dashboard whose every query works.

The structure is checked the way Grafana's importer relies on it (unique panel ids, grid inside
24 columns without overlaps, the data source as an import input, a refId per query). Then the
queries are run for real: Debian's Prometheus scrapes a running proxy that carried traffic and
lost a worker, and every panel's query, with Grafana's variables filled in, must be valid PromQL
that returns data.
"""

from __future__ import annotations

import json
import re
import signal
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.support.broker import BROKER_HOST, BROKER_PORT
from tests.support.proxy import proxy_env
from tests.support.util import REPO_ROOT, wait_for

from .deploy_helpers import (
    DEPLOY,
    Daemon,
    free_ports,
    http_get,
    publish_through,
    require_tool,
    temp_queue,
)

DASHBOARD = DEPLOY / "grafana" / "amqproxy.json"

#: What the dashboard must show, and the metric that shows it.
REQUIRED = {
    "clients": "amqproxy_client_connections",
    "upstream connections": "amqproxy_upstream_connections",
    "client channels": "amqproxy_client_channels",
    "upstream channels": "amqproxy_upstream_channels",
    "messages/s": "rate(amqproxy_messages_published_total",
    "bytes/s": "rate(amqproxy_client_bytes_received_total",
    "upstream bytes/s": "rate(amqproxy_upstream_bytes_sent_total",
    "upstream errors": "amqproxy_upstream_errors_total",
    "worker restarts": "amqproxy_worker_restarts_total",
    "RSS": "amqproxy_worker_resident_memory_bytes",
}


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def all_panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for panel in panels:
        out.append(panel)
        out.extend(all_panels(panel.get("panels", [])))
    return out


def queries() -> list[tuple[str, str]]:
    """(panel title, expr) of every query."""
    return [
        (panel["title"], target["expr"])
        for panel in all_panels(dashboard()["panels"])
        for target in panel.get("targets", [])
    ]


def test_dashboard_is_importable() -> None:
    dash = dashboard()
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 30
    assert dash.get("id") is None, "an exported dashboard carries no database id"
    inputs = {i["name"]: i for i in dash["__inputs"]}
    assert inputs["DS_PROMETHEUS"]["pluginId"] == "prometheus"

    panels = all_panels(dash["panels"])
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["type"] in ("timeseries", "stat", "gauge", "table", "bargauge")
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        assert all(t["expr"].strip() for t in panel["targets"]), panel["title"]
    variables = {v["name"] for v in dash["templating"]["list"]}
    for _, expr in queries():
        for used in re.findall(r"\$(\w+)", expr):
            assert used in variables or used.startswith("__"), f"${used} undefined in {expr}"

    exprs = " ".join(expr for _, expr in queries())
    missing = [topic for topic, needle in REQUIRED.items() if needle not in exprs]
    assert not missing, f"no panel for {missing}"


# --------------------------------------------------------------------------- live


def prometheus_query(port: int, expr: str) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    status, body = http_get(url)
    answer: dict[str, Any] = json.loads(body)
    answer["_http_status"] = status
    return answer


def grafana_to_promql(expr: str) -> str:
    """What Grafana sends for the dashboard's variables (All instances, 1 s scrapes)."""
    return expr.replace("$__rate_interval", "4s").replace("$instance", ".*")


def test_every_query_returns_data_from_a_real_prometheus(tmp_path: Path) -> None:
    prometheus = require_tool("prometheus", package="prometheus")
    port, http_port, prom_port = free_ports(3)
    proxy = Daemon(
        [sys.executable, "-m", "amqproxy_mp", "--listen", "127.0.0.1", "--port", str(port),
         "--http-port", str(http_port), "--workers", "2", f"amqp://{BROKER_HOST}:{BROKER_PORT}"],
        tmp_path / "proxy.log",
        env=proxy_env(),
        cwd=REPO_ROOT,
    )  # fmt: skip
    (tmp_path / "prometheus.yml").write_text(
        f"""\
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: amqproxy
    static_configs:
      - targets: ["127.0.0.1:{http_port}"]
"""
    )
    prom = Daemon(
        [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
        tmp_path / "prometheus.log",
    )  # fmt: skip
    try:
        proxy.wait_port(port, what="amqproxy")
        prom.wait_port(prom_port, what="prometheus")
        # traffic, and a worker lost, so that every panel has something to show
        with temp_queue("grafana") as queue:
            for i in range(30):
                publish_through(port, queue, f"m{i}".encode())
        # (workers export their counters every second; a SIGKILL loses what was not exported)
        wait_for(
            lambda: (
                "amqproxy_messages_published_total 30.0"
                in http_get(f"http://127.0.0.1:{http_port}/metrics")[1]
            ),
            5,
            what="30 published messages exported",
        )
        master = psutil.Process(proxy.pid)
        victim = master.children()[0]
        victim.kill()
        wait_for(
            lambda: (
                victim.pid not in {c.pid for c in master.children()} and len(master.children()) == 2
            ),
            10,
            what="the worker to be replaced",
        )
        # two scrapes at least after the restart, so rate() and increase() have two points
        time.sleep(5)
        for i in range(30, 40):
            with temp_queue("grafana2") as queue:
                publish_through(port, queue, f"m{i}".encode())
        time.sleep(2.5)

        problems = []
        for title, expr in queries():
            answer = prometheus_query(prom_port, grafana_to_promql(expr))
            if answer.get("status") != "success":
                problems.append(f"{title}: {expr}: {answer.get('error')}")
            elif not answer["data"]["result"]:
                problems.append(f"{title}: {expr}: no data")
        assert not problems, "\n".join(problems)

        # and the numbers mean what the titles say
        published = prometheus_query(prom_port, "sum(amqproxy_messages_published_total)")["data"][
            "result"
        ]
        assert float(published[0]["value"][1]) == 40
        restarts = prometheus_query(prom_port, "sum(amqproxy_worker_restarts_total)")["data"][
            "result"
        ]
        assert float(restarts[0]["value"][1]) == 1
    finally:
        prom.stop(signal.SIGTERM)
        proxy.stop(signal.SIGTERM)
        print(prom.log_text()[-3000:])


@pytest.mark.parametrize("needle", sorted(set(REQUIRED.values())))
def test_required_metrics_are_documented_in_the_readme(needle: str) -> None:
    metric = needle.removeprefix("rate(").removesuffix("_total")
    readme = (REPO_ROOT / "README.md").read_text()
    # the README lists metrics, some as amqproxy_{client,upstream}_bytes_{received,sent}_total
    expanded = re.sub(
        r"\{(\w+),(\w+)\}",
        lambda m: f"({m.group(1)}|{m.group(2)})",
        " ".join(re.findall(r"`(amqproxy_[^`]+)`", readme)),
    )
    patterns = [re.sub(r"\{.*?\}$", "", p) for p in expanded.split()]
    assert any(re.fullmatch(p.removesuffix("_total"), metric) for p in patterns), metric

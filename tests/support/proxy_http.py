"""The proxy's HTTP endpoint (``--http-port``): GET a path, read one sample of /metrics."""

from __future__ import annotations


def http_request(port: int, path: str, timeout: float = 5.0) -> tuple[int, str]:
    """GET http://127.0.0.1:port/path; (status, body), for error statuses too."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return int(r.status), r.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


def metric_sample(http_port: int, name: str, **labels: str) -> float:
    """One sample of the proxy's /metrics (0.0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    status, text = http_request(http_port, "/metrics")
    assert status == 200, (status, text)
    wanted = tuple(sorted(labels.items()))
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and tuple(sorted(sample.labels.items())) == wanted:
                return float(sample.value)
    return 0.0

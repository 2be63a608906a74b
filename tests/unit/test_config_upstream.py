"""Configuration of the upstream: the URL, and several nodes (a cluster)."""

from __future__ import annotations

from pathlib import Path

import pytest

from amqproxy_mp.config import ConfigError, Upstream, format_config, parse_upstream_url
from tests.unit.config_support import URL, error_of, load, write

# --- the upstream URL --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "upstream", "text"),
    [
        ("amqp://host", Upstream("amqp", "host", 5672), "amqp://host:5672"),
        ("amqp://host/", Upstream("amqp", "host", 5672), "amqp://host:5672"),
        ("amqps://host", Upstream("amqps", "host", 5671), "amqps://host:5671"),
        ("amqps://Host.Example:1234", Upstream("amqps", "host.example", 1234), None),
        ("AMQP://host", Upstream("amqp", "host", 5672), None),
        ("amqp://127.0.0.1:5673", Upstream("amqp", "127.0.0.1", 5673), "amqp://127.0.0.1:5673"),
        ("amqp://[::1]", Upstream("amqp", "::1", 5672), "amqp://[::1]:5672"),
        ("amqps://[2001:db8::1]:5671", Upstream("amqps", "2001:db8::1", 5671), None),
        (" amqp://host ", Upstream("amqp", "host", 5672), None),
    ],
)
def test_upstream_urls(url: str, upstream: Upstream, text: str | None) -> None:
    parsed, warnings = parse_upstream_url(url)
    assert parsed == upstream
    assert warnings == []
    assert parsed.tls is (upstream.scheme == "amqps")
    if text:
        assert str(parsed) == text


def test_credentials_and_vhost_in_the_url_are_ignored_with_a_warning() -> None:
    loaded = load(["amqps://guest:s3cr3t@rabbit.example.com:5671/%2Fprod?heartbeat=5"])
    assert loaded.config.upstream == Upstream("amqps", "rabbit.example.com", 5671)
    text = " ".join(loaded.warnings)
    assert "user name or password" in text
    assert "'/prod'" in text
    assert "query string" in text
    assert "s3cr3t" not in text
    assert "s3cr3t" not in format_config(loaded)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://host", "expected amqp://host[:port] or amqps://host[:port]"),
        ("localhost:5672", "expected amqp://host[:port]"),
        ("broker.example.com", "expected amqp://host[:port]"),
        ("amqp:host", "expected amqp://host[:port]"),
        ("amqp://", "the host is missing"),
        ("amqp://:5672", "the host is missing"),
        ("amqp://host:0", "the port must be 1..65535"),
        ("amqp://host:99999", "out of range"),
        ("amqp://host:abc", "expected amqp://host[:port]"),
        ("amqp://::1", "put IPv6 addresses in brackets"),
        ("amqp://[::1", "expected amqp://host[:port]"),
    ],
)
def test_bad_upstream_urls(url: str, expected: str) -> None:
    message = error_of([], {"AMQP_URL": url})
    assert message.startswith(f"upstream = {url!r} from environment (AMQP_URL): ")
    assert expected in message


def test_bad_upstream_url_error_hides_the_password() -> None:
    message = error_of(["http://guest:s3cr3t@host"])
    assert "s3cr3t" not in message
    assert message.startswith("upstream = 'http://guest:***@host' from command line (argument)")


def test_missing_upstream_names_the_three_ways_to_set_it() -> None:
    message = error_of([])
    assert "no upstream" in message
    assert "argument" in message
    assert "AMQP_URL" in message
    assert "[main]" in message and "upstream" in message


# --- several nodes (a cluster) ----------------------------------------------------------------


CLUSTER = (
    Upstream("amqp", "rabbit-1", 5672),
    Upstream("amqp", "rabbit-2", 5680),
    Upstream("amqps", "rabbit-3", 5671),
)


def test_several_upstreams_from_every_source(tmp_path: Path) -> None:
    urls = ["amqp://rabbit-1", "amqp://rabbit-2:5680", "amqps://rabbit-3"]
    ini = write(tmp_path, "a.ini", f"[main]\nupstream = {', '.join(urls)}\n")
    yml = write(tmp_path, "a.yml", "main:\n  upstream:\n" + "".join(f"    - {u}\n" for u in urls))
    for loaded in (
        load(urls),
        load([], {"AMQP_URL": ",".join(urls)}),
        load(["-c", ini]),
        load(["-c", yml]),
    ):
        assert loaded.config.upstream.nodes == CLUSTER
        assert loaded.config.upstream == Upstream("amqp", "rabbit-1", 5672, CLUSTER[1:])
        assert (
            str(loaded.config.upstream)
            == "amqp://rabbit-1:5672,amqp://rabbit-2:5680,amqps://rabbit-3:5671"
        )
    rows = {line.split()[0]: line for line in format_config(load(urls)).splitlines()}
    assert rows["upstream"].split()[1] == str(load(urls).config.upstream)


def test_a_single_upstream_is_one_node() -> None:
    config = load([URL]).config
    assert config.upstream.nodes == (Upstream("amqp", "broker.example.com", 5672),)
    assert (config.upstream_policy, config.upstream_node_connect_timeout) == ("spread", 2.0)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["amqp://a", "amqp://a:5672"], "amqp://a:5672 is listed twice"),
        (["amqp://a,http://b"], r"expected amqp://host\[:port\] or amqps://host\[:port\]"),
        (["amqp://a,,amqp://b", "--upstream-policy", "random"], "expected spread or ordered"),
        ([URL, "--upstream-node-connect-timeout", "0"], "a number of seconds > 0"),
    ],
)
def test_bad_cluster_settings(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(argv)


def test_a_yaml_list_of_other_values_is_refused(tmp_path: Path) -> None:
    yml = write(tmp_path, "a.yml", "main:\n  upstream:\n    - amqp://a\n    - 5\n")
    with pytest.raises(ConfigError, match="not a list of other values"):
        load(["-c", yml])

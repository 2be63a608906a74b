"""deploy/docker-compose.yml and the Dockerfile, without a Docker engine (none runs here).

`docker-compose config` (Debian's docker-compose, which needs no engine for it) validates and
resolves the compose file; the tests then check that the pieces fit together: mounted files
exist and are the ones the Docker-less end-to-end test runs (test_deploy_php_nginx.py), the
proxy's mounted config passes --check-config, ports and service names agree, and the
healthcheck commands of the compose file and the Dockerfile really tell a healthy proxy from
a missing one.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import signal
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from amqproxy_mp.config import load_config
from tests.support.broker import BROKER_HOST, BROKER_PORT
from tests.support.proxy import proxy_env
from tests.support.util import REPO_ROOT, wait_for

from .deploy_helpers import DEPLOY, Daemon, free_ports, require_tool, substitute

COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    tool = require_tool("docker-compose", package="docker-compose")
    result = subprocess.run(
        [tool, "--file", str(COMPOSE), "--project-directory", str(DEPLOY), "config"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=DEPLOY,
    )
    assert result.returncode == 0, f"docker-compose config:\n{result.stderr}"
    resolved: dict[str, Any] = yaml.safe_load(result.stdout)
    return resolved


def volumes(service: dict[str, Any]) -> dict[str, Path]:
    """target -> source of the bind mounts (docker-compose config resolves them)."""
    found = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume["source"], volume["target"]
        found[target] = Path(source)
    return found


def seconds(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "ms": 0.001}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)(ms|s|m|h)", text))


def test_services_and_their_wiring(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"rabbitmq", "amqproxy", "php", "nginx"}

    proxy = services["amqproxy"]
    assert Path(proxy["build"]["context"]) == REPO_ROOT
    assert (REPO_ROOT / proxy["build"].get("dockerfile", "Dockerfile")) == DOCKERFILE
    assert proxy["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
    assert proxy["healthcheck"]["test"][0] == "CMD"
    assert services["rabbitmq"]["healthcheck"]["test"]

    # the proxy's config is a mounted file, the one --config names, and it is valid
    command = proxy["command"]
    config_path = command[command.index("--config") + 1]
    config_file = volumes(proxy)[config_path]
    assert config_file.is_file() and config_file.parent == DEPLOY
    config = load_config(["--config", str(config_file)], {}).config
    assert (config.upstream.host, config.upstream.port) == ("rabbitmq", 5672)
    assert config.listen_address == "0.0.0.0", "other containers must reach the proxy"
    drain = config.term_client_close_timeout + config.term_timeout
    assert config.term_timeout >= 0 and seconds(proxy["stop_grace_period"]) >= drain + 5
    assert proxy.get("stop_signal", "SIGTERM") == "SIGTERM"

    # the PHP app talks to the proxy service on its port, with the exact index.php that
    # test_deploy_php_nginx.py runs under Debian's php-fpm
    php = services["php"]
    assert Path(php["build"]["context"]) == DEPLOY / "php"
    assert (DEPLOY / "php" / "Dockerfile").is_file()
    assert volumes(php)["/var/www/html/index.php"] == DEPLOY / "php" / "index.php"
    env = php["environment"]
    assert env["AMQP_HOST"] == "amqproxy"
    assert int(env["AMQP_PORT"]) == config.listen_port
    assert php["depends_on"]["amqproxy"]["condition"] == "service_healthy"

    # nginx: the exact site config, forwarding to the php service where it keeps index.php
    nginx = services["nginx"]
    site = volumes(nginx)["/etc/nginx/conf.d/default.conf"]
    assert site == DEPLOY / "nginx" / "default.conf"
    text = site.read_text()
    assert "server php:9000;" in text and "root /var/www/html;" in text
    assert "EXPOSE 9000" in (DEPLOY / "php" / "Dockerfile").read_text()
    assert nginx["healthcheck"]["test"]
    assert [str(p).rsplit(":", 1)[-1].split("/")[0] for p in nginx["ports"]] == ["80"]


# --------------------------------------------------------------------------- Dockerfile


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", path.read_text())
    found = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def dockerignored(relative: str) -> bool:
    """Docker's .dockerignore rule: the last matching pattern wins; ! re-includes."""
    ignored = False
    for raw in DOCKERIGNORE.read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = relative.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, pattern.replace("**/", ""))
               for p in prefixes):  # fmt: skip
            ignored = not negate
    return ignored


def test_dockerfile_runtime_image() -> None:
    steps = instructions()
    bases = [args.split()[0] for word, args in steps if word == "FROM"]
    assert bases and all(re.fullmatch(r"python:3\.\d+-slim(-\w+)?", b) for b in bases), bases

    final = dict(final_stage())  # the last of each instruction in the runtime stage
    user = final["USER"].split(":")[0]
    assert user not in ("root", "0"), "the image must not run as root"
    assert final["STOPSIGNAL"] == "SIGTERM"
    env = dict(pair.partition("=")[::2] for pair in shlex.split(final["ENV"]))
    assert env["PYTHONMALLOC"] == "malloc"  # memory given back after storms
    assert {"5673", "15673"} <= set(final["EXPOSE"].split())
    assert "HEALTHCHECK" in final and "/healthz" in final["HEALTHCHECK"]
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert final["ENTRYPOINT"] == f'["{next(iter(scripts))}"]' == '["amqproxy"]'
    runs = " ".join(args for word, args in final_stage() if word == "RUN")
    assert "[test]" not in runs and "gcc" not in runs and "build-essential" not in runs
    assert "--no-cache-dir" in runs

    # everything the build copies from the context is there and not excluded
    for word, args in steps:
        if word == "COPY" and "--from=" not in args:
            for source in shlex.split(args)[:-1]:
                assert (REPO_ROOT / source).exists(), source
                assert not dockerignored(source), f"{source} is excluded by .dockerignore"
    assert dockerignored(".venv") and dockerignored("tests") and dockerignored(".git")
    assert not dockerignored("amqproxy_mp/cli.py")


# --------------------------------------------------------------------------- healthchecks


def healthcheck_commands(compose: dict[str, Any], http_port: int) -> dict[str, list[str]]:
    """The compose file's and the Dockerfile's proxy healthchecks, runnable here."""
    test = compose["services"]["amqproxy"]["healthcheck"]["test"]
    assert test[:2] == ["CMD", "python"], test
    compose_cmd = [sys.executable, *test[2:]]
    compose_cmd[-1] = substitute(
        compose_cmd[-1], {"127.0.0.1:15673/": f"127.0.0.1:{http_port}/"}, COMPOSE.name
    )
    final = dict(final_stage())
    m = re.match(r"(--\S+\s+)*CMD\s+(\[.*\])\s*$", final["HEALTHCHECK"])
    assert m, final["HEALTHCHECK"]
    docker_cmd = yaml.safe_load(m.group(2))  # a JSON array
    assert docker_cmd[0] == "python"
    return {"compose": compose_cmd, "Dockerfile": [sys.executable, *docker_cmd[1:]]}


def test_healthchecks_tell_up_from_down(compose: dict[str, Any], tmp_path: Path) -> None:
    port, http_port = free_ports(2)
    commands = healthcheck_commands(compose, http_port)
    env = proxy_env({"HTTP_PORT": str(http_port)})  # the image's ENV, as docker run -e would

    def check(name: str) -> int:
        return subprocess.run(commands[name], env=env, capture_output=True, timeout=30).returncode

    proxy = Daemon(
        [sys.executable, "-m", "amqproxy_mp", "--listen", "127.0.0.1", "--port", str(port),
         "--workers", "1", f"amqp://{BROKER_HOST}:{BROKER_PORT}"],
        tmp_path / "proxy.log",
        env=env,
        cwd=REPO_ROOT,
    )  # fmt: skip
    try:
        proxy.wait_port(port, what="amqproxy")
        for name in commands:
            wait_for(lambda n=name: check(n) == 0, 10, interval=0.3, what=f"{name} healthy")
    finally:
        assert proxy.stop(signal.SIGTERM) == 0, proxy.log_text()
    for name in commands:
        assert check(name) != 0, f"the {name} healthcheck passes with no proxy running"

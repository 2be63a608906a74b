"""RabbitMQ as the oracle: generated multi-client programs run directly and through the proxy
must be observed the same (see tests/differential/ and scripts/differential for long runs).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.proxy import ProxyProcess
from tests.support.raw_client import amqp_answers

from .cli import run_seeds
from .faults import run_faults
from .harness import RABBITMQ, Target, compare
from .regressions import regression_programs

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module", autouse=True)
def broker() -> None:
    assert amqp_answers(), "RabbitMQ must answer on 127.0.0.1:5672"


@pytest.fixture(scope="module", params=[1, 2], ids=["1 worker", "2 workers"])
def proxy(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Target]:
    workers = request.param
    p = ProxyProcess(
        tmp_path_factory.mktemp("differential") / "proxy.log",
        ("--workers", str(workers), "-t", "60"),
    )
    p.start()
    yield Target(f"proxy ({workers} workers)", p.host, p.port)
    log = Path(p.log_path).read_text(errors="replace")
    p.stop()
    assert "Traceback" not in log, log[-5000:]


def test_the_harness_sees_no_difference_between_rabbitmq_and_itself() -> None:
    """500 programs on RabbitMQ twice: what differs there is the harness's, not the proxy's."""
    programs, _, found = run_seeds(iter(range(500)), RABBITMQ, RABBITMQ, float("inf"), 4)
    assert programs == 500
    assert not found, "\n\n".join(verdict.text() for verdict in found)


def test_programs_through_the_proxy_are_observed_as_directly(proxy: Target) -> None:
    programs, _, found = run_seeds(iter(range(10_000, 10_200)), RABBITMQ, proxy, float("inf"), 4)
    assert programs == 200
    assert not found, "\n\n".join(verdict.text() for verdict in found)


@pytest.mark.parametrize("name", list(regression_programs()))
def test_programs_that_once_differed_are_observed_as_directly(proxy: Target, name: str) -> None:
    verdict = compare(regression_programs()[name], RABBITMQ, proxy)
    assert verdict.difference is None, verdict.text()


def test_fault_mode_keeps_every_promise(tmp_path: Path) -> None:
    """A minute of programs through a proxy while upstream connections are closed, workers
    killed and the upstream stalled (tests/differential/faults.py has the oracle)."""
    outcomes = run_faults(1.0, 4, 500_000, tmp_path)
    assert sum(o.promised for o in outcomes) > 100, "the programs promised too little to judge"
    violations = [v for o in outcomes for v in o.violations]
    assert not violations, "\n".join(violations[:50])

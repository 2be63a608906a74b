"""Run a program on a reference and on a candidate, compare, shrink what differs.

The reference is RabbitMQ itself; the candidate a proxy in front of it (or RabbitMQ again,
for the self-check, which shows that the harness sees no difference where there is none).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass

from .compare import Difference, first_difference, normalise, report
from .grammar import generate
from .program import Program
from .runner import Run, cleanup


@dataclass(frozen=True)
class Target:
    name: str
    host: str
    port: int


RABBITMQ = Target("RabbitMQ", "127.0.0.1", 5672)


def execute(program: Program, target: Target) -> object:
    """Run the program on the target; its normalised observation."""
    prefix = f"dt{program.seed}-{uuid.uuid4().hex[:8]}"
    run = Run(target.host, target.port, prefix)
    try:
        for index, step in enumerate(program.steps):
            run.at_step(index)
            step.run(run)
            if step.lingers or run.consumers:
                run.quiet()
        run.at_step(len(program.steps))
        run.finish()
        observation = run.observe(program)
    finally:
        cleanup(
            prefix,
            [*program.queue_names(), "e0", "e1", *sorted(run.generated_queues)],
            program.exchange_names(),
        )
    return normalise(observation, prefix)


@dataclass
class Verdict:
    program: Program
    difference: Difference | None
    reference: Target
    candidate: Target

    def text(self) -> str:
        assert self.difference is not None
        head = f"seed {self.program.seed}: {self.reference.name} and {self.candidate.name} differ"
        return (
            head
            + "\n"
            + report(
                self.program.describe(), self.difference, self.reference.name, self.candidate.name
            )
        )


def compare(program: Program, reference: Target, candidate: Target) -> Verdict:
    actors = [step.client for step in program.steps]
    a = execute(program, reference)
    b = execute(program, candidate)
    return Verdict(program, first_difference(a, b, actors), reference, candidate)  # type: ignore[arg-type]


def check(seed: int, reference: Target, candidate: Target, length: int = 24) -> Verdict:
    """One generated program; when it differs, confirmed, then shrunk to a minimal one."""
    program = generate(seed, length)
    verdict = compare(program, reference, candidate)
    if verdict.difference is None:
        return verdict
    # a difference that does not happen again is the harness's (timing), not the proxy's
    again = compare(program, reference, candidate)
    if again.difference is None:
        return again
    return shrink(again, lambda p: compare(p, reference, candidate))


def shrink(verdict: Verdict, test: Callable[[Program], Verdict]) -> Verdict:
    """Drop steps while the program still differs (delta debugging, chunks then single)."""
    best = verdict
    chunk = max(1, len(best.program.steps) // 2)
    while chunk >= 1:
        i = 0
        changed = False
        while i < len(best.program.steps):
            steps = best.program.steps[:i] + best.program.steps[i + chunk :]
            if not steps:
                i += chunk
                continue
            candidate = test(Program(best.program.seed, steps))
            if candidate.difference is not None:
                best = candidate
                changed = True
            else:
                i += chunk
        if not changed:
            chunk //= 2
    return best

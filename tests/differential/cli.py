"""scripts/differential: run generated programs on RabbitMQ and through proxies, for as many
seeds or minutes as asked, and print every difference, shrunk, with its seed.

    scripts/differential --minutes 30
    scripts/differential --seeds 1000-1999 --workers 2
    scripts/differential --self-check --seeds 0-499
    scripts/differential --faults --minutes 10
    scripts/differential --seed 1234            # one program, printed with its outcome
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from .grammar import generate
from .harness import RABBITMQ, Target, Verdict, check


def proxies(workers: list[int], logdir: Path, started: list[object]) -> list[Target]:
    """Start one proxy per worker count; each is appended to `started` for the caller to stop."""
    from tests.support.proxy import ProxyProcess

    targets = []
    for count in workers:
        p = ProxyProcess(logdir / f"proxy-w{count}.log", ("--workers", str(count), "-t", "60"))
        p.start()
        started.append(p)
        targets.append(Target(f"proxy ({count} worker{'s' if count > 1 else ''})", p.host, p.port))
    return targets


def run_seeds(
    seeds: Iterator[int], reference: Target, candidate: Target, deadline: float, threads: int
) -> tuple[int, int, list[Verdict]]:
    """(programs, steps, differing verdicts)."""
    found: list[Verdict] = []
    programs = steps = 0

    def record(verdict: Verdict) -> None:
        nonlocal programs, steps
        programs += 1
        steps += len(generate(verdict.program.seed).steps)  # (a difference is shrunk)
        if verdict.difference is not None:
            found.append(verdict)
            print(verdict.text(), "\n" + "=" * 100, flush=True)

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        pending: set[concurrent.futures.Future[Verdict]] = set()
        for seed in seeds:
            if time.monotonic() > deadline:
                break
            pending.add(pool.submit(check, seed, reference, candidate))
            if len(pending) >= threads * 2:
                done, pending = concurrent.futures.wait(pending, return_when="FIRST_COMPLETED")
                for future in done:
                    record(future.result())
        for future in concurrent.futures.as_completed(pending):
            record(future.result())
    return programs, steps, found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/differential",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--minutes", type=float, help="run until this much time has passed")
    parser.add_argument("--seeds", default="0-199", help="seeds A-B (default 0-199)")
    parser.add_argument("--seed", type=int, help="one program: print it and its outcome")
    parser.add_argument("--workers", default="1,2", help="proxy worker counts (default 1,2)")
    parser.add_argument("--self-check", action="store_true", help="RabbitMQ against itself")
    parser.add_argument("--faults", action="store_true", help="fault mode (see faults.py)")
    parser.add_argument("--threads", type=int, default=4, help="programs run at once")
    args = parser.parse_args(argv)
    if args.faults:
        from .faults import main as faults_main

        return faults_main(args)
    first, _, last = args.seeds.partition("-")
    deadline = time.monotonic() + args.minutes * 60 if args.minutes else float("inf")
    if args.seed is not None:
        print(generate(args.seed).describe())
    logdir = Path(tempfile.mkdtemp(prefix="differential-"))
    started: list[object] = []
    try:
        candidates = (
            [Target("RabbitMQ again", RABBITMQ.host, RABBITMQ.port)]
            if args.self_check
            else proxies([int(w) for w in args.workers.split(",")], logdir, started)
        )
        return _run(args, candidates, deadline, first, last, logdir)
    finally:
        for proxy in started:
            proxy.stop()  # type: ignore[attr-defined]


def _run(
    args: argparse.Namespace,
    candidates: list[Target],
    deadline: float,
    first: str,
    last: str,
    logdir: Path,
) -> int:
    total_programs = total_steps = 0
    failures: list[Verdict] = []
    started = time.monotonic()
    for candidate in candidates:
        # with --minutes, the time is shared between the candidates
        share = (deadline - time.monotonic()) / (len(candidates) - candidates.index(candidate))
        until = time.monotonic() + share if args.minutes else deadline
        seeds_here = (
            itertools.count(int(first))
            if args.minutes
            else iter(
                [args.seed] if args.seed is not None else range(int(first), int(last or first) + 1)
            )
        )
        programs, steps, found = run_seeds(seeds_here, RABBITMQ, candidate, until, args.threads)
        total_programs += programs
        total_steps += steps
        failures += found
        print(f"{candidate.name}: {programs} programs, {steps} steps, {len(found)} differences",
              flush=True)  # fmt: skip
    elapsed = time.monotonic() - started
    print(
        f"in all: {total_programs} programs, {total_steps} steps, {len(failures)} differences, "
        f"{elapsed / 60:.1f} min (proxy logs in {logdir})"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

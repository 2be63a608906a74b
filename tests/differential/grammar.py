"""The grammar programs are generated from: a seed fixes the clients, their steps and the
order the steps interleave in."""

from __future__ import annotations

import random

from .program import (
    ARGUMENTS,
    AUTO_DELETE_QUEUES,
    BODIES,
    EXCHANGE_TYPES,
    EXCHANGES,
    EXCLUSIVE_QUEUES,
    HEADERS,
    MISSING_EXCHANGE,
    MISSING_QUEUE,
    PHP_CLIENT,
    QUEUES,
    Acknowledge,
    Burst,
    Call,
    CloseChannel,
    Connect,
    Disconnect,
    OpenChannel,
    PhpCycles,
    Program,
    Publish,
    Step,
)


def generate(seed: int, length: int = 24) -> Program:
    """A random program: 2 to 6 clients with the same credentials, interleaved."""
    rng = random.Random(seed)
    program = Program(seed)
    steps = program.steps
    clients = rng.randint(2, 6)
    connected: dict[int, bool] = {}
    channels: dict[int, set[int]] = {}
    while len(steps) < length:
        c = rng.randrange(clients)
        if not connected.get(c):
            if rng.random() < 0.15:
                bad = rng.choice(["bad password", "bad vhost"])
                steps.append(Connect(c, rng.choice(["PLAIN", "AMQPLAIN"]), bad))
                continue
            frame_max = rng.choice([131072, 131072, 4096])
            steps.append(Connect(c, rng.choice(["PLAIN", "PLAIN", "AMQPLAIN"]), "ok", frame_max))
            connected[c] = True
            channels[c] = set()
            continue
        open_channels = channels[c]
        roll = rng.random()
        if not open_channels or (roll < 0.08 and len(open_channels) < 3):
            n = min(set(range(1, 4)) - open_channels)
            steps.append(OpenChannel(c, n))
            open_channels.add(n)
            continue
        n = rng.choice(sorted(open_channels))
        if roll < 0.13:
            steps.append(CloseChannel(c, n))
            open_channels.discard(n)
        elif roll < 0.16:
            steps.append(Disconnect(c, abrupt=rng.random() < 0.3))
            connected[c] = False
        elif roll < 0.19:  # (on channels 5 and 6, which nothing else uses)
            steps.append(Burst(c, "reuse", 5, 6, rng.choice(QUEUES)))
        elif roll < 0.22:
            steps.append(
                Burst(c, rng.choice(["fail-close", "get-close"]), n, 6, rng.choice(QUEUES))
            )
            open_channels.discard(n)
        elif roll < 0.25:
            steps.append(PhpCycles(PHP_CLIENT, rng.randint(1, 4), rng.choice(QUEUES)))
        else:
            steps.extend(_channel_steps(rng, c, n))
    del steps[length:]
    return program


def _channel_steps(rng: random.Random, c: int, n: int) -> list[Step]:
    """One channel operation (and the sync that settles it, for a publish or an ack)."""
    queue = rng.choice([*QUEUES, *QUEUES, *EXCLUSIVE_QUEUES, *AUTO_DELETE_QUEUES, MISSING_QUEUE])
    exchange = rng.choice([*EXCHANGES, MISSING_EXCHANGE])
    kind = rng.choices(
        ["publish", "declare queue", "declare exchange", "bind", "unbind", "purge", "delete queue",
         "delete exchange", "get", "consume", "cancel", "ack", "recover", "qos", "confirm", "tx"],
        [18, 8, 5, 5, 2, 2, 2, 1, 6, 5, 2, 6, 1, 3, 2, 3],
    )[0]  # fmt: skip
    sync = Call(c, n, "sync")
    if kind == "publish":
        target = rng.random()
        if target < 0.6:
            step = Publish(c, n, "", queue, rng.random() < 0.3)
        elif target < 0.9:
            step = Publish(
                c, n, rng.choice(EXCHANGES), rng.choice([*QUEUES, "k"]), rng.random() < 0.3
            )
        else:
            step = Publish(c, n, MISSING_EXCHANGE, "k")
        step = Publish(
            c, step.channel, step.exchange, step.routing_key, step.mandatory,
            rng.choice(list(HEADERS)) if rng.random() < 0.3 else "none",
            rng.choice(list(BODIES)) if rng.random() < 0.3 else "small",
        )  # fmt: skip
        # (unsettled, the broker's 541 for an unreadable one races its client's next step)
        return [step, sync] if rng.random() < 0.9 or step.headers == "NaN" else [step]
    if kind == "declare queue":
        exclusive = queue in EXCLUSIVE_QUEUES
        passive = rng.random() < 0.15
        name = "" if rng.random() < 0.1 else queue
        arguments = rng.choice(list(ARGUMENTS)) if rng.random() < 0.3 else "none"
        auto_delete = queue in AUTO_DELETE_QUEUES
        return [Call(c, n, "queue.declare", (name, passive, exclusive, auto_delete, arguments))]
    if kind == "declare exchange":
        kind_of = rng.choice([*EXCHANGE_TYPES, "x-unknown"]) if rng.random() < 0.95 else "direct"
        passive = rng.random() < 0.15
        return [Call(c, n, "exchange.declare", (exchange, kind_of, passive, False, False))]
    if kind in ("bind", "unbind"):
        arguments = "none" if rng.random() < 0.8 else rng.choice(list(ARGUMENTS))
        return [
            Call(c, n, f"queue.{kind}", (queue, exchange, rng.choice([queue, "k", "#"]), arguments))
        ]
    if kind == "purge":
        return [Call(c, n, "queue.purge", (queue,))]
    if kind == "delete queue":
        return [Call(c, n, "queue.delete", (queue, rng.random() < 0.2, rng.random() < 0.2))]
    if kind == "delete exchange":
        return [Call(c, n, "exchange.delete", (exchange, rng.random() < 0.3))]
    if kind == "get":
        return [Call(c, n, "basic.get", (queue, rng.random() < 0.6))]
    if kind == "consume":
        tag = "" if rng.random() < 0.5 else rng.choice(["t1", "t2"])
        return [Call(c, n, "basic.consume", (queue, tag, rng.random() < 0.5, rng.random() < 0.1))]
    if kind == "cancel":
        return [Call(c, n, "basic.cancel", (rng.randrange(3),))]
    if kind == "ack":
        method = rng.choice(["ack", "ack", "nack", "reject"])
        which = rng.choice([-1, 0, None]) if method != "reject" else rng.choice([-1, 0])
        multiple = which is None or rng.random() < 0.3
        step = Acknowledge(c, n, method, which, multiple, rng.random() < 0.7)
        return [step, sync]
    if kind == "recover":
        return [Call(c, n, "basic.recover")]
    if kind == "qos":
        return [Call(c, n, "basic.qos", (rng.choice([0, 1, 5, 100]), rng.random() < 0.3))]
    if kind == "confirm":
        return [Call(c, n, "confirm.select")]
    return [Call(c, n, rng.choice(["tx.select", "tx.select", "tx.commit", "tx.rollback"]))]

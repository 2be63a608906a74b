"""Two observations of one program, made comparable, and their first difference.

Normalised: names the broker generates (queues, consumer tags) by order of appearance and
the run's name prefix; and, each exactly and no more, the differences `docs/differences.md`
lists that a program can meet (INTENDED).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .runner import Observation
from .wire import Event

GENERATED = re.compile(r"amq\.(gen|ctag)-[A-Za-z0-9_\-]{22}")
Normal = tuple[Any, ...]

#: The entries of docs/differences.md (their bold titles) that the normalisation forgives,
#: each in one place below: `_start`, `_unwrapped`, and `AFTER_CLOSE` in `normalise`.
INTENDED = (
    "The Connection.Start is the proxy's.",
    "Error texts with long Erlang terms.",
    "After a client's Connection.Close, nothing but Connection.CloseOk (and the Channel.Close "
    "of a publish that failed) reaches it.",
)
#: after the client's Connection.Close, only these still reach it
AFTER_CLOSE = ("Channel.Close", "Connection.Close", "Connection.CloseOk", "socket closed")


def _unwrapped(text: str) -> str:
    """RabbitMQ prints some terms with ~p, which wraps lines: the proxy writes one line."""
    return re.sub(r"\n\s*", "", text)


def _start(fields: dict[str, Any]) -> dict[str, Any]:
    """Connection.Start: the server properties name the proxy; their capabilities, the
    mechanisms, the locales and the version must be the broker's."""
    properties = fields.get("server_properties") or {}
    return {**fields, "server_properties": {"capabilities": properties.get("capabilities")}}


@dataclass
class Normalised:
    #: (client, connection, channel) -> events, each (step, normalised event)
    channels: dict[tuple[int, int, int], list[tuple[int, Normal]]]
    queues: dict[str, Any]


def normalise(observation: Observation, prefix: str) -> Normalised:
    names: dict[str, str] = {}

    def text(value: str) -> str:
        value = _unwrapped(value.replace(prefix, "P"))
        return GENERATED.sub(
            lambda m: names.setdefault(m.group(0), f"{m.group(1)}#{len(names)}"), value
        )

    def value(v: Any) -> Any:
        if isinstance(v, str):
            return text(v)
        if isinstance(v, bytes):
            return text(v.decode("utf-8", "surrogateescape"))
        return v

    channels: dict[tuple[int, int, int], list[tuple[int, Normal]]] = {}
    for client, wires in observation.clients.items():
        for number, log in enumerate(wires):
            closed = ended = False
            for channel, event in log:
                if event.name == "client sent Connection.Close":
                    closed = True
                    continue
                if closed and event.name not in AFTER_CLOSE:
                    continue
                if event.name == "socket closed" and ended:
                    continue  # when the server closes its socket after a close: timing
                ended = ended or event.name in ("Connection.Close", "Connection.CloseOk")
                channels.setdefault((client, number, channel), []).append(
                    (event.step, _event(event, value))
                )
    queues = {name: value_of(messages, value) for name, messages in observation.queues.items()}
    return Normalised(channels, queues)


def value_of(messages: Any, value: Any) -> Any:
    if messages is None:
        return None
    return [(value(body), value(props), redelivered) for body, props, redelivered in messages]


def _event(event: Event, value: Any) -> Normal:
    raw = _start(event.fields) if event.name == "Connection.Start" else event.fields
    fields = tuple(sorted((k, _hashable(value(v))) for k, v in raw.items()))
    return (event.name, fields, event.properties.hex(), value(event.body))


def _hashable(v: Any) -> Any:
    if isinstance(v, dict):
        return tuple(sorted((k, _hashable(x)) for k, x in v.items()))
    if isinstance(v, list):
        return tuple(_hashable(x) for x in v)
    return v


@dataclass
class Difference:
    where: str
    kind: str
    step: int
    reference: list[Normal]
    candidate: list[Normal]


def first_difference(
    reference: Normalised, candidate: Normalised, actors: list[int]
) -> Difference | None:
    """The earliest difference (by the step it happened at), classified."""
    found: list[Difference] = []
    for key in sorted(set(reference.channels) | set(candidate.channels)):
        a = reference.channels.get(key, [])
        b = candidate.channels.get(key, [])
        for i in range(max(len(a), len(b))):
            ea = a[i] if i < len(a) else None
            eb = b[i] if i < len(b) else None
            if ea is None or eb is None or ea[1] != eb[1]:
                step = min(e[0] for e in (ea, eb) if e is not None)
                client, connection, channel = key
                where = f"client {client}, connection {connection + 1}, channel {channel}"
                kind = _classify(
                    ea, eb, client, actors[step] if 0 <= step < len(actors) else client
                )
                found.append(
                    Difference(where, kind, step, [e[1] for e in a[max(0, i - 2) : i + 3]],
                               [e[1] for e in b[max(0, i - 2) : i + 3]])
                )  # fmt: skip
                break
    if found:
        return min(found, key=lambda d: d.step)
    for name in sorted(set(reference.queues) | set(candidate.queues)):
        a, b = reference.queues.get(name), candidate.queues.get(name)
        if a != b:
            if a is not None and b is not None and len(b) < len(a):
                kind = "message lost"
            elif a is not None and b is not None and len(b) > len(a):
                kind = "message duplicated"
            else:
                kind = "other"
            return Difference(f"queue {name} at the end", kind, len(actors), [a], [b])
    return None


def _is_error(event: Normal | None) -> bool:
    return event is not None and event[0] in (
        "Channel.Close",
        "Connection.Close",
        "socket closed",
        "timeout",
    )


def _classify(
    a: tuple[int, Normal] | None, b: tuple[int, Normal] | None, client: int, actor: int
) -> str:
    ea = a[1] if a else None
    eb = b[1] if b else None
    if client != actor and (_is_error(eb) or (eb is None)):
        return "another client affected"
    if _is_error(ea) and _is_error(eb):
        return "wrong code"
    if _is_error(eb):
        return "spurious error"
    if _is_error(ea):
        return "missing error"
    if (
        ea is not None
        and ea[0] in ("Basic.Deliver", "Basic.GetOk")
        and (eb is None or eb[0] != ea[0])
    ):
        return "message lost"
    return "other"


def report(
    program_text: str, difference: Difference, reference_name: str, candidate_name: str
) -> str:
    lines = [
        "program:",
        program_text,
        "",
        f"first difference: {difference.kind}, at step {difference.step + 1}, {difference.where}",
        f"  {reference_name}:",
        *(f"    {e!r}" for e in difference.reference),
        f"  {candidate_name}:",
        *(f"    {e!r}" for e in difference.candidate),
    ]
    return "\n".join(lines)

"""AMQP 0-9-1 reply codes: the name each one's reply text starts with, and which close a whole
connection (hard errors) or only a channel (soft errors)."""

from __future__ import annotations

#: The name each AMQP reply code's text starts with (AMQP 0-9-1, 1.9: "constants").
REPLY_NAMES: dict[int, str] = {
    311: "CONTENT_TOO_LARGE",
    312: "NO_ROUTE",
    313: "NO_CONSUMERS",
    320: "CONNECTION_FORCED",
    402: "INVALID_PATH",
    403: "ACCESS_REFUSED",
    404: "NOT_FOUND",
    405: "RESOURCE_LOCKED",
    406: "PRECONDITION_FAILED",
    501: "FRAME_ERROR",
    502: "SYNTAX_ERROR",
    503: "COMMAND_INVALID",
    504: "CHANNEL_ERROR",
    505: "UNEXPECTED_FRAME",
    506: "RESOURCE_ERROR",
    530: "NOT_ALLOWED",
    540: "NOT_IMPLEMENTED",
    541: "INTERNAL_ERROR",
}
#: Codes that close a whole connection ("hard errors"), and those that close a channel.
HARD_ERRORS = frozenset((320, 402, 501, 502, 503, 504, 505, 506, 530, 540, 541))
SOFT_ERRORS = frozenset((311, 312, 313, 403, 404, 405, 406))

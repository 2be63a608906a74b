"""amqproxy-mp: a multi-process AMQP 0-9-1 proxy with upstream connection and channel pooling."""

__version__ = "0.1.0"

"""Support code for the test suites (not tests): import what a test needs from the module
that owns it, e.g. ``from tests.support.broker import Names``.

- ``util``: the repository root, unique names, free ports, polling (``wait_for``)
- ``broker``: RabbitMQ itself: its address, rabbitmqctl, what it reports, the vhosts, users,
  queues and exchanges tests create on it
- ``targets``: where clients under test connect (a proxy, or RabbitMQ in direct mode)
- ``proxy``: the proxy under test as a process, its environment and its upstream connections
- ``proxy_http``: the proxy's HTTP endpoint (/metrics, /pools, ...)
- ``memory``: resident memory of the proxy's workers
- ``raw_client``: a raw-socket AMQP client, for what no client library would send
- ``pika_client``: helpers for tests that drive pika, and a bystander pika client
- ``reply_codes``: AMQP reply codes, their names, hard and soft errors
- ``relay``: a TCP relay in front of the broker that can hold the broker's answers
- ``fuzz_strategies``: the Hypothesis strategies of the hostile-client fuzz test
"""

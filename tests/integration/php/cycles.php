<?php
// The PHP-FPM pattern for a while, counting what fails: (connect, channel, publish, disconnect)
// again and again with php-amqp.
// usage: php cycles.php HOST PORT USER PASSWORD VHOST ROUTING_KEY SECONDS
// Prints one JSON line per cycle: {"t": start (unix s), "connect_ms": ..., "ok": bool,
// "ms": the whole cycle and "body": the (persistent) message's (when ok), "error": "..."
// (when not)}; a failed cycle is followed by the next one at once.
require __DIR__ . '/connection.php';

[, , , , , , $routingKey, $seconds] = $argv;
$end = microtime(true) + (float)$seconds;
$i = 0;
while (microtime(true) < $end) {
    $start = microtime(true);
    $connectMs = null;
    try {
        $conn = amqp_connection($argv);
        $conn->connect();
        $connectMs = (microtime(true) - $start) * 1000;
        $channel = new AMQPChannel($conn);
        $exchange = new AMQPExchange($channel);
        $exchange->setName('');
        $body = sprintf('cycle-%d-%06d', getmypid(), $i);
        $exchange->publish($body, $routingKey, AMQP_NOPARAM, ['delivery_mode' => 2]);
        $conn->disconnect();
        echo json_encode(['t' => $start, 'connect_ms' => $connectMs, 'ok' => true,
            'ms' => (microtime(true) - $start) * 1000, 'body' => $body]), "\n";
    } catch (Throwable $e) {
        echo json_encode(['t' => $start, 'connect_ms' => $connectMs, 'ok' => false,
            'error' => get_class($e) . ': ' . $e->getMessage()]), "\n";
    }
    $i++;
}

<?php
// The PHP-FPM pattern: N x (connect, open channel, publish, disconnect) with php-amqp.
// usage: php publish_loop.php HOST PORT USER PASSWORD VHOST ROUTING_KEY COUNT
// Publishes bodies "msg-0000", "msg-0001", ... to the default exchange.
// Prints a JSON object {"published": N} on success; exits 1 with a JSON error otherwise.
require __DIR__ . '/connection.php';

[, , , , , , $routingKey, $count] = $argv;
$count = (int)$count;
$published = 0;
try {
    for ($i = 0; $i < $count; $i++) {
        $conn = amqp_connection($argv);
        $conn->connect();
        $channel = new AMQPChannel($conn);
        $exchange = new AMQPExchange($channel);
        $exchange->setName('');
        $exchange->publish(sprintf('msg-%04d', $i), $routingKey, AMQP_NOPARAM,
            ['content_type' => 'text/plain', 'delivery_mode' => 2]);
        $conn->disconnect();
        $published++;
    }
} catch (Throwable $e) {
    echo json_encode(['published' => $published, 'class' => get_class($e),
        'code' => $e->getCode(), 'message' => $e->getMessage()]), "\n";
    exit(1);
}
echo json_encode(['published' => $published]), "\n";

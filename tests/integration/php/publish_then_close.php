<?php
// Publishes one message to EXCHANGE, then closes the channel (CLOSE=channel) or the connection
// (CLOSE=connection) at once, and reports what php-amqp raised, if anything, as JSON.
// usage: php publish_then_close.php HOST PORT USER PASSWORD VHOST EXCHANGE ROUTING_KEY CLOSE
require __DIR__ . '/connection.php';

[, , , , , , $exchangeName, $routingKey, $close] = $argv;
$stage = 'connect';
try {
    $conn = amqp_connection($argv);
    $conn->connect();
    $channel = new AMQPChannel($conn);
    $exchange = new AMQPExchange($channel);
    $exchange->setName($exchangeName);
    $stage = 'publish';
    $exchange->publish('body', $routingKey);
    $stage = 'close';
    if ($close === 'channel') {
        $channel->close();
    }
    $conn->disconnect();
    echo json_encode(['raised' => false]), "\n";
} catch (Throwable $e) {
    echo json_encode(['raised' => true, 'stage' => $stage, 'class' => get_class($e),
        'code' => $e->getCode(), 'message' => $e->getMessage()]), "\n";
}

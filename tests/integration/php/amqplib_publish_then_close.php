<?php
// php-amqplib: publishes one message to EXCHANGE, then closes the channel (CLOSE=channel) or
// just the connection (CLOSE=connection), and reports what was raised, if anything, as JSON.
// usage: php amqplib_publish_then_close.php HOST PORT USER PASSWORD VHOST EXCHANGE ROUTING_KEY CLOSE
require_once '/usr/share/php/PhpAmqpLib/autoload.php';

use PhpAmqpLib\Connection\AMQPStreamConnection;
use PhpAmqpLib\Message\AMQPMessage;

[, $host, $port, $user, $password, $vhost, $exchange, $routingKey, $close] = $argv;
$stage = 'connect';
try {
    $conn = new AMQPStreamConnection($host, (int)$port, $user, $password, $vhost);
    $channel = $conn->channel();
    $stage = 'publish';
    $channel->basic_publish(new AMQPMessage('body'), $exchange, $routingKey);
    $stage = 'close';
    if ($close === 'channel') {
        $channel->close();
    }
    $conn->close();
    echo json_encode(['raised' => false]), "\n";
} catch (Throwable $e) {
    echo json_encode(['raised' => true, 'stage' => $stage, 'class' => get_class($e),
        'code' => $e->getCode(), 'message' => $e->getMessage()]), "\n";
}

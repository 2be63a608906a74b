<?php
// php-amqplib: connects with MECHANISM (PLAIN or AMQPLAIN) and reports the outcome as JSON.
// usage: php amqplib_connect_error.php HOST PORT USER PASSWORD VHOST MECHANISM
require_once '/usr/share/php/PhpAmqpLib/autoload.php';

use PhpAmqpLib\Connection\AMQPStreamConnection;

[, $host, $port, $user, $password, $vhost, $mechanism] = $argv;
try {
    $conn = new AMQPStreamConnection($host, (int)$port, $user, $password, $vhost,
        false, $mechanism, null, 'en_US', 10.0, 10.0);
    $conn->channel();
    $conn->close();
    echo json_encode(['raised' => false]), "\n";
} catch (Throwable $e) {
    echo json_encode(['raised' => true, 'class' => get_class($e), 'code' => $e->getCode(),
        'message' => $e->getMessage()]), "\n";
}

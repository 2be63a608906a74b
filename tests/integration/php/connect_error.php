<?php
// Connects with php-amqp and reports the outcome as JSON.
// usage: php connect_error.php HOST PORT USER PASSWORD VHOST
require __DIR__ . '/connection.php';

$conn = amqp_connection($argv);
try {
    $conn->connect();
    $channel = new AMQPChannel($conn);
    echo json_encode(['connected' => true]), "\n";
    $conn->disconnect();
} catch (Throwable $e) {
    echo json_encode(['connected' => false, 'class' => get_class($e),
        'code' => $e->getCode(), 'message' => $e->getMessage()]), "\n";
}

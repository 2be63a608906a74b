<?php
// Connects with php-amqp and reports the outcome as JSON.
// usage: php connect_error.php HOST PORT USER PASSWORD VHOST
[$_, $host, $port, $user, $password, $vhost] = $argv;
$conn = new AMQPConnection([
    'host' => $host,
    'port' => (int)$port,
    'login' => $user,
    'password' => $password,
    'vhost' => $vhost,
    'connect_timeout' => 10,
    'read_timeout' => 10,
    'write_timeout' => 10,
]);
try {
    $conn->connect();
    $channel = new AMQPChannel($conn);
    echo json_encode(['connected' => true]), "\n";
    $conn->disconnect();
} catch (Throwable $e) {
    echo json_encode(['connected' => false, 'class' => get_class($e),
        'code' => $e->getCode(), 'message' => $e->getMessage()]), "\n";
}

<?php
// The PHP-FPM pattern: N x (connect, open channel, publish, disconnect) with php-amqp.
// usage: php publish_loop.php HOST PORT USER PASSWORD VHOST ROUTING_KEY COUNT
// Publishes bodies "msg-0000", "msg-0001", ... to the default exchange.
// Prints a JSON object {"published": N} on success; exits 1 with a JSON error otherwise.
[$_, $host, $port, $user, $password, $vhost, $routingKey, $count] = $argv;
$count = (int)$count;
$published = 0;
try {
    for ($i = 0; $i < $count; $i++) {
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

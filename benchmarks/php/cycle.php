<?php
// The PHP-FPM pattern with php-amqp: COUNT x (connect, AMQPChannel, publish 100 B, disconnect),
// timed one by one with hrtime. Prints JSON: cycles, total_s, p50_ms, p99_ms.
// usage: php cycle.php HOST PORT USER PASSWORD VHOST ROUTING_KEY COUNT [DELIVERY_MODE]
[$_, $host, $port, $user, $password, $vhost, $routingKey, $count] = $argv;
$deliveryMode = (int)($argv[8] ?? 1);
$count = (int)$count;
$body = str_repeat('x', 100);
$times = [];
try {
    $start = hrtime(true);
    for ($i = 0; $i < $count; $i++) {
        $t0 = hrtime(true);
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
        $exchange->publish($body, $routingKey, AMQP_NOPARAM, ['delivery_mode' => $deliveryMode]);
        $conn->disconnect();
        $times[] = hrtime(true) - $t0;
    }
    $total = (hrtime(true) - $start) / 1e9;
} catch (Throwable $e) {
    echo json_encode(['error' => get_class($e) . ': ' . $e->getMessage(),
        'cycles' => count($times)]), "\n";
    exit(1);
}
sort($times);
$n = count($times);
echo json_encode([
    'cycles' => $n,
    'total_s' => $total,
    'p50_ms' => $n ? $times[intdiv($n, 2)] / 1e6 : 0,
    'p99_ms' => $n ? $times[min($n - 1, (int)($n * 0.99))] / 1e6 : 0,
]), "\n";

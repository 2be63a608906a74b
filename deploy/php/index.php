<?php
// One AMQP message per HTTP request, published through amqproxy with php-amqp: the
// short-lived-connection pattern amqproxy exists for. Each request connects to the proxy
// (loopback or the compose network), publishes one persistent message and disconnects; the
// proxy keeps the connection to RabbitMQ open and shared.
//
// Settings (environment, or fastcgi_param from nginx):
//   AMQP_HOST (amqproxy), AMQP_PORT (5673), AMQP_USER (guest), AMQP_PASSWORD (guest),
//   AMQP_VHOST (/), AMQP_QUEUE (requests)
// Request: GET or POST /?id=ANYTHING (the id goes into the message; a random one otherwise).
// Response: 200 {"published":true,"id":...,"queue":...}, or 503 {"published":false,"error":...}.

declare(strict_types=1);

function setting(string $name, string $default): string
{
    $value = getenv($name);
    return ($value === false || $value === '') ? $default : $value;
}

header('Content-Type: application/json');
$id = isset($_GET['id']) ? (string) $_GET['id'] : bin2hex(random_bytes(8));
$queue = setting('AMQP_QUEUE', 'requests');

try {
    $connection = new AMQPConnection([
        'host' => setting('AMQP_HOST', 'amqproxy'),
        'port' => (int) setting('AMQP_PORT', '5673'),
        'login' => setting('AMQP_USER', 'guest'),
        'password' => setting('AMQP_PASSWORD', 'guest'),
        'vhost' => setting('AMQP_VHOST', '/'),
        'connect_timeout' => 5,
        'read_timeout' => 5,
        'write_timeout' => 5,
    ]);
    $connection->connect();
    $channel = new AMQPChannel($connection);

    // Idempotent: makes the demo work on an empty broker. Drop it where the queue is
    // declared elsewhere, to save the round trip.
    $q = new AMQPQueue($channel);
    $q->setName($queue);
    $q->setFlags(AMQP_DURABLE);
    $q->declareQueue();

    $body = json_encode([
        'id' => $id,
        'uri' => $_SERVER['REQUEST_URI'] ?? '',
        'time' => microtime(true),
        'pid' => getmypid(),
    ]);
    $exchange = new AMQPExchange($channel); // the default exchange: routing key = queue name
    $exchange->publish($body, $queue, AMQP_NOPARAM, [
        'content_type' => 'application/json',
        'delivery_mode' => 2,
        'message_id' => $id,
    ]);
    $connection->disconnect();
    echo json_encode(['published' => true, 'id' => $id, 'queue' => $queue]), "\n";
} catch (AMQPException $e) {
    http_response_code(503);
    error_log('amqp publish failed: ' . get_class($e) . ': ' . $e->getMessage());
    echo json_encode(['published' => false, 'id' => $id, 'error' => $e->getMessage()]), "\n";
}

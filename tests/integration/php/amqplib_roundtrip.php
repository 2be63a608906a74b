<?php
// php-amqplib (AMQPLAIN login by default): connect, publish a message to QUEUE through the
// default exchange, basic_get it back, close. Prints JSON.
// usage: php amqplib_roundtrip.php HOST PORT USER PASSWORD VHOST QUEUE BODY_HEX
require_once '/usr/share/php/PhpAmqpLib/autoload.php';

use PhpAmqpLib\Connection\AMQPStreamConnection;
use PhpAmqpLib\Message\AMQPMessage;

[$_, $host, $port, $user, $password, $vhost, $queue, $bodyHex] = $argv;
try {
    $conn = new AMQPStreamConnection($host, (int)$port, $user, $password, $vhost,
        false, 'AMQPLAIN', null, 'en_US', 10.0, 10.0);
    $ch = $conn->channel();
    $msg = new AMQPMessage(hex2bin($bodyHex), ['content_type' => 'application/octet-stream',
        'message_id' => 'php-amqplib-1']);
    $ch->basic_publish($msg, '', $queue);
    $got = null;
    for ($i = 0; $i < 100 && $got === null; $i++) {
        $got = $ch->basic_get($queue, true);
        if ($got === null) {
            usleep(20000);
        }
    }
    $out = ['connected' => true, 'login_method' => 'AMQPLAIN'];
    if ($got !== null) {
        $out['body_hex'] = bin2hex($got->getBody());
        $props = $got->get_properties();
        $out['content_type'] = $props['content_type'] ?? null;
        $out['message_id'] = $props['message_id'] ?? null;
    }
    $ch->close();
    $conn->close();
    echo json_encode($out), "\n";
} catch (Throwable $e) {
    echo json_encode(['connected' => false, 'class' => get_class($e),
        'code' => $e->getCode(), 'message' => $e->getMessage()]), "\n";
}

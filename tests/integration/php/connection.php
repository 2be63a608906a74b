<?php
// The php-amqp connection the test scripts open, from their first five arguments:
// HOST PORT USER PASSWORD VHOST (10 s timeouts). Not connected yet.
function amqp_connection(array $argv): AMQPConnection
{
    [, $host, $port, $user, $password, $vhost] = $argv;
    return new AMQPConnection([
        'host' => $host,
        'port' => (int)$port,
        'login' => $user,
        'password' => $password,
        'vhost' => $vhost,
        'connect_timeout' => 10,
        'read_timeout' => 10,
        'write_timeout' => 10,
    ]);
}

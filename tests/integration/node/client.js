// node amqplib, driven by the Python tests: runs one scenario and prints one JSON line.
// usage: node client.js SCENARIO URL [ARGS...]
//   connect                      connect and close
//   publish_then_close EXCHANGE  publish one message to EXCHANGE, close the channel at once
//   php_pattern QUEUE COUNT      COUNT x (connect, channel, publish to QUEUE, close)
'use strict';
const amqp = require('amqplib');

function report(error) {
  return {
    raised: true,
    class: error.constructor.name,
    code: error.code === undefined ? null : error.code,
    message: error.message,
  };
}

async function run(scenario, url, args) {
  if (scenario === 'connect') {
    const conn = await amqp.connect(url);
    await conn.close();
    return { raised: false };
  }
  if (scenario === 'publish_then_close') {
    const conn = await amqp.connect(url);
    const closed = new Promise((resolve) => conn.on('error', resolve));
    try {
      const ch = await conn.createChannel();
      ch.on('error', () => {}); // the close below reports it
      ch.publish(args[0], 'rk', Buffer.from('body'));
      await ch.close();
      await conn.close();
      return { raised: false };
    } catch (error) {
      await Promise.race([closed, new Promise((r) => setTimeout(r, 100))]);
      try { await conn.close(); } catch (ignored) { /* already closed */ }
      return report(error);
    }
  }
  if (scenario === 'php_pattern') {
    const count = Number(args[1]);
    for (let i = 0; i < count; i++) {
      const conn = await amqp.connect(url);
      const ch = await conn.createChannel();
      ch.sendToQueue(args[0], Buffer.from(`msg-${String(i).padStart(4, '0')}`));
      await ch.close();
      await conn.close();
    }
    return { raised: false, published: count };
  }
  throw new Error(`unknown scenario ${scenario}`);
}

const [scenario, url, ...args] = process.argv.slice(2);
run(scenario, url, args)
  .then((result) => console.log(JSON.stringify(result)))
  .catch((error) => console.log(JSON.stringify(report(error))))
  .finally(() => process.exit(0));

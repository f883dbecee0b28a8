// Publishes messages with Node's amqplib: a client that is not pika, so the worker meets
// what other publishers really put on the wire (jobtide_testbed.amqpclient runs it).
//
// Standard input: {"url": AMQP URL, "queues": [queue, ...], "messages": [message, ...]}.
// Each message goes to every queue (the default exchange) on a confirm channel, in order:
//   {"body": BYTES, "properties": {amqplib's publish options: contentType, headers, ...}}
// JSON cannot carry everything AMQP can, so values are written as:
//   BYTES       {"base64": "..."} or {"repeat": "text", "times": N} (the text N times)
//   in headers  {"!bytes": "<base64>"}: a byte array (field tag x);
//               {"!bigint": "<decimal>"}: a signed 64-bit integer beyond a double (tag l);
//               {"!": TYPE, "value": V}: amqplib's own way to name a field type
//               (timestamp, decimal, float, double, int8, uint8, int16, uint16, ...);
//               for float and double, V may be "NaN", "Infinity" or "-Infinity"
//   timestamp   a number (the property; seconds since the epoch)
// Standard output: {"published": N, "confirmed": N} once the broker confirmed every one.
'use strict';

const amqp = require('amqplib');

function body(spec) {
  if (Object.hasOwn(spec, 'base64')) return Buffer.from(spec.base64, 'base64');
  if (Object.hasOwn(spec, 'repeat')) return Buffer.from(spec.repeat.repeat(spec.times), 'utf8');
  throw new TypeError(`a body is {"base64": ...} or {"repeat": ..., "times": N}, got ${JSON.stringify(spec)}`);
}

// Header values as amqplib encodes them.
function field(value) {
  if (Array.isArray(value)) return value.map(field);
  if (value === null || typeof value !== 'object') return value;
  if (Object.hasOwn(value, '!bytes')) return Buffer.from(value['!bytes'], 'base64');
  if (Object.hasOwn(value, '!bigint')) return { '!': 'int64', value: BigInt(value['!bigint']) };
  if (Object.hasOwn(value, '!')) {
    const floating = ['float', 'double', 'float64'].includes(value['!']);
    return floating && typeof value.value === 'string' ? { ...value, value: Number(value.value) } : value;
  }
  return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, field(v)]));
}

function options(properties) {
  const out = { ...properties };
  if (out.headers !== undefined) out.headers = field(out.headers);
  return out;
}

async function main() {
  const chunks = [];
  for await (const chunk of process.stdin) chunks.push(chunk);
  const request = JSON.parse(Buffer.concat(chunks).toString('utf8'));
  const connection = await amqp.connect(request.url);
  try {
    const channel = await connection.createConfirmChannel();
    let published = 0;
    for (const message of request.messages) {
      const content = body(message.body);
      const props = options(message.properties || {});
      for (const queue of request.queues) {
        channel.sendToQueue(queue, content, props);
        published++;
      }
    }
    // Rejects when the broker nacks any of them.
    await channel.waitForConfirms();
    process.stdout.write(`${JSON.stringify({ published, confirmed: published })}\n`);
    await channel.close();
  } finally {
    await connection.close();
  }
}

main().catch((error) => {
  process.stderr.write(`amqp_publish: ${error.stack || error}\n`);
  process.exit(1);
});

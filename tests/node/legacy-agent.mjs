// A legacy DMR agent for the tests, behaving as the original TypeScript agent does
// (apps/dmr-agent: socket.io-client v4, RS256 handshake JWT, jose JWS-in-JWE payloads, acks).
// Differences, on purpose: a fresh token per connection attempt (the original's refresh handler
// never runs), and a few test knobs. It prints one JSON line per notable event on stdout.
//
// Environment: DMR_SERVER_WEBSOCKET_URL, WEB_SOCKET_NAMESPACE, AGENT_ID, AGENT_PRIVATE_KEY,
// OUTGOING_MESSAGE_ENDPOINT, MESSAGE_DELIVERY_TIMEOUT_MS, PORT (0 = any; printed).
// Knobs: TOKEN_MODE=valid|expired|garbage|none, TOKEN_KEY (PEM to sign the token with instead),
// TOKEN_KID (kid/sub to claim instead of AGENT_ID), TRANSPORTS=polling|websocket (default: both,
// polling first, like the original), DROP_ON_FIRST_DELIVERY=1 (drop the transport instead of
// acking the first delivery, then reconnect), AUTH_HEADER=1 (send the token as a Bearer header),
// TOKEN_ONCE=1 + TOKEN_TTL=s (one start-up token, like the original), DROP_AFTER_MS (drop the transport once),
// TOKEN (use exactly this token), ASYNC_DIRECTORY_MS (store the full list only after this delay, as
// the original's asynchronous handler may: deliveries arriving before it find no sender).
// It reports the server's `dmr:error` (why it is about to be disconnected) as `server_error`.
import http from 'node:http';
import { io } from 'socket.io-client';
import { CompactEncrypt, SignJWT, compactDecrypt, importPKCS8, importSPKI, jwtVerify } from 'jose';

const env = process.env;
const agentId = env.AGENT_ID;
const privateKeyPem = env.AGENT_PRIVATE_KEY.replace(/\\n/g, '\n');
const timeoutMs = Number(env.MESSAGE_DELIVERY_TIMEOUT_MS || 2000);
const namespace = env.WEB_SOCKET_NAMESPACE || '/v1/dmr-agent-events';
let agents = [];
let dropNext = env.DROP_ON_FIRST_DELIVERY === '1';

const say = (event, extra = {}) => process.stdout.write(JSON.stringify({ event, ...extra }) + '\n');

let startupToken;
async function makeToken() {
  if (env.TOKEN_MODE === 'garbage') return 'not.a.jwt';
  if (env.TOKEN) return env.TOKEN;
  // TOKEN_ONCE=1 reproduces the original agent: one token made at start-up, reused on every attempt.
  if (env.TOKEN_ONCE === '1' && startupToken) return startupToken;
  const kid = env.TOKEN_KID || agentId;
  const key = await importPKCS8((env.TOKEN_KEY || privateKeyPem).replace(/\\n/g, '\n'), 'RS256');
  const now = Math.floor(Date.now() / 1000);
  const iat = env.TOKEN_MODE === 'expired' ? now - 3600 : now;
  const token = await new SignJWT({ sub: kid, cat: Date.now() })
    .setProtectedHeader({ alg: 'RS256', typ: 'JWT', kid })
    .setIssuedAt(iat)
    .setExpirationTime(iat + Number(env.TOKEN_TTL || 60))
    .sign(key);
  if (env.TOKEN_ONCE === '1') startupToken = token;
  return token;
}

const options = {
  reconnectionDelay: Number(env.WEBSOCKET_RECONNECTION_DELAY || 200),
  reconnectionDelayMax: Number(env.WEBSOCKET_RECONNECTION_DELAY_MAX || 1000),
  auth: env.TOKEN_MODE === 'none' || env.AUTH_HEADER === '1' ? {} : (cb) => makeToken().then((token) => cb({ token })),
};
if (env.TRANSPORTS) options.transports = [env.TRANSPORTS];
if (env.AUTH_HEADER === '1') options.extraHeaders = { Authorization: `Bearer ${await makeToken()}` };
const socket = io(env.DMR_SERVER_WEBSOCKET_URL + namespace, options);

socket.on('connect', () => say('connected', { transport: socket.io.engine.transport.name }));
if (env.DROP_AFTER_MS) setTimeout(() => { say('dropping_transport'); socket.io.engine.close(); }, Number(env.DROP_AFTER_MS));
socket.on('connect_error', (err) => say('connect_error', { message: err.message }));
socket.on('disconnect', (reason) => {
  say('disconnect', { reason });
  if (reason === 'io server disconnect') setTimeout(() => socket.connect(), options.reconnectionDelay);
});
socket.io.engine?.on?.('upgrade', (t) => say('upgrade', { transport: t.name }));
socket.on('dmr:error', (e) => say('server_error', e));
socket.on('dmr:agents:full-list', (data) => {
  const store = () => {
    agents = data[0];
    say('full-list', { ids: agents.map((a) => a.id) });
  };
  if (env.ASYNC_DIRECTORY_MS) {
    agents = [];
    setTimeout(store, Number(env.ASYNC_DIRECTORY_MS));
  } else store();
});
socket.on('dmr:agents:partial-list', (data) => {
  for (const a of data[0]) {
    agents = agents.filter((x) => x.id !== a.id);
    if (!a.deleted) agents.push(a);
  }
  say('partial-list', { ids: data[0].map((a) => a.id), deleted: data[0].filter((a) => a.deleted).map((a) => a.id) });
});

socket.on('dmr:agents:message-from-dmr-server', async (message, ack) => {
  if (dropNext) {
    dropNext = false;
    say('dropping', { id: message.id });
    socket.io.engine.close(); // a transport-level drop: the client reconnects by itself
    return;
  }
  const sender = agents.find((a) => a.id === message.senderId);
  let data;
  try {
    if (!sender) throw new Error('unknown sender');
    const { plaintext } = await compactDecrypt(message.payload, await importPKCS8(privateKeyPem, 'RSA-OAEP'));
    const { payload } = await jwtVerify(new TextDecoder().decode(plaintext), await importSPKI(sender.authenticationCertificate, 'RS256'));
    data = payload.data;
  } catch (e) {
    say('decryption_failed', { id: message.id, error: String(e.message || e) });
    ack({ status: 'error', errors: [{ type: 'DECRYPTION_FAILED', message: 'Failed to decrypt message from DMR Server' }] });
    return;
  }
  const body = { id: message.id, senderId: message.senderId, recipientId: message.recipientId, timestamp: message.timestamp, type: message.type, payload: data };
  try {
    const r = await fetch(env.OUTGOING_MESSAGE_ENDPOINT, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
    if (!r.ok) throw new Error(`status ${r.status}`);
    say('delivered', { id: message.id });
    ack({ status: 'ok' });
  } catch (e) {
    say('delivery_failed', { id: message.id });
    ack({ status: 'error', errors: [{ type: 'DELIVERY_FAILED', message: 'Failed to deliver message to External Service' }] });
  }
});

async function encrypt(payload, recipientPem) {
  const jws = await new SignJWT({ data: payload }).setProtectedHeader({ alg: 'RS256' }).sign(await importPKCS8(privateKeyPem, 'RS256'));
  return new CompactEncrypt(new TextEncoder().encode(jws))
    .setProtectedHeader({ alg: 'RSA-OAEP', enc: 'A256GCM' })
    .encrypt(await importSPKI(recipientPem, 'RSA-OAEP'));
}

async function emit(envelope) {
  if (!socket.connected) return [502, { message: 'WebSocket service is not connected to DMR server.' }];
  try {
    const ack = await socket.timeout(timeoutMs).emitWithAck('dmr:agents:message-to-dmr-server', envelope);
    return ack.status === 'ok' ? [200, ''] : [502, { message: ack.error }];
  } catch (e) {
    return [504, { message: String(e.message || e) }];
  }
}

const server = http.createServer(async (req, res) => {
  const chunks = [];
  for await (const c of req) chunks.push(c);
  const body = JSON.parse(Buffer.concat(chunks).toString('utf8') || '{}');
  let status = 404;
  let answer = '';
  if (req.method === 'POST' && req.url === '/v1/messages') {
    const recipient = agents.find((a) => a.id === body.recipientId);
    if (!recipient) [status, answer] = [500, { message: 'Internal server error' }];
    else {
      const payload = await encrypt(body.payload, recipient.authenticationCertificate);
      [status, answer] = await emit({ id: body.id, type: body.type, payload, recipientId: body.recipientId, senderId: agentId, timestamp: body.timestamp });
    }
  } else if (req.method === 'POST' && req.url === '/raw-emit') {
    // test hook: emit a malformed send (binary attachment, lone surrogate, deep nesting) and return its ack
    let data;
    if (body.kind === 'binary') data = Buffer.from([1, 2, 3]);
    else if (body.kind === 'surrogate') data = { id: '\ud800', payload: 'x' };
    else { data = []; for (let i = 0; i < 300; i++) data = [data]; }
    try {
      answer = await socket.timeout(timeoutMs).emitWithAck('dmr:agents:message-to-dmr-server', data);
      status = 200;
    } catch (e) {
      [status, answer] = [504, { message: String(e.message || e) }];
    }
  } else if (req.method === 'POST' && req.url === '/raw-envelope') {
    [status, answer] = await emit(body); // test hook: send an envelope exactly as given
  }
  res.writeHead(status, { 'content-type': 'application/json' });
  res.end(answer === '' ? '' : JSON.stringify(answer));
});
server.listen(Number(env.PORT || 0), '127.0.0.1', () => say('listening', { port: server.address().port }));
process.on('SIGTERM', () => { socket.close(); server.close(); process.exit(0); });

// A real OpenID Connect provider (panva's oidc-provider) for the querywarden test suite.
//
// Serves HTTPS on 127.0.0.1 and issues RFC 9068 JWT access tokens (header typ "at+jwt",
// RS256) through the client-credentials grant:
//
//   aud    = "querywarden" (resource server urn:querywarden, the default for every client,
//            so a token request without `resource` gets it too)
//   sub    = the client id (also in client_id)
//   groups = the client's groups (array), from the clients file
//   iss    = the issuer; exp - iat = TOKEN_TTL seconds (or the request's X-Test-Token-TTL)
//
// Options (command-line flag, else environment variable):
//   --port PORT            OIDC_PORT          TCP port on 127.0.0.1; 0 (default) = any free one
//   --issuer URL           OIDC_ISSUER        default https://127.0.0.1:<bound port>
//   --cert PATH            OIDC_TLS_CERT      PEM certificate (required)
//   --key PATH             OIDC_TLS_KEY       PEM private key (required)
//   --clients PATH         OIDC_CLIENTS_FILE  JSON [{"client_id", "client_secret", "groups": []}]
//                          OIDC_CLIENTS       the same JSON inline (when no file is given)
//   --jwks PATH            OIDC_JWKS_FILE     private JWKS ({"keys": [...]}) to start with; the
//                                             first key signs. Default: one fresh RSA-2048 key.
//   --ttl SECONDS          TOKEN_TTL          access-token lifetime, default 600
//   --watch-stdin          OIDC_WATCH_STDIN=1 exit when stdin closes (so the parent's death
//                                             never leaves this process behind)
//
// Test-only extras, all on the same HTTPS server:
//   POST /test/rotate[?keep_old=1]  a new RSA key with a new kid becomes the signing key; the
//                                   JWKS then holds only it (or it and the old ones with
//                                   keep_old=1). Answers {"kid": NEW, "kids": [PUBLISHED...]}.
//   X-Test-Token-TTL: N             request header on the token request: this token lives N s.
//   resource=querywarden            accepted as an alias of resource=urn:querywarden (RFC 8707
//                                   wants an absolute URI, so the bare audience is rewritten).
//
// Prints one line "READY https://127.0.0.1:PORT" on stdout once it is listening.

import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:https';
import { parseArgs } from 'node:util';

import Provider, { errors } from 'oidc-provider';

const AUDIENCE = 'querywarden';
const RESOURCE = 'urn:querywarden';
const BODY_LIMIT = 56 * 1024;

const { values: opts } = parseArgs({
  options: {
    port: { type: 'string' },
    issuer: { type: 'string' },
    cert: { type: 'string' },
    key: { type: 'string' },
    clients: { type: 'string' },
    jwks: { type: 'string' },
    ttl: { type: 'string' },
    'watch-stdin': { type: 'boolean' },
  },
});

function fail(message) {
  process.stderr.write(`provider.mjs: ${message}\n`);
  process.exit(2);
}

function positiveInt(text, what) {
  const value = Number(text);
  if (!Number.isSafeInteger(value) || value <= 0) fail(`${what} must be a positive integer, got ${text}`);
  return value;
}

const env = process.env;
const port = Number(opts.port ?? env.OIDC_PORT ?? 0);
if (!Number.isSafeInteger(port) || port < 0 || port > 65535) fail(`bad port ${opts.port ?? env.OIDC_PORT}`);
const certPath = opts.cert ?? env.OIDC_TLS_CERT;
const keyPath = opts.key ?? env.OIDC_TLS_KEY;
if (!certPath || !keyPath) fail('--cert and --key (or OIDC_TLS_CERT and OIDC_TLS_KEY) are required');
const defaultTtl = positiveInt(opts.ttl ?? env.TOKEN_TTL ?? '600', 'TOKEN_TTL');

function loadClients() {
  const file = opts.clients ?? env.OIDC_CLIENTS_FILE;
  const text = file ? readFileSync(file, 'utf8') : env.OIDC_CLIENTS;
  if (!text) fail('no clients: pass --clients FILE, OIDC_CLIENTS_FILE or OIDC_CLIENTS');
  const list = JSON.parse(text);
  if (!Array.isArray(list) || list.length === 0) fail('clients must be a non-empty JSON array');
  for (const c of list) {
    if (typeof c.client_id !== 'string' || typeof c.client_secret !== 'string') {
      fail('every client needs a string client_id and client_secret');
    }
    if (!Array.isArray(c.groups) || !c.groups.every((g) => typeof g === 'string')) {
      fail(`client ${c.client_id}: groups must be an array of strings`);
    }
  }
  return list;
}

const clients = loadClients();
const groupsByClient = new Map(clients.map((c) => [c.client_id, [...c.groups]]));

function newSigningKey() {
  const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = privateKey.export({ format: 'jwk' });
  return { ...jwk, kid: `qw-${Date.now().toString(36)}-${randomBytes(4).toString('hex')}`, alg: 'RS256', use: 'sig' };
}

// The private keys the provider publishes (public parts) in its JWKS; keys[0] signs.
let keys;
{
  const file = opts.jwks ?? env.OIDC_JWKS_FILE;
  keys = file ? JSON.parse(readFileSync(file, 'utf8')).keys : [newSigningKey()];
  if (!Array.isArray(keys) || keys.length === 0) fail('the JWKS file has no keys');
  keys = keys.map((k, i) => ({ ...k, kid: k.kid ?? `qw-given-${i}` }));
}

const cookieKeys = [randomBytes(32).toString('base64url')];

function tokenTtl(ctx) {
  const requested = ctx?.get?.('x-test-token-ttl');
  if (requested) {
    const value = Number(requested);
    if (Number.isSafeInteger(value) && value > 0) return value;
  }
  return defaultTtl;
}

function buildProvider(issuer) {
  const provider = new Provider(issuer, {
    clients: clients.map((c) => ({
      client_id: c.client_id,
      client_secret: c.client_secret,
      grant_types: ['client_credentials'],
      response_types: [],
      redirect_uris: [],
      token_endpoint_auth_method: c.token_endpoint_auth_method ?? 'client_secret_basic',
    })),
    jwks: { keys },
    cookies: { keys: cookieKeys },
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: async () => RESOURCE,
        getResourceServerInfo: async (_ctx, resourceIndicator) => {
          if (resourceIndicator !== RESOURCE) throw new errors.InvalidTarget();
          return {
            scope: '',
            audience: AUDIENCE,
            accessTokenFormat: 'jwt',
            // Sign with the current key explicitly, whatever else the JWKS publishes.
            jwt: { sign: { alg: 'RS256', kid: keys[0].kid } },
          };
        },
      },
    },
    extraTokenClaims: async (_ctx, token) => {
      const groups = groupsByClient.get(token.clientId);
      return groups ? { groups: [...groups] } : undefined;
    },
    ttl: {
      ClientCredentials: (ctx) => tokenTtl(ctx),
      AccessToken: (ctx) => tokenTtl(ctx),
    },
  });

  // resource=querywarden (the bare audience) → resource=urn:querywarden. oidc-provider then
  // reads the pre-read body from ctx.request.body (and says once on stderr that it did).
  provider.use(async (ctx, next) => {
    if (ctx.method === 'POST' && ctx.path === '/token' && ctx.is('application/x-www-form-urlencoded')) {
      const chunks = [];
      let size = 0;
      for await (const chunk of ctx.req) {
        size += chunk.length;
        if (size > BODY_LIMIT) ctx.throw(413);
        chunks.push(chunk);
      }
      const params = new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
      if (params.getAll('resource').length === 1 && params.get('resource') === AUDIENCE) {
        params.set('resource', RESOURCE);
      }
      ctx.request.body = params.toString();
    }
    await next();
  });
  return provider;
}

let provider;
let handle;

function sendJson(res, status, body) {
  res.writeHead(status, { 'content-type': 'application/json', 'cache-control': 'no-store' });
  res.end(JSON.stringify(body));
}

function rotate(keepOld) {
  const fresh = newSigningKey();
  keys = keepOld ? [fresh, ...keys] : [fresh];
  provider = buildProvider(provider.issuer);
  handle = provider.callback();
  return { kid: fresh.kid, kids: keys.map((k) => k.kid) };
}

const server = createServer(
  { cert: readFileSync(certPath), key: readFileSync(keyPath) },
  (req, res) => {
    const url = new URL(req.url, 'https://placeholder');
    if (url.pathname === '/test/rotate') {
      if (req.method !== 'POST') {
        sendJson(res, 405, { error: 'use POST' });
        return;
      }
      req.resume();
      const keepOld = ['1', 'true', 'yes'].includes(url.searchParams.get('keep_old') ?? '');
      sendJson(res, 200, rotate(keepOld));
      return;
    }
    handle(req, res);
  },
);

server.on('error', (err) => fail(`server error: ${err.message}`));
server.listen(port, '127.0.0.1', () => {
  const bound = server.address().port;
  const base = `https://127.0.0.1:${bound}`;
  provider = buildProvider(opts.issuer ?? env.OIDC_ISSUER ?? base);
  handle = provider.callback();
  process.stdout.write(`READY ${base}\n`);
});

function shutdown() {
  server.close();
  server.closeAllConnections();
  process.exit(0);
}

process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
if (opts['watch-stdin'] || env.OIDC_WATCH_STDIN === '1') {
  process.stdin.on('end', shutdown);
  process.stdin.on('error', shutdown);
  process.stdin.resume();
}

#!/usr/bin/env node
'use strict';
// A cardcore terminal on the command line, in Node.js, written from docs/terminal-protocol.md.
// Card numbers and PINs are read from standard input, one a line, never from the command line
// (which other users of the machine can read). Each command prints one JSON line; exit status 0
// when applied, 1 when refused, 2 when the outcome is unknown, 64 on a usage error, 65 on a bad
// input (a card number, a PIN, a file).

const fs = require('node:fs');

const { InputError } = require('./lib/crypto');
const T = require('./lib/terminal');
const { checkVectors } = require('./lib/vectors');

const USAGE = `usage: node cli.js [options] COMMAND [ARGS]

commands (standard input: the card number, then the PIN where one goes):
  open-card [--tier N]                  number, new PIN (an empty line: no PIN)
  top-up AMOUNT_MINOR                   number [, PIN]
  purchase AMOUNT_MINOR                 number, PIN
  balance                               number [, PIN]: with the PIN the balances too
  reverse ORIGINAL_REQUEST_ID ORIGINAL_CLIENT_TIME_US    number
  operation REQUEST_ID [CLIENT_TIME_US] what became of one of this terminal's requests
  check-vectors DOC.md                  this terminal against the document's worked example

options:
  --keys FILE            the keys file from 'cardcore terminals enroll' (its counter is kept there)
  --target HOST:PORT     the server (default 127.0.0.1:50051)
  --ca FILE --cert FILE --key FILE      mutual TLS: the CA, this terminal's certificate and key
  --server-name NAME     the server certificate's name when the target is an IP address
                         (cardcore's certificates always name localhost)
  --insecure             plaintext, for an --insecure development server on loopback
  --request-id ID        repeat an earlier request (default: a new UUIDv7)
  --client-time-us N     with --request-id: the earlier request's client time (default: now)
  --staff N              the salesperson to credit
  --attempts N           tries for a request whose outcome is unknown (default 3)
  --deadline-ms N        per attempt (default 10000)
  --proto-dir DIR        cardcore's proto/ folder (default: the repository's)`;

// name -> default; a boolean default makes a flag, a string or undefined one an option with a value
const OPTIONS = {
  keys: undefined, target: '127.0.0.1:50051', ca: undefined, cert: undefined, key: undefined,
  'server-name': undefined, insecure: false, 'request-id': undefined, 'client-time-us': undefined,
  staff: '0', tier: '0', attempts: '3', 'deadline-ms': '10000', 'proto-dir': T.DEFAULT_PROTO_DIR,
  help: false,
};

class UsageError extends Error {}

/** --name value, --name=value and flags, anywhere among the positional arguments. */
function parseArgs(argv) {
  const values = { ...OPTIONS };
  const positionals = [];
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (!arg.startsWith('--')) {
      positionals.push(arg);
      continue;
    }
    const [name, inline] = arg.slice(2).split(/=(.*)/s, 2);
    if (!(name in OPTIONS)) throw new UsageError(`unknown option --${name}`);
    if (typeof OPTIONS[name] === 'boolean') {
      if (inline !== undefined) throw new UsageError(`--${name} takes no value`);
      values[name] = true;
    } else if (inline !== undefined) {
      values[name] = inline;
    } else {
      if (i + 1 >= argv.length) throw new UsageError(`--${name} needs a value`);
      values[name] = argv[++i];
    }
  }
  return { values, positionals };
}

function print(doc) {
  process.stdout.write(JSON.stringify(doc) + '\n');
}

function int64(text, what) {
  if (!/^-?[0-9]{1,19}$/.test(text || '')) throw new UsageError(`${what} must be an integer`);
  return BigInt(text).toString();
}

function stdinLines() {
  let text = '';
  try {
    text = fs.readFileSync(0, 'utf8');
  } catch (err) {
    if (err.code !== 'EAGAIN' && err.code !== 'EOF') throw err;
  }
  return text.split('\n').map((s) => s.trim());
}

/** What a result shows: no card number, no PIN (the server never sends them either). */
function resultView(r) {
  const view = { reason: r.reason, type: r.type, replayed: r.replayed, seq: r.seq,
                 amount_minor: r.amount_minor, balance_after: r.balance_after };
  if (r.type === 'OPERATION_TYPE_PURCHASE') {
    Object.assign(view, { discount_minor: r.discount_minor, paid_minor: r.paid_minor,
                          points_earned: r.points_earned, remainder_due_minor: r.remainder_due_minor });
  }
  if (r.type === 'OPERATION_TYPE_REVERSAL') view.original_seq = r.original_seq;
  return view;
}

function cardView(c) {
  return { masked_number: c.masked_number, view: c.view, status: c.status, tier: c.tier,
           tier_name: c.tier_name, balance: c.balance, pin_set: c.pin_set,
           pin_locked: c.pin_locked, pin_tries: c.pin_tries };
}

async function main(argv) {
  const { values: o, positionals } = parseArgs(argv);
  const [command, ...args] = positionals;
  if (o.help || !command) {
    process.stdout.write(USAGE + '\n');
    return o.help ? 0 : 64;
  }
  if (command === 'check-vectors') {
    if (args.length !== 1) throw new UsageError('check-vectors DOC.md');
    const contract = T.loadContract(o['proto-dir']);
    const results = checkVectors(fs.readFileSync(args[0], 'utf8'), contract.definition);
    const failed = results.filter((r) => !r.ok).map((r) => (r.unknown ? `${r.name} (unknown)` : r.name));
    print({ ok: failed.length === 0, checked: results.length, failed });
    return failed.length ? 1 : 0;
  }
  if (!o.keys) throw new UsageError('--keys FILE is needed');
  const contract = T.loadContract(o['proto-dir']);
  const channelOptions = o['server-name'] ? { 'grpc.ssl_target_name_override': o['server-name'],
                                              'grpc.default_authority': o['server-name'] } : {};
  const client = new contract.CardService(o.target, T.credentials(o), channelOptions);
  const terminal = new T.Terminal(T.KeysFile.load(o.keys));
  const staffId = Number(o.staff);
  const policy = { attempts: Number(o.attempts), deadlineMs: Number(o['deadline-ms']) };
  const requestId = o['request-id'] || T.uuidv7();
  const clientTimeUs = o['client-time-us'] ? int64(o['client-time-us'], '--client-time-us') : T.nowUs();
  const lines = command === 'operation' ? [] : stdinLines();
  const number = lines[0] || '';
  const pin = lines[1] || null;

  let method;
  let build;
  switch (command) {
    case 'open-card':
      method = 'OpenCard';
      build = () => terminal.openCard({ requestId, clientTimeUs, number, pin, tier: Number(o.tier), staffId });
      break;
    case 'top-up': {
      const amountMinor = int64(args[0], 'AMOUNT_MINOR');
      method = 'TopUp';
      build = () => terminal.topUp({ requestId, clientTimeUs, number, amountMinor, pin, staffId });
      break;
    }
    case 'purchase': {
      const grossAmountMinor = int64(args[0], 'AMOUNT_MINOR');
      if (!pin) throw new UsageError('purchase reads the card number, then the PIN');
      method = 'Purchase';
      build = () => terminal.purchase({ requestId, clientTimeUs, number, grossAmountMinor, pin, staffId });
      break;
    }
    case 'balance':
      method = 'GetCard';
      build = () => terminal.getCard({ number, pin });
      break;
    case 'reverse': {
      if (args.length !== 2) throw new UsageError('reverse ORIGINAL_REQUEST_ID ORIGINAL_CLIENT_TIME_US');
      const originalClientTimeUs = int64(args[1], 'ORIGINAL_CLIENT_TIME_US');
      method = 'Reverse';
      build = () => terminal.reverse({ requestId, clientTimeUs, number, originalRequestId: args[0],
                                       originalClientTimeUs, staffId });
      break;
    }
    case 'operation': {
      if (args.length < 1) throw new UsageError('operation REQUEST_ID [CLIENT_TIME_US]');
      const request = { request_id: args[0], client_time_us: args[1] ? int64(args[1], 'CLIENT_TIME_US') : '0' };
      if (o.insecure) { // no certificate names this terminal: name its namespace (section 8)
        request.caller = { kind: 'CALLER_KIND_TERMINAL', id: terminal.keys.terminalId };
      }
      method = 'GetOperation';
      build = () => ({ request, counter: terminal.keys.counter }); // no KSN: nothing is swiped
      break;
    }
    default:
      throw new UsageError(`unknown command ${command}`);
  }
  const mutating = !['GetCard', 'GetOperation'].includes(method);
  try {
    const done = await T.call(client, contract, method, build, policy);
    const head = { rpc: method, ...(mutating ? { request_id: requestId, client_time_us: clientTimeUs } : {}),
                   ksn_counter: done.counter, attempts: done.attempts };
    if (!done.ok) {
      print({ ok: false, ...head, outcome: done.refusal.outcome, code: done.refusal.code,
              reason: done.refusal.reason, metadata: done.refusal.metadata, message: done.refusal.message });
      return done.refusal.outcome === 'unknown' ? 2 : 1;
    }
    const a = done.answer;
    if (method === 'GetCard') print({ ok: true, ...head, card: cardView(a) });
    else if (method === 'GetOperation') {
      print({ ok: true, ...head, state: a.state, result: a.found ? resultView(a.result) : null });
    } else print({ ok: true, ...head, result: resultView(a) });
    return 0;
  } finally {
    client.close();
  }
}

main(process.argv.slice(2)).then(
  (code) => { process.exitCode = code; },
  (err) => {
    // Only our own messages, which never hold a value: an error from code that handled a PIN
    // or a key is not echoed.
    const usage = err instanceof UsageError;
    const own = usage || err instanceof InputError;
    process.stderr.write(`cardcore-node-terminal: ${own ? err.message : err.constructor.name}\n`);
    if (usage) process.stderr.write('(node cli.js --help)\n');
    process.exitCode = usage ? 64 : own ? 65 : 70;
  });

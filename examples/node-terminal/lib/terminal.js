'use strict';
// A cardcore terminal after docs/terminal-protocol.md: the keys file (section 2), a fresh KSN
// per request saved before it is sent (section 3), the requests (section 7), retries with the
// same request_id and a fresh KSN (section 8), and refusals read from the status details
// (section 9).

const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');

const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const dukpt = require('./crypto');

const { InputError } = dukpt;

/** A file this terminal needs, or an InputError naming it (and never its content). */
function readFile(filePath, what) {
  try {
    return fs.readFileSync(filePath);
  } catch (err) {
    throw new InputError(`cannot read ${what} ${filePath}: ${err.code || err.constructor.name}`);
  }
}

const DEFAULT_PROTO_DIR = path.resolve(__dirname, '..', '..', '..', 'proto');
const LOCAL_PROTO_DIR = path.resolve(__dirname, '..', 'proto');
const LOADER_OPTIONS = { keepCase: true, longs: String, enums: String, defaults: true, oneofs: true };

// ---- section 2: the keys file ------------------------------------------------------------------

class KeysFile {
  constructor(doc, filePath = null) {
    this.path = filePath;
    this.terminalId = Number(doc.terminal_id);
    this.storeId = Number(doc.store_id);
    this.initialKey = Buffer.from(doc.initial_key, 'hex');
    this.initialKeyId = Buffer.from(doc.initial_key_id, 'hex');
    this.counter = Number(doc.counter || 0);
    if (this.initialKey.length !== 16 || this.initialKeyId.length !== dukpt.IKID_SIZE ||
        this.initialKeyId.readUInt32BE(4) !== this.terminalId) {
      throw new InputError('not a cardcore terminal keys file');
    }
  }

  static load(filePath) {
    let doc;
    try {
      doc = JSON.parse(readFile(filePath, 'the keys file').toString('utf8'));
    } catch (err) {
      if (err instanceof InputError) throw err;
      throw new InputError(`the keys file ${filePath} is not JSON`);
    }
    return new KeysFile(doc, filePath);
  }

  /** New file 0600, synced, renamed over the old one: a crash leaves one whole file. */
  save() {
    if (!this.path) return;
    const doc = {
      terminal_id: this.terminalId, store_id: this.storeId,
      initial_key: this.initialKey.toString('hex'), initial_key_id: this.initialKeyId.toString('hex'),
      counter: this.counter,
    };
    const tmp = `${this.path}.new`;
    fs.rmSync(tmp, { force: true });
    const fd = fs.openSync(tmp, fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_EXCL, 0o600);
    try {
      fs.writeSync(fd, JSON.stringify(doc));
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    fs.renameSync(tmp, this.path);
    const dir = fs.openSync(path.dirname(path.resolve(this.path)), 'r');
    try {
      fs.fsyncSync(dir);
    } finally {
      fs.closeSync(dir);
    }
  }
}

// ---- request ids and the clock ---------------------------------------------------------------------

/** A UUIDv7: 48 bits of Unix milliseconds, then random bits (section 7: unguessable, appending). */
function uuidv7() {
  const b = crypto.randomBytes(16);
  b.writeUIntBE(Date.now(), 0, 6);
  b[6] = (b[6] & 0x0f) | 0x70;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = b.toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** Unix time in microseconds, as a decimal string (int64 never goes through a JS number). */
function nowUs() {
  return (BigInt(Date.now()) * 1000n).toString();
}

// ---- sections 3 to 7: building requests --------------------------------------------------------------

class Terminal {
  /** `random` replaces the random source (nonce, fill): the document's vectors only. */
  constructor(keys, random = null) {
    this.keys = keys;
    this.random = random;
  }

  till(staffId = 0) {
    return { store_id: this.keys.storeId, terminal_id: this.keys.terminalId, staff_id: staffId };
  }

  /** The next counter, saved before anything is built or sent; then the KSN and its two keys. */
  transaction() {
    const keys = this.keys;
    keys.counter = dukpt.nextCounter(keys.counter);
    keys.save();
    const ksn = dukpt.ksnOf(keys.initialKeyId, keys.counter);
    return { ksn, counter: keys.counter,
             ...dukpt.transactionKeys(keys.initialKey, keys.initialKeyId, keys.counter) };
  }

  /** CardRef.secure for `number` under a fresh KSN; `pin(p)` makes PIN blocks under the same KSN.
   * The inputs are checked first: a typing error costs no counter. */
  swipe(number, ...pins) {
    dukpt.checkNumber(number);
    for (const p of pins) if (p) dukpt.checkPin(p);
    const tx = this.transaction();
    const nonce = this.random ? this.random.nonce : undefined;
    const card = { secure: { ksn: tx.ksn, encrypted_card: dukpt.encryptCardData(tx.dataKey, tx.ksn, number, nonce) } };
    const pin = (p) => (p ? dukpt.pinBlock(tx.pinKey, p, number, this.random ? this.random.fill : undefined)
                          : Buffer.alloc(0));
    return { card, pin, counter: tx.counter };
  }

  openCard({ requestId, clientTimeUs, number, pin = null, tier = 0, staffId = 0 }) {
    const s = this.swipe(number, pin);
    return { request: { request_id: requestId, card: s.card, tier, till: this.till(staffId),
                        pin_block: s.pin(pin), client_time_us: clientTimeUs }, counter: s.counter };
  }

  topUp({ requestId, clientTimeUs, number, amountMinor, pin = null, staffId = 0 }) {
    const s = this.swipe(number, pin);
    return { request: { request_id: requestId, card: s.card, amount_minor: amountMinor,
                        till: this.till(staffId), pin_block: s.pin(pin), client_time_us: clientTimeUs },
             counter: s.counter };
  }

  purchase({ requestId, clientTimeUs, number, grossAmountMinor, pin, staffId = 0 }) {
    const s = this.swipe(number, pin);
    return { request: { request_id: requestId, card: s.card, gross_amount_minor: grossAmountMinor,
                        till: this.till(staffId), pin_block: s.pin(pin), client_time_us: clientTimeUs },
             counter: s.counter };
  }

  getCard({ number, pin = null }) {
    const s = this.swipe(number, pin);
    return { request: { card: s.card, till: this.till(), pin_block: s.pin(pin) }, counter: s.counter };
  }

  reverse({ requestId, clientTimeUs, number, originalRequestId, originalClientTimeUs, staffId = 0 }) {
    const s = this.swipe(number);
    return { request: { request_id: requestId, card: s.card, original_request_id: originalRequestId,
                        till: this.till(staffId), client_time_us: clientTimeUs,
                        original_client_time_us: originalClientTimeUs }, counter: s.counter };
  }
}

// ---- the contract ----------------------------------------------------------------------------------

function loadContract(protoDir = DEFAULT_PROTO_DIR) {
  const definition = protoLoader.loadSync(
    ['cardcore/v1/card_service.proto', 'cardcore/v1/common.proto'],
    { ...LOADER_OPTIONS, includeDirs: [protoDir] });
  const root = new protobuf.Root();
  root.resolvePath = (_origin, target) => {
    if (target.startsWith('google/rpc/')) return path.join(LOCAL_PROTO_DIR, target);
    return path.join(protoDir, target);
  };
  root.loadSync(['cardcore/v1/common.proto', 'google/rpc/status.proto'], { keepCase: true });
  return {
    definition,
    CardService: grpc.loadPackageDefinition(definition).cardcore.v1.CardService,
    Status: root.lookupType('google.rpc.Status'),
    ErrorInfo: root.lookupType('google.rpc.ErrorInfo'),
    Failure: root.lookupType('cardcore.v1.Failure'),
  };
}

function credentials({ insecure, ca, cert, key }) {
  if (insecure) return grpc.credentials.createInsecure();
  if (!ca || !cert || !key) throw new InputError('mutual TLS needs --ca, --cert and --key (or --insecure)');
  return grpc.credentials.createSsl(readFile(ca, 'the CA certificate'), readFile(key, 'the private key'),
                                    readFile(cert, 'the certificate'));
}

// ---- section 9: refusals -----------------------------------------------------------------------------

const CODE_NAME = Object.fromEntries(Object.entries(grpc.status).map(([k, v]) => [v, k]));

/** {code, reason, domain, metadata, failure, message}; reason is null when the status carries no
 * details (transport failure, our own deadline): then the outcome is unknown. */
function refusalOf(err, contract) {
  const out = { code: CODE_NAME[err.code] || String(err.code), reason: null, metadata: {},
                message: err.details || '' };
  const raw = err.metadata ? err.metadata.get('grpc-status-details-bin') : [];
  if (!raw.length) return out;
  const status = contract.Status.decode(raw[0]);
  for (const any of status.details) {
    if (any.type_url === 'type.googleapis.com/google.rpc.ErrorInfo') {
      const info = contract.ErrorInfo.decode(any.value);
      Object.assign(out, { reason: info.reason, domain: info.domain, metadata: { ...info.metadata } });
    } else if (any.type_url === 'type.googleapis.com/cardcore.v1.Failure') {
      const failure = contract.Failure.toObject(contract.Failure.decode(any.value),
                                                { enums: String, longs: String });
      out.failure = { reason: failure.reason, field: failure.field || '' };
    }
  }
  return out;
}

// Section 8: what a terminal retries with the same request_id and a fresh KSN.
const RETRY_REASONS = new Set([
  'REASON_UNAVAILABLE', 'REASON_OUTCOME_UNKNOWN', 'REASON_STORAGE_UNAVAILABLE', 'REASON_OVERLOADED',
  'REASON_INTERNAL', 'REASON_DEADLINE_EXCEEDED', 'REASON_KSN_REPLAYED',
]);
const UNKNOWN_OUTCOME_CODES = new Set(['UNAVAILABLE', 'DEADLINE_EXCEEDED', 'CANCELLED', 'UNKNOWN']);

function outcomeUnknown(refusal) {
  return refusal.reason === 'REASON_OUTCOME_UNKNOWN' ||
    (refusal.reason === null && UNKNOWN_OUTCOME_CODES.has(refusal.code));
}

function retryable(refusal) {
  return RETRY_REASONS.has(refusal.reason) || outcomeUnknown(refusal);
}

function unary(client, method, request, deadlineMs) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: Date.now() + deadlineMs }, (err, answer) => {
      if (err) reject(err); else resolve(answer);
    });
  });
}

/** Call `method` with `build()` (a fresh KSN each time), retrying what section 8 says to retry.
 * Resolves {ok, answer | refusal, attempts, counter}; never throws for a refusal. */
async function call(client, contract, method, build, { attempts = 3, deadlineMs = 10000, backoffMs = 200 } = {}) {
  let last = null;
  for (let attempt = 1; attempt <= attempts; attempt++) {
    const { request, counter } = build();
    try {
      return { ok: true, answer: await unary(client, method, request, deadlineMs), attempts: attempt, counter };
    } catch (err) {
      if (typeof err.code !== 'number') throw err;
      last = { ok: false, refusal: refusalOf(err, contract), attempts: attempt, counter };
      if (!retryable(last.refusal) || attempt === attempts) break;
      await new Promise((r) => setTimeout(r, backoffMs * 2 ** (attempt - 1)));
    }
  }
  last.refusal.outcome = outcomeUnknown(last.refusal) ? 'unknown' : 'refused';
  return last;
}

module.exports = {
  KeysFile, Terminal, uuidv7, nowUs, loadContract, credentials, refusalOf, call,
  retryable, outcomeUnknown, DEFAULT_PROTO_DIR,
};

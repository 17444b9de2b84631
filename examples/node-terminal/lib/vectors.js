'use strict';
// This terminal against docs/terminal-protocol.md: every ```vector block of the document is
// recomputed here, with the document's two fixed random inputs, down to the bytes of the
// PurchaseRequest as grpc-js serializes it. An unknown vector name is a failure too: the
// document and this terminal must move together.

const dukpt = require('./crypto');

const { InputError } = dukpt;
const { KeysFile, Terminal } = require('./terminal');

/** {name: Buffer | string}: quoted values are text, others hex (spaces, # comments ignored). */
function parseVectors(text) {
  const found = {};
  for (const m of text.matchAll(/^```vector\n([\s\S]*?)^```/gm)) {
    const raw = {};
    let name = null;
    for (const line of m[1].split('\n')) {
      const content = line.split('#')[0].trimEnd();
      if (!content.trim()) continue;
      if (/^\s/.test(line)) {
        if (name === null) throw new InputError(`continuation before any name: ${line}`);
        raw[name] += ' ' + content.trim();
        continue;
      }
      const eq = content.indexOf('=');
      if (eq < 0) throw new InputError(`not a name = value line: ${line}`);
      name = content.slice(0, eq).trim();
      if (name in raw || name in found) throw new InputError(`vector ${name} appears twice`);
      raw[name] = content.slice(eq + 1).trim();
    }
    for (const [n, value] of Object.entries(raw)) {
      found[n] = value.startsWith('"') ? value.slice(1, -1) : Buffer.from(value.replace(/ /g, ''), 'hex');
    }
  }
  return found;
}

function keysFileOf(text) {
  const blocks = [...text.matchAll(/^```json keys-file\n([\s\S]*?)^```/gm)];
  if (blocks.length !== 1) throw new InputError('the document shows one keys file');
  return JSON.parse(blocks[0][1]);
}

/** [{name, ok}] for every vector of the document; `definition` is the proto-loader package. */
function checkVectors(text, definition) {
  const v = parseVectors(text);
  const results = [];
  const done = new Set();
  const eq = (name, actual) => {
    const want = v[name];
    if (want === undefined) throw new InputError(`the document has no vector ${name}`);
    const ok = Buffer.isBuffer(want) ? Buffer.isBuffer(actual) && want.equals(actual) : want === actual;
    results.push({ name, ok });
    done.add(name);
  };
  const U = dukpt.USAGE;
  const u32 = (b) => b.readUInt32BE(0);

  // section 3
  for (const name of Object.keys(v)) {
    const m = /^next_counter_after_([0-9A-F]{8})$/.exec(name);
    if (m) {
      const next = Buffer.alloc(4);
      next.writeUInt32BE(dukpt.nextCounter(parseInt(m[1], 16)));
      eq(name, next);
    }
  }

  // section 4
  const bdk = v.bdk;
  const ikid = v.initial_key_id;
  eq('bdk', bdk);
  eq('initial_key_id', ikid);
  eq('initial_key_derivation_data', dukpt.derivationData(U.INITIAL_KEY, ikid, 0));
  const ik = dukpt.initialKey(bdk, ikid);
  eq('initial_key', ik);
  eq('counter_2_pin_key', dukpt.workingKey(ik, ikid, 2, U.PIN_ENCRYPTION));
  eq('counter_FFFF0000_derivation_key', dukpt.derivationKey(ik, ikid, 0xFFFF0000));
  eq('walk_5_step_1_data', dukpt.derivationData(U.KEY_DERIVATION, ikid, 4));
  eq('walk_5_step_1_key', dukpt.aesEcb(ik, v.walk_5_step_1_data));
  eq('walk_5_step_2_data', dukpt.derivationData(U.KEY_DERIVATION, ikid, 5));
  eq('walk_5_step_2_key', dukpt.derivationKey(ik, ikid, 5));
  eq('walk_5_pin_data', dukpt.derivationData(U.PIN_ENCRYPTION, ikid, 5));
  eq('walk_5_pin_key', dukpt.workingKey(ik, ikid, 5, U.PIN_ENCRYPTION));
  eq('walk_5_data_data', dukpt.derivationData(U.DATA_ENCRYPTION, ikid, 5));
  eq('walk_5_data_key', dukpt.workingKey(ik, ikid, 5, U.DATA_ENCRYPTION));

  // section 10, the worked example: the keys file, then the terminal's own path
  const keys = new KeysFile(keysFileOf(text)); // no path: nothing is written
  if (!keys.initialKey.equals(ik) || !keys.initialKeyId.equals(ikid) || keys.counter !== 0) {
    throw new InputError("the keys file does not hold the document's initial key");
  }
  const number = v.card_number;
  const pin = v.pin;
  eq('card_number', number);
  eq('pin', pin);
  eq('request_id', v.request_id);
  const terminal = new Terminal(keys, { nonce: v.gcm_nonce, fill: v.pin_fill });
  const clientTimeUs = v.client_time_us.readBigInt64BE(0).toString();
  const { request, counter } = terminal.purchase({
    requestId: v.request_id, clientTimeUs, number, grossAmountMinor: '12345', pin, staffId: 31 });
  const counterBytes = Buffer.alloc(4);
  counterBytes.writeUInt32BE(counter);
  eq('ksn_counter', counterBytes);
  const ksn = request.card.secure.ksn;
  eq('ksn', ksn);
  eq('derivation_data', dukpt.derivationData(U.KEY_DERIVATION, ikid, u32(counterBytes)));
  const base = dukpt.derivationKey(ik, ikid, counter);
  eq('derivation_key', base);
  eq('data_key_data', dukpt.derivationData(U.DATA_ENCRYPTION, ikid, counter));
  eq('pin_key_data', dukpt.derivationData(U.PIN_ENCRYPTION, ikid, counter));
  const { dataKey, pinKey } = dukpt.transactionKeys(ik, ikid, counter);
  eq('data_key', dataKey);
  eq('pin_key', pinKey);
  const blob = request.card.secure.encrypted_card;
  eq('encrypted_card', blob);
  eq('gcm_nonce', blob.subarray(0, dukpt.NONCE_SIZE));
  eq('gcm_ciphertext', blob.subarray(dukpt.NONCE_SIZE, blob.length - dukpt.TAG_SIZE));
  eq('gcm_tag', blob.subarray(blob.length - dukpt.TAG_SIZE));
  eq('gcm_plaintext', Buffer.from(number, 'ascii'));
  eq('gcm_aad', ksn);
  const steps = {};
  const block = dukpt.pinBlock(pinKey, pin, number, v.pin_fill, steps);
  eq('pin_block', request.pin_block);
  eq('pin_fill', steps.pinField.subarray(8));
  eq('pin_field', steps.pinField);
  eq('pan_field', dukpt.panField(number));
  eq('pin_block_a', steps.a);
  eq('pin_block_b', steps.b);
  if (!block.equals(request.pin_block)) throw new InputError('PIN block differs between two builds');
  const encoded = Buffer.alloc(8);
  encoded.writeBigInt64BE(BigInt(request.client_time_us));
  eq('client_time_us', encoded);
  const serialize = definition['cardcore.v1.CardService'].Purchase.requestSerialize;
  eq('purchase_request', serialize(request));

  for (const name of Object.keys(v)) {
    if (!done.has(name)) results.push({ name, ok: false, unknown: true });
  }
  return results;
}

module.exports = { parseVectors, checkVectors };

'use strict';
// What a cardcore terminal computes for each transaction, after docs/terminal-protocol.md:
// the counter rule (section 3), AES DUKPT key derivation (section 4), AES-GCM card data
// (section 5) and ISO 9564-1 format 4 PIN blocks (section 6). node:crypto only.
//
// Keys, card numbers and PINs are Buffers and strings held by the caller: nothing here logs.

const crypto = require('node:crypto');

/** A bad input (a card number, a PIN, a used-up key): its message never holds the value. */
class InputError extends Error {}

const KSN_SIZE = 12;
const IKID_SIZE = 8;
const COUNTER_MAX = 0xFFFF0000;
const COUNTER_ONE_BITS_MAX = 16;

// X9.24-3 key usage codes (section 4); cardcore uses DATA_ENCRYPTION and PIN_ENCRYPTION.
const USAGE = Object.freeze({
  KEY_ENCRYPTION: 0x0002,
  PIN_ENCRYPTION: 0x1000,
  MAC_GENERATION: 0x2000,
  MAC_VERIFICATION: 0x2001,
  MAC_BOTH: 0x2002,
  DATA_ENCRYPTION: 0x3000,
  DATA_DECRYPTION: 0x3001,
  DATA_BOTH: 0x3002,
  KEY_DERIVATION: 0x8000,
  INITIAL_KEY: 0x8001,
});
const AES128 = 0x0002;
const AES128_BITS = 128;

// ---- section 3: the counter ----------------------------------------------------------------

function oneBits(n) {
  let count = 0;
  for (let x = BigInt(n); x > 0n; x >>= 1n) count += Number(x & 1n);
  return count;
}

function counterValid(counter) {
  return Number.isInteger(counter) && counter >= 1 && counter <= COUNTER_MAX &&
    oneBits(counter) <= COUNTER_ONE_BITS_MAX;
}

/** The next valid counter after `counter`; throws once the key is used up. */
function nextCounter(counter) {
  let c = BigInt(counter) + 1n;
  while (oneBits(c) > COUNTER_ONE_BITS_MAX) c += c & -c; // add the lowest set bit
  if (c > BigInt(COUNTER_MAX)) {
    throw new InputError("this terminal's DUKPT key is used up: enroll the till anew, under a new id");
  }
  return Number(c);
}

/** KSN = initial key ID (8 bytes) || counter (4 bytes, big-endian). */
function ksnOf(ikid, counter) {
  if (ikid.length !== IKID_SIZE || !counterValid(counter)) throw new InputError('bad IKID or counter');
  const ksn = Buffer.alloc(KSN_SIZE);
  ikid.copy(ksn, 0);
  ksn.writeUInt32BE(counter, IKID_SIZE);
  return ksn;
}

// ---- section 4: AES DUKPT ----------------------------------------------------------------------

function aesEcb(key, block) {
  const cipher = crypto.createCipheriv('aes-128-ecb', key, null);
  cipher.setAutoPadding(false);
  return Buffer.concat([cipher.update(block), cipher.final()]);
}

function aesEcbDecrypt(key, block) {
  const decipher = crypto.createDecipheriv('aes-128-ecb', key, null);
  decipher.setAutoPadding(false);
  return Buffer.concat([decipher.update(block), decipher.final()]);
}

/** The 16 bytes of derivation data: 01 | 01 | usage | 0002 | 0080 | 8 bytes of input. */
function derivationData(usage, ikid, counter) {
  const data = Buffer.alloc(16);
  data[0] = 0x01; // version
  data[1] = 0x01; // key block counter: one block for an AES-128 key
  data.writeUInt16BE(usage, 2);
  data.writeUInt16BE(AES128, 4);
  data.writeUInt16BE(AES128_BITS, 6);
  if (usage === USAGE.INITIAL_KEY) {
    ikid.copy(data, 8, 0, 8);
  } else {
    ikid.copy(data, 8, 4, 8); // the terminal id half of the IKID
    data.writeUInt32BE(counter, 12);
  }
  return data;
}

/** Host side only (a terminal never holds the BDK): IK = AES(BDK, data(8001, IKID)). */
function initialKey(bdk, ikid) {
  return aesEcb(bdk, derivationData(USAGE.INITIAL_KEY, ikid, 0));
}

/** One step per set bit of the counter, most significant first, over the partial counter. */
function derivationKey(ik, ikid, counter) {
  let key = ik;
  let partial = 0n;
  for (let bit = 31n; bit >= 0n; bit--) {
    const mask = 1n << bit;
    if (BigInt(counter) & mask) {
      partial |= mask;
      key = aesEcb(key, derivationData(USAGE.KEY_DERIVATION, ikid, Number(partial)));
    }
  }
  return key;
}

function workingKey(ik, ikid, counter, usage) {
  return aesEcb(derivationKey(ik, ikid, counter), derivationData(usage, ikid, counter));
}

/** The two keys of a transaction: card data and PIN blocks, both of the same KSN. */
function transactionKeys(ik, ikid, counter) {
  const base = derivationKey(ik, ikid, counter);
  return {
    dataKey: aesEcb(base, derivationData(USAGE.DATA_ENCRYPTION, ikid, counter)),
    pinKey: aesEcb(base, derivationData(USAGE.PIN_ENCRYPTION, ikid, counter)),
  };
}

// ---- section 5: card data ----------------------------------------------------------------------

const NONCE_SIZE = 12;
const TAG_SIZE = 16;
const CARD_NUMBER_RE = /^[0-9]{8,19}$/;

function checkNumber(number) {
  if (typeof number !== 'string' || !CARD_NUMBER_RE.test(number)) {
    throw new InputError('a card number is 8 to 19 digits');
  }
}

/** nonce || AES-128-GCM(number digits) || tag, the KSN as associated data. */
function encryptCardData(dataKey, ksn, number, nonce = crypto.randomBytes(NONCE_SIZE)) {
  checkNumber(number);
  if (nonce.length !== NONCE_SIZE) throw new InputError('a GCM nonce here is 12 bytes');
  const cipher = crypto.createCipheriv('aes-128-gcm', dataKey, nonce, { authTagLength: TAG_SIZE });
  cipher.setAAD(ksn);
  const ciphertext = Buffer.concat([cipher.update(Buffer.from(number, 'ascii')), cipher.final()]);
  return Buffer.concat([nonce, ciphertext, cipher.getAuthTag()]);
}

// ---- section 6: PIN blocks -----------------------------------------------------------------------

const PIN_RE = /^[0-9]{4,12}$/;
const FILL_SIZE = 8;

function checkPin(pin) {
  if (typeof pin !== 'string' || !PIN_RE.test(pin)) throw new InputError('a PIN is 4 to 12 digits');
}

/** 4 | length | digits | A fill to 16 nibbles | 8 random bytes. */
function pinField(pin, fill = crypto.randomBytes(FILL_SIZE)) {
  checkPin(pin);
  if (fill.length !== FILL_SIZE) throw new InputError('the PIN field fill is 8 bytes');
  const head = ('4' + pin.length.toString(16).toUpperCase() + pin).padEnd(16, 'A');
  return Buffer.concat([Buffer.from(head, 'hex'), fill]);
}

/** (length - 12, or 0) | the number, left-padded with zeros to 12 digits | 0 to 32 nibbles. */
function panField(number) {
  if (!/^[0-9]{1,19}$/.test(number)) throw new InputError('a card number is digits');
  const head = String(Math.max(0, number.length - 12)) + number.padStart(12, '0');
  return Buffer.from(head.padEnd(32, '0'), 'hex');
}

function xor(a, b) {
  const out = Buffer.alloc(a.length);
  for (let i = 0; i < a.length; i++) out[i] = a[i] ^ b[i];
  return out;
}

/** The format 4 block; `steps` receives the intermediate blocks (for the document's vectors). */
function pinBlock(pinKey, pin, number, fill = undefined, steps = undefined) {
  const field = pinField(pin, fill);
  const a = aesEcb(pinKey, field);
  const b = xor(a, panField(number));
  const block = aesEcb(pinKey, b);
  if (steps) Object.assign(steps, { pinField: field, a, b });
  return block;
}

module.exports = {
  InputError, KSN_SIZE, IKID_SIZE, COUNTER_MAX, USAGE, NONCE_SIZE, TAG_SIZE,
  oneBits, counterValid, nextCounter, ksnOf,
  aesEcb, aesEcbDecrypt, derivationData, initialKey, derivationKey, workingKey, transactionKeys,
  checkNumber, checkPin, encryptCardData, pinField, panField, pinBlock,
};

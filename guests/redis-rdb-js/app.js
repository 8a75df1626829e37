// Ferry engine plugin for Redis RDB dumps (contract ferry:engine@0.1.0),
// in JavaScript, built with componentize-js. See README.md.
import { log } from 'ferry:engine/log@0.1.0';
import { getDirectories } from 'wasi:filesystem/preopens@0.2.10';

const ENGINE = 'redis-rdb';
const VERSION = '0.1.0';
const DUMP = 'dump.rdb';
const MAX_DUMP = 1024 * 1024 * 1024; // read at most 1 GiB into guest memory

class EngineError {
  constructor(tag, val) { this.tag = tag; this.val = val; }
}
const invalid = (m) => new EngineError('invalid', m);
const ioError = (m) => new EngineError('io', m);
const unsupported = (m) => new EngineError('unsupported', m);

function errText(e) {
  if (e && e.payload !== undefined) return String(e.payload);
  if (e && e.message) return e.message;
  return String(e);
}

// Runs `f`; any EngineError thrown is the hook's err; anything else becomes
// `other` (never a trap).
function hook(f) {
  try {
    return f();
  } catch (e) {
    if (e instanceof EngineError) throw { tag: e.tag, val: e.val };
    throw { tag: 'other', val: `internal error: ${errText(e)}` };
  }
}

// ---------------------------------------------------------------- files

function shardDir() {
  let dirs;
  try { dirs = getDirectories(); } catch (e) { throw ioError(`preopens: ${errText(e)}`); }
  const found = dirs.find(([, path]) => path === '/shard');
  if (!found) throw ioError('the shard directory is not preopened at /shard');
  return found[0];
}

function listDir(dir) {
  const names = [];
  let stream;
  try { stream = dir.readDirectory(); } catch (e) { throw ioError(`read /shard: ${errText(e)}`); }
  for (;;) {
    let entry;
    try { entry = stream.readDirectoryEntry(); } catch (e) { throw ioError(`read /shard: ${errText(e)}`); }
    if (!entry) break;
    names.push([entry.name, entry.type]);
  }
  return names;
}

// The dump's bytes, or an `invalid` error when it is missing.
function readDump(dir) {
  let file;
  try {
    file = dir.openAt({}, DUMP, {}, { read: true });
  } catch (e) {
    const code = errText(e);
    if (code === 'no-entry') throw invalid(`${DUMP} is missing from the shard`);
    throw ioError(`open ${DUMP}: ${code}`);
  }
  let stat;
  try { stat = file.stat(); } catch (e) { throw ioError(`stat ${DUMP}: ${errText(e)}`); }
  if (stat.type !== 'regular-file') throw invalid(`${DUMP} is not a regular file (${stat.type})`);
  const size = Number(stat.size);
  if (size > MAX_DUMP) throw unsupported(`${DUMP} is ${size} bytes, more than this plugin reads`);
  const bytes = new Uint8Array(size);
  let at = 0;
  while (at < size) {
    let chunk, eof;
    try { [chunk, eof] = file.read(BigInt(Math.min(size - at, 4 << 20)), BigInt(at)); } catch (e) {
      throw ioError(`read ${DUMP}: ${errText(e)}`);
    }
    if (chunk.length === 0) {
      if (eof) throw invalid(`${DUMP} shrank while being read (${at} of ${size} bytes)`);
      continue;
    }
    bytes.set(chunk.subarray(0, Math.min(chunk.length, size - at)), at);
    at += chunk.length;
  }
  return bytes;
}

// ---------------------------------------------------------------- CRC-64
// Redis's crc64 (Jones polynomial 0xad93d23594c935a9, reflected, init 0, no
// final xor), slicing-by-8 over two 32-bit halves: no BigInt per byte.

const TABLES = (() => {
  // Reflected polynomial 0x95ac9329ac4bc9b5.
  const pLo = 0xac4bc9b5 >>> 0, pHi = 0x95ac9329 >>> 0;
  const lo = [], hi = [];
  const t0l = new Uint32Array(256), t0h = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let cl = n, ch = 0;
    for (let k = 0; k < 8; k++) {
      const bit = cl & 1;
      cl = ((cl >>> 1) | (ch << 31)) >>> 0;
      ch = ch >>> 1;
      if (bit) { cl = (cl ^ pLo) >>> 0; ch = (ch ^ pHi) >>> 0; }
    }
    t0l[n] = cl; t0h[n] = ch;
  }
  lo.push(t0l); hi.push(t0h);
  for (let t = 1; t < 8; t++) {
    const pl = lo[t - 1], ph = hi[t - 1];
    const tl = new Uint32Array(256), th = new Uint32Array(256);
    for (let n = 0; n < 256; n++) {
      // T[t][n] = T[0][T[t-1][n] & 0xff] ^ (T[t-1][n] >> 8)
      const l = pl[n], h = ph[n], i = l & 0xff;
      tl[n] = (t0l[i] ^ ((l >>> 8) | (h << 24))) >>> 0;
      th[n] = (t0h[i] ^ (h >>> 8)) >>> 0;
    }
    lo.push(tl); hi.push(th);
  }
  return { lo, hi };
})();

// CRC-64 of bytes[0, end): [lo, hi] 32-bit halves.
function crc64(bytes, end) {
  const [L0, L1, L2, L3, L4, L5, L6, L7] = TABLES.lo;
  const [H0, H1, H2, H3, H4, H5, H6, H7] = TABLES.hi;
  let lo = 0, hi = 0, i = 0;
  const stop = end - (end % 8);
  for (; i < stop; i += 8) {
    const a = (lo ^ (bytes[i] | (bytes[i + 1] << 8) | (bytes[i + 2] << 16) | (bytes[i + 3] << 24))) >>> 0;
    const b = (hi ^ (bytes[i + 4] | (bytes[i + 5] << 8) | (bytes[i + 6] << 16) | (bytes[i + 7] << 24))) >>> 0;
    const a0 = a & 0xff, a1 = (a >>> 8) & 0xff, a2 = (a >>> 16) & 0xff, a3 = a >>> 24;
    const b0 = b & 0xff, b1 = (b >>> 8) & 0xff, b2 = (b >>> 16) & 0xff, b3 = b >>> 24;
    lo = L7[a0] ^ L6[a1] ^ L5[a2] ^ L4[a3] ^ L3[b0] ^ L2[b1] ^ L1[b2] ^ L0[b3];
    hi = H7[a0] ^ H6[a1] ^ H5[a2] ^ H4[a3] ^ H3[b0] ^ H2[b1] ^ H1[b2] ^ H0[b3];
  }
  for (; i < end; i++) {
    const x = (lo ^ bytes[i]) & 0xff;
    lo = (L0[x] ^ ((lo >>> 8) | (hi << 24))) >>> 0;
    hi = (H0[x] ^ (hi >>> 8)) >>> 0;
  }
  return [lo >>> 0, hi >>> 0];
}

const hex32 = (n) => (n >>> 0).toString(16).padStart(8, '0');
const crcHex = ([lo, hi]) => hex32(hi) + hex32(lo);

// ---------------------------------------------------------------- parser

const TYPE_NAMES = {
  0: 'string', 1: 'list', 2: 'set', 3: 'zset', 4: 'hash', 5: 'zset2', 6: 'module', 7: 'module2',
  9: 'hash-zipmap', 10: 'list-ziplist', 11: 'set-intset', 12: 'zset-ziplist', 13: 'hash-ziplist',
  14: 'list-quicklist', 15: 'stream-listpacks', 16: 'hash-listpack', 17: 'zset-listpack',
  18: 'list-quicklist2', 19: 'stream-listpacks2', 20: 'set-listpack', 21: 'stream-listpacks3',
};

class Reader {
  constructor(bytes, end) { this.b = bytes; this.p = 0; this.end = end; }
  need(n, what) {
    if (n < 0 || this.p + n > this.end) {
      throw invalid(`truncated or corrupt dump: ${what} needs ${n} bytes at offset ${this.p}, ${this.end - this.p} left`);
    }
  }
  u8(what) { this.need(1, what); return this.b[this.p++]; }
  skip(n, what) { this.need(n, what); this.p += n; }
  bytes(n, what) { this.need(n, what); const s = this.b.subarray(this.p, this.p + n); this.p += n; return s; }
  u32be() { const b = this.bytes(4, 'a 32-bit length'); return ((b[0] << 24) | (b[1] << 16) | (b[2] << 8) | b[3]) >>> 0; }
  u64be() {
    const hi = this.u32be(), lo = this.u32be();
    if (hi >= 0x200000) throw unsupported(`a 64-bit length ${hi * 4294967296 + lo} beyond 2^53`);
    return hi * 4294967296 + lo;
  }
  // Length encoding; returns { len } or { enc } for the special string encodings.
  lenOrEnc(what) {
    const b = this.u8(what);
    switch (b >> 6) {
      case 0: return { len: b & 0x3f };
      case 1: return { len: ((b & 0x3f) << 8) | this.u8(what) };
      case 2:
        if (b === 0x80) return { len: this.u32be() };
        if (b === 0x81) return { len: this.u64be() };
        throw invalid(`unknown length encoding 0x${b.toString(16)} at offset ${this.p - 1} (${what})`);
      default: return { enc: b & 0x3f };
    }
  }
  len(what) {
    const at = this.p;
    const r = this.lenOrEnc(what);
    if (r.len === undefined) throw invalid(`a string encoding where a length (${what}) was expected at offset ${at}`);
    return r.len;
  }
  // A string; returns its bytes (decompressed) when `keep`, else null.
  string(what, keep) {
    const at = this.p;
    const r = this.lenOrEnc(what);
    if (r.len !== undefined) { const s = this.bytes(r.len, what); return keep ? s : null; }
    switch (r.enc) {
      case 0: this.skip(1, what); return keep ? new Uint8Array(0) : null; // INT8
      case 1: this.skip(2, what); return keep ? new Uint8Array(0) : null; // INT16
      case 2: this.skip(4, what); return keep ? new Uint8Array(0) : null; // INT32
      case 3: {
        const clen = this.len('LZF compressed length');
        const ulen = this.len('LZF length');
        const comp = this.bytes(clen, 'LZF data');
        return lzf(comp, ulen, at);
      }
      default: throw invalid(`unknown string encoding ${r.enc} at offset ${at} (${what})`);
    }
  }
  // A string that is an integer-encoded one or a blob; the blob's bytes.
  blob(what) {
    const at = this.p;
    const s = this.string(what, true);
    if (s.length === 0 && this.b[at] >> 6 === 3 && (this.b[at] & 0x3f) < 3) {
      throw invalid(`${what} at offset ${at} is an integer, not a blob`);
    }
    return s;
  }
  // A zset score of RDB_TYPE_ZSET: 1-byte length, 253-255 special.
  oldDouble() { const n = this.u8('score'); if (n < 253) this.skip(n, 'score'); }
}

// LZF decompression (liblzf, as Redis's lzf_d.c); checks both lengths.
function lzf(input, ulen, at) {
  const out = new Uint8Array(ulen);
  let ip = 0, op = 0;
  const n = input.length;
  const bad = (why) => invalid(`corrupt LZF string at offset ${at}: ${why}`);
  while (ip < n) {
    let ctrl = input[ip++];
    if (ctrl < 32) {
      ctrl++;
      if (op + ctrl > ulen) throw bad('output longer than its declared length');
      if (ip + ctrl > n) throw bad('literal run past the input');
      out.set(input.subarray(ip, ip + ctrl), op);
      op += ctrl; ip += ctrl;
    } else {
      let len = ctrl >> 5;
      let ref = op - ((ctrl & 0x1f) << 8) - 1;
      if (len === 7) { if (ip >= n) throw bad('input ends in a back reference'); len += input[ip++]; }
      if (ip >= n) throw bad('input ends in a back reference');
      ref -= input[ip++];
      len += 2;
      if (op + len > ulen) throw bad('output longer than its declared length');
      if (ref < 0) throw bad('back reference before the start');
      for (let k = 0; k < len; k++) out[op++] = out[ref++];
    }
  }
  if (op !== ulen) throw bad(`decompressed to ${op} bytes, declared ${ulen}`);
  return out;
}

const u16le = (b, i) => b[i] | (b[i + 1] << 8);
const u32le = (b, i) => (b[i] | (b[i + 1] << 8) | (b[i + 2] << 16) | (b[i + 3] << 24)) >>> 0;

function checkZiplist(b, what) {
  if (b.length < 11) throw invalid(`${what}: ziplist of ${b.length} bytes is too short`);
  const zlbytes = u32le(b, 0), zltail = u32le(b, 4);
  if (zlbytes !== b.length) throw invalid(`${what}: ziplist says ${zlbytes} bytes, blob has ${b.length}`);
  if (zltail < 10 || zltail >= zlbytes - 1) throw invalid(`${what}: ziplist tail offset ${zltail} out of range`);
  if (b[b.length - 1] !== 0xff) throw invalid(`${what}: ziplist does not end in 0xFF`);
}

function checkListpack(b, what) {
  if (b.length < 7) throw invalid(`${what}: listpack of ${b.length} bytes is too short`);
  const total = u32le(b, 0);
  if (total !== b.length) throw invalid(`${what}: listpack says ${total} bytes, blob has ${b.length}`);
  if (b[b.length - 1] !== 0xff) throw invalid(`${what}: listpack does not end in 0xFF`);
  const count = u16le(b, 4);
  if (count === 0 && b.length !== 7) throw invalid(`${what}: empty listpack of ${b.length} bytes`);
}

function checkIntset(b, what) {
  if (b.length < 8) throw invalid(`${what}: intset of ${b.length} bytes is too short`);
  const enc = u32le(b, 0), n = u32le(b, 4);
  if (enc !== 2 && enc !== 4 && enc !== 8) throw invalid(`${what}: intset encoding ${enc}`);
  if (8 + enc * n !== b.length) throw invalid(`${what}: intset of ${n} x ${enc} bytes in a ${b.length}-byte blob`);
}

function checkZipmap(b, what) {
  if (b.length < 2 || b[b.length - 1] !== 0xff) throw invalid(`${what}: zipmap does not end in 0xFF`);
}

function skipValue(r, type, version, what) {
  switch (type) {
    case 0: r.string(what, false); return;
    case 1: case 2: { let n = r.len('size'); while (n--) r.string(what, false); return; }
    case 3: { let n = r.len('size'); while (n--) { r.string(what, false); r.oldDouble(); } return; }
    case 4: { let n = r.len('size'); while (n--) { r.string(what, false); r.string(what, false); } return; }
    case 5: { let n = r.len('size'); while (n--) { r.string(what, false); r.skip(8, 'score'); } return; }
    case 6: case 7: throw unsupported(`${what}: module values (type ${type}) are not supported`);
    case 9: checkZipmap(r.blob(what), what); return;
    case 10: case 12: case 13: checkZiplist(r.blob(what), what); return;
    case 11: checkIntset(r.blob(what), what); return;
    case 14: { let n = r.len('nodes'); while (n--) checkZiplist(r.blob(what), what); return; }
    case 16: case 17: case 20: checkListpack(r.blob(what), what); return;
    case 18: {
      let n = r.len('nodes');
      while (n--) {
        const container = r.len('container');
        const node = r.blob(what);
        if (container === 2) checkListpack(node, what);
        else if (container !== 1) throw invalid(`${what}: quicklist container ${container}`);
      }
      return;
    }
    case 15: case 19: case 21: {
      let n = r.len('listpacks');
      while (n--) {
        const nodekey = r.blob('stream node key');
        if (nodekey.length !== 16) throw invalid(`${what}: stream node key of ${nodekey.length} bytes`);
        const lp = r.blob(what);
        checkListpack(lp, what);
        if (u16le(lp, 4) === 0) throw invalid(`${what}: empty stream listpack`);
      }
      r.len('stream length'); r.len('last id'); r.len('last id');
      if (type >= 19) { for (let k = 0; k < 5; k++) r.len('stream ids'); }
      let groups = r.len('consumer groups');
      while (groups--) {
        r.string('group name', false);
        r.len('group id'); r.len('group id');
        if (type >= 19) r.len('entries read');
        let pel = r.len('group PEL');
        while (pel--) { r.skip(16, 'PEL id'); r.skip(8, 'delivery time'); r.len('delivery count'); }
        let consumers = r.len('consumers');
        while (consumers--) {
          r.string('consumer name', false);
          r.skip(8, 'seen time');
          if (type >= 21) r.skip(8, 'active time');
          let cpel = r.len('consumer PEL');
          while (cpel--) r.skip(16, 'consumer PEL id');
        }
      }
      return;
    }
    default:
      throw unsupported(`${what}: value type ${type} (RDB version ${version}) is not supported`);
  }
}

// Module auxiliary data and module-serialized values: opcodes until EOF.
function skipModuleAux(r) {
  r.len('module id');
  const whenOpcode = r.len('module when opcode');
  if (whenOpcode !== 2) throw unsupported(`module aux data of opcode ${whenOpcode}`);
  r.len('module when');
  for (;;) {
    const op = r.len('module opcode');
    if (op === 0) return;
    if (op === 1 || op === 2) r.len('module integer');
    else if (op === 3) r.skip(4, 'module float');
    else if (op === 4) r.skip(8, 'module double');
    else if (op === 5) r.string('module string', false);
    else throw invalid(`unknown module opcode ${op}`);
  }
}

// Full parse of a dump; throws `invalid` for anything not a whole, sound RDB.
function parse(bytes) {
  const size = bytes.length;
  if (size < 9) throw invalid(`${DUMP} is ${size} bytes: not an RDB file`);
  const magic = String.fromCharCode(...bytes.subarray(0, 5));
  if (magic !== 'REDIS') throw invalid(`${DUMP} does not start with REDIS`);
  const vtext = String.fromCharCode(...bytes.subarray(5, 9));
  if (!/^[0-9]{4}$/.test(vtext)) throw invalid(`${DUMP}: RDB version ${JSON.stringify(vtext)}`);
  const version = Number(vtext);
  if (version < 1 || version > 12) throw unsupported(`RDB version ${version} (this plugin reads 1-12)`);
  const r = new Reader(bytes, size);
  r.p = 9;
  const dbs = new Map();
  const aux = {};
  let db = 0, keys = 0;
  for (;;) {
    const at = r.p;
    const op = r.u8('an opcode');
    if (op === 0xff) break;
    switch (op) {
      case 0xfa: {
        const k = r.string('aux key', true), v = r.string('aux value', true);
        aux[new TextDecoder().decode(k)] = new TextDecoder().decode(v);
        continue;
      }
      case 0xfb: r.len('db size'); r.len('expires size'); continue;
      case 0xfe: db = r.len('db number'); continue;
      case 0xfd: r.skip(4, 'expire time'); continue;
      case 0xfc: r.skip(8, 'expire time'); continue;
      case 0xf8: r.len('idle time'); continue;
      case 0xf9: r.skip(1, 'LFU frequency'); continue;
      case 0xf7: skipModuleAux(r); continue;
      case 0xf5: r.string('function library', false); continue;
      case 0xf6: throw unsupported('pre-GA function data (opcode 0xF6)');
      case 0xf4: r.len('slot id'); r.len('slot size'); r.len('expires slot size'); continue;
      default: {
        try {
          r.string('key name', false);
          skipValue(r, op, version, 'value');
        } catch (e) {
          if (e instanceof EngineError) e.val = `key ${keys + 1} (${TYPE_NAMES[op] || `type ${op}`}, at offset ${at}): ${e.val}`;
          throw e;
        }
        keys++;
        dbs.set(db, (dbs.get(db) || 0) + 1);
      }
    }
  }
  let crc = null;
  if (version >= 5) {
    r.need(8, 'the CRC-64 trailer');
    const stored = [u32le(bytes, r.p), u32le(bytes, r.p + 4)];
    if (r.p + 8 !== size) throw invalid(`${size - r.p - 8} bytes after the CRC-64 trailer`);
    if (stored[0] !== 0 || stored[1] !== 0) {
      const computed = crc64(bytes, r.p);
      if (computed[0] !== stored[0] || computed[1] !== stored[1]) {
        throw invalid(`CRC-64 mismatch: stored ${crcHex(stored)}, computed ${crcHex(computed)}`);
      }
    }
    crc = stored;
  } else if (r.p !== size) {
    throw invalid(`${size - r.p} bytes after the EOF opcode`);
  }
  if (crc === null || (crc[0] === 0 && crc[1] === 0)) {
    // No (or a disabled, all-zero) checksum in the file: compute one for identity.
    crc = crc64(bytes, size);
  }
  return { version, keys, dbs, aux, crc, size };
}

// The stored trailer (or CRC-64 of the whole file when there is none), without a parse.
function trailer(bytes) {
  const version = Number(String.fromCharCode(...bytes.subarray(5, 9)));
  if (bytes.length >= 17 && version >= 5) {
    const t = [u32le(bytes, bytes.length - 8), u32le(bytes, bytes.length - 4)];
    if (t[0] !== 0 || t[1] !== 0) return t;
  }
  return crc64(bytes, bytes.length);
}

// position: the low 52 bits of the CRC-64 (stable while the dump is the
// same, different after a SAVE that changed it); never 0.
function position(crc) {
  const p = (crc[1] & 0xfffff) * 4294967296 + crc[0];
  return BigInt(p === 0 ? 1 : p);
}

const TERM = 1n;
const attr = (meta, key) => {
  const found = meta.attributes.find(([k]) => k === key);
  return found ? found[1] : undefined;
};

function summary(d) {
  const dbs = [...d.dbs.entries()].sort((a, b) => a[0] - b[0]).map(([n, c]) => `db${n}=${c}`).join(',');
  return `RDB v${d.version}, ${d.size} bytes, ${d.keys} keys${dbs ? ` (${dbs})` : ''}, crc64 ${crcHex(d.crc)}`;
}

// ---------------------------------------------------------------- hooks

export const hooks = {
  describe() {
    return { name: ENGINE, pluginVersion: VERSION, snapshotFormat: 1 };
  },

  shardStatus(shard) {
    return hook(() => {
      const bytes = readDump(shardDir());
      const d = parse(bytes);
      return { term: TERM, position: position(d.crc) };
    });
  },

  createSnapshot(shard) {
    return hook(() => {
      const bytes = readDump(shardDir());
      const d = parse(bytes);
      log('info', `snapshot of ${shard}: ${summary(d)}`);
      return {
        meta: {
          term: TERM,
          position: position(d.crc),
          attributes: [
            ['crc64', crcHex(d.crc)],
            ['size', String(d.size)],
            ['keys', String(d.keys)],
            ['rdb-version', String(d.version)],
          ],
        },
        entries: [{ tag: 'file', val: { path: DUMP, offset: 0n, length: BigInt(d.size) } }],
      };
    });
  },

  termCheck(shard, meta) {
    return hook(() => {
      const bytes = readDump(shardDir());
      const size = String(bytes.length), crc = crcHex(trailer(bytes));
      if (size !== attr(meta, 'size') || crc !== attr(meta, 'crc64')) {
        throw new EngineError('term-changed',
          `${DUMP} changed since the snapshot: ${size} bytes crc64 ${crc}, snapshot ${attr(meta, 'size')} bytes crc64 ${attr(meta, 'crc64')}`);
      }
    });
  },

  validate(shard, meta) {
    return hook(() => {
      const dir = shardDir();
      const extra = listDir(dir).filter(([name]) => name !== DUMP);
      if (extra.length) throw invalid(`unexpected files in the copy: ${extra.map(([n]) => n).join(', ')}`);
      const d = parse(readDump(dir));
      for (const [key, have] of [['crc64', crcHex(d.crc)], ['size', String(d.size)], ['keys', String(d.keys)]]) {
        const want = attr(meta, key);
        if (want !== have) throw invalid(`the copy's ${key} is ${have}, the snapshot's ${want}`);
      }
      const p = position(d.crc);
      if (meta.term !== TERM || meta.position !== p) {
        throw invalid(`the copy is at ${TERM}/${p}, the snapshot at ${meta.term}/${meta.position}`);
      }
      log('info', `validated ${shard}: ${summary(d)}`);
      return { term: TERM, position: p };
    });
  },

  apply(shard, meta) {
    return hook(() => {});
  },
};

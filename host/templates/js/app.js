// The `{{ENGINE}}` engine's Ferry plugin (contract ferry:engine@0.2.0), in
// JavaScript, made by `ferry plugin new --lang js`. Start from here: it is a
// complete engine for a simple format, which yours replaces.
//
// The format: a shard is a directory of append-only files (no
// subdirectories; names starting with `.` are the plugin's own).
// - Position: the bytes of all files (they only grow).
// - Snapshot: every file up to its current size; `term-check` fails if a
//   file shrank or went away during the copy.
// - `validate`: exactly the snapshot's files, at their sizes.
// - Catch-up: the host compares every file block by block.
// - Fence: the marker `.fence` holds the epoch; the engine's writers must
//   check it before each write (that is the engine's side of the contract).
//
// A hook returns its value, or throws an EngineError with a message for the
// operator (`hook` below turns it into the contract's error). u64 values
// (positions, offsets, sizes, epochs) are BigInts.
import { log } from 'ferry:engine/log@0.2.0';
import { getDirectories } from 'wasi:filesystem/preopens@0.2.10';

const ENGINE = '{{ENGINE}}';
const VERSION = '0.1.0';
const FENCE = '.fence';
const BLOCK_SIZE = 4096;

class EngineError {
  constructor(tag, val) { this.tag = tag; this.val = val; }
}
const invalid = (m) => new EngineError('invalid', m);
const ioError = (what, e) => new EngineError('io', `${what}: ${errText(e)}`);
const fenced = (by) => new EngineError('fenced', `fenced by transfer epoch ${by}`);

function errText(e) {
  if (e && e.payload !== undefined) return String(e.payload);
  if (e && e.message) return e.message;
  return String(e);
}

// Runs `f`: an EngineError thrown is the hook's error; anything else is a
// bug, reported as `other` (never a trap).
function hook(f) {
  try {
    return f();
  } catch (e) {
    if (e instanceof EngineError) throw { tag: e.tag, val: e.val };
    throw { tag: 'other', val: `internal error: ${errText(e)}` };
  }
}

// ---------------------------------------------------------------- files

// The shard directory, which the host preopens at /shard.
function shard() {
  let dirs;
  try { dirs = getDirectories(); } catch (e) { throw ioError('preopens', e); }
  const found = dirs.find(([, path]) => path === '/shard');
  if (!found) throw new EngineError('io', 'the shard directory is not preopened at /shard');
  return found[0];
}

// The shard's files and their sizes (BigInt), sorted by name.
function files(dir) {
  const out = [];
  let stream;
  try { stream = dir.readDirectory(); } catch (e) { throw ioError('shard', e); }
  for (;;) {
    let entry;
    try { entry = stream.readDirectoryEntry(); } catch (e) { throw ioError('shard', e); }
    if (!entry) break;
    if (entry.name.startsWith('.')) continue;
    if (entry.type !== 'regular-file') throw new EngineError('unsupported', `${entry.name} is not a regular file`);
    let stat;
    try { stat = dir.statAt({}, entry.name); } catch (e) { throw ioError(entry.name, e); }
    out.push([entry.name, stat.size]);
  }
  if (out.length === 0) throw invalid('the shard has no file');
  out.sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
  return out;
}

const position = (found) => ({ term: 0n, position: found.reduce((sum, [, size]) => sum + size, 0n) });
const attributes = (found) => found.map(([name, size]) => [name, String(size)]);

// What a meta records: every file's size.
function recorded(attrs) {
  const out = attrs.map(([name, size]) => {
    if (!/^[0-9]+$/.test(size)) throw invalid(`${name}: the meta's size is not a number`);
    return [name, BigInt(size)];
  });
  out.sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
  return out;
}

const same = (a, b) => a.length === b.length && a.every(([n, s], i) => n === b[i][0] && s === b[i][1]);
const show = (found) => found.map(([n, s]) => `${n}: ${s}`).join(', ');

// The fence marker: { retired, epoch } or null.
function marker(dir) {
  let file;
  try {
    file = dir.openAt({}, FENCE, {}, { read: true });
  } catch (e) {
    if (errText(e) === 'no-entry') return null;
    throw ioError(FENCE, e);
  }
  let bytes;
  try { [bytes] = file.read(64n, 0n); } catch (e) { throw ioError(FENCE, e); }
  const text = new TextDecoder().decode(bytes).trim();
  const m = /^(retired )?([0-9]+)$/.exec(text);
  if (!m) throw invalid(`${FENCE} holds ${JSON.stringify(text)}`);
  return { retired: m[1] !== undefined, epoch: BigInt(m[2]) };
}

function writeMarker(dir, text) {
  try {
    const file = dir.openAt({}, FENCE, { create: true, truncate: true }, { write: true });
    file.write(new TextEncoder().encode(text), 0n);
  } catch (e) {
    throw ioError(FENCE, e);
  }
}

// ---------------------------------------------------------------- hooks

export const hooks = {
  describe() {
    return { name: ENGINE, pluginVersion: VERSION, snapshotFormat: 1 };
  },

  shardStatus(_shard) {
    return hook(() => position(files(shard())));
  },

  createSnapshot(name) {
    return hook(() => {
      const found = files(shard());
      log('info', `snapshot of ${name}: ${found.length} files`);
      const at = position(found);
      return {
        meta: { term: at.term, position: at.position, attributes: attributes(found) },
        entries: found.map(([path, size]) => ({ tag: 'file', val: { path, offset: 0n, length: size } })),
      };
    });
  },

  termCheck(_shard, meta) {
    return hook(() => {
      const now = new Map(files(shard()));
      for (const [name, size] of recorded(meta.attributes)) {
        if (!now.has(name) || now.get(name) < size) {
          throw new EngineError('term-changed', `${name} shrank or went away during the snapshot`);
        }
      }
    });
  },

  validate(_shard, meta) {
    return hook(() => {
      const now = files(shard());
      const want = recorded(meta.attributes);
      if (!same(now, want)) throw invalid(`the copy holds [${show(now)}], the snapshot [${show(want)}]`);
      return position(now);
    });
  },

  apply(_shard, _meta) {
    return hook(() => {});
  },
};

export const live = {
  changesSince(_shard, since) {
    return hook(() => {
      const dir = shard();
      const held = marker(dir);
      if (held && held.retired) throw new EngineError('fenced', `retired by transfer epoch ${held.epoch}`);
      const found = files(dir);
      return {
        meta: { term: 0n, since: since.position, until: position(found).position, attributes: attributes(found) },
        entries: found.map(([path, length]) => ({ tag: 'block-diff', val: { path, blockSize: BLOCK_SIZE, length } })),
      };
    });
  },

  deltaCheck(_shard, _meta) {
    // Block diffs read while writes go on are repaired by the next round;
    // the round under the fence is exact.
    return hook(() => {});
  },

  applyChanges(_shard, meta) {
    return hook(() => {
      const found = files(shard());
      const now = new Map(found);
      for (const [name, size] of recorded(meta.attributes)) {
        if (now.get(name) !== size) throw invalid(`${name} is not the source's ${size} bytes`);
      }
      return position(found);
    });
  },

  fence(_shard, epoch) {
    return hook(() => {
      const dir = shard();
      const held = marker(dir);
      if (held && held.epoch !== epoch) throw fenced(held.epoch);
      if (held && held.retired) throw new EngineError('fenced', `retired by transfer epoch ${epoch}`);
      writeMarker(dir, String(epoch));
      return { last: position(files(dir)), locks: [] };
    });
  },

  unfence(_shard, epoch) {
    return hook(() => {
      const dir = shard();
      const held = marker(dir);
      if (!held) return;
      if (held.retired || held.epoch !== epoch) throw fenced(held.epoch);
      try { dir.unlinkFileAt(FENCE); } catch (e) { throw ioError(FENCE, e); }
    });
  },

  retire(_shard, epoch) {
    return hook(() => {
      const dir = shard();
      const held = marker(dir);
      if (held && held.retired && held.epoch === epoch) return;
      if (held && held.epoch !== epoch) throw fenced(held.epoch);
      writeMarker(dir, `retired ${epoch}`);
    });
  },
};

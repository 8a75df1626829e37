"""Ferry engine plugin for LMDB environments (contract ferry:engine@0.1.0).

A shard directory holds one LMDB environment: `data.mdb` and, while some
process has it open, `lock.mdb` (runtime state only: never transferred, LMDB
recreates it). LMDB's on-disk format is parsed here in pure Python (layout of
LMDB 0.9, `mdb.c`, 64-bit build, MDB_DATA_VERSION 1).
"""

import os
import struct

from wit_world import exports
from wit_world.imports import log, types
from componentize_py_types import Err

ENGINE = "lmdb"
VERSION = "0.1.0"
SNAPSHOT_FORMAT = 1
ROOT = "/shard"
DATA = "data.mdb"
LOCK = "lock.mdb"

MAGIC = 0xBEEFC0DE
DATA_VERSION = 1
PAGEHDRSZ = 16
NODESIZE = 8
P_INVALID = 0xFFFFFFFFFFFFFFFF

P_BRANCH, P_LEAF, P_OVERFLOW, P_META, P_DIRTY, P_LEAF2, P_SUBP = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40
F_BIGDATA, F_SUBDATA, F_DUPDATA = 0x01, 0x02, 0x04
MDB_REVERSEKEY, MDB_DUPSORT, MDB_INTEGERKEY, MDB_DUPFIXED, MDB_INTEGERDUP, MDB_REVERSEDUP = (
    0x02, 0x04, 0x08, 0x10, 0x20, 0x40)
DB_FLAGS = 0x7E  # every persistent database flag

# MDB_db: md_pad u32, md_flags u16, md_depth u16, branch, leaf, overflow pages,
# entries, root (all 64-bit).
DB = struct.Struct("<IHHQQQQQ")
# MDB_meta after the page header: magic, version, address, mapsize, dbs[2],
# last_pg, txnid.
META_HEAD = struct.Struct("<IIQQ")
META_SIZE = META_HEAD.size + 2 * DB.size + 16


def invalid(msg):
    return Err(types.EngineError_Invalid(msg))


def io_error(msg):
    return Err(types.EngineError_Io(msg))


class Db:
    def __init__(self, raw):
        (self.pad, self.flags, self.depth, self.branch_pages, self.leaf_pages,
         self.overflow_pages, self.entries, self.root) = DB.unpack(raw)


class Meta:
    def __init__(self, index, page):
        self.index = index
        pgno, _pad, flags = struct.unpack_from("<QHH", page, 0)
        self.pgno, self.flags = pgno, flags
        self.magic, self.version, self.address, self.mapsize = META_HEAD.unpack_from(page, PAGEHDRSZ)
        at = PAGEHDRSZ + META_HEAD.size
        self.free = Db(page[at:at + DB.size])
        self.main = Db(page[at + DB.size:at + 2 * DB.size])
        self.last_pg, self.txnid = struct.unpack_from("<QQ", page, at + 2 * DB.size)
        self.psize = self.free.pad

    def problem(self):
        """Why this meta page is unusable, or None."""
        if self.magic != MAGIC:
            return "meta page %d: bad magic 0x%08x" % (self.index, self.magic)
        if self.version != DATA_VERSION:
            return "meta page %d: format version %d, not %d" % (self.index, self.version, DATA_VERSION)
        if self.pgno != self.index or not self.flags & P_META:
            return "meta page %d: header says page %d, flags 0x%x" % (self.index, self.pgno, self.flags)
        if self.psize < 512 or self.psize > 65536 or self.psize & (self.psize - 1):
            return "meta page %d: page size %d" % (self.index, self.psize)
        if self.last_pg < 1:
            return "meta page %d: last page %d" % (self.index, self.last_pg)
        return None


def shard_path(name):
    return ROOT + "/" + name


def open_data():
    path = shard_path(DATA)
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise invalid("no LMDB environment: %s is missing" % DATA)
    except OSError as e:
        raise io_error("opening %s: %s" % (DATA, e))


def read_metas(f):
    """Both meta pages (index 0 and 1) and the current one (larger txnid)."""
    try:
        head = f.read(PAGEHDRSZ + META_SIZE)
    except OSError as e:
        raise io_error("reading %s: %s" % (DATA, e))
    if len(head) < PAGEHDRSZ + META_SIZE:
        raise invalid("%s: %d bytes, too short for a meta page" % (DATA, len(head)))
    m0 = Meta(0, head)
    problem = m0.problem()
    if problem:
        raise invalid("%s: %s" % (DATA, problem))
    psize = m0.psize
    try:
        f.seek(psize)
        second = f.read(PAGEHDRSZ + META_SIZE)
    except OSError as e:
        raise io_error("reading %s: %s" % (DATA, e))
    if len(second) < PAGEHDRSZ + META_SIZE:
        raise invalid("%s: truncated second meta page" % DATA)
    m1 = Meta(1, second)
    problem = m1.problem()
    if problem:
        raise invalid("%s: %s" % (DATA, problem))
    if m1.psize != psize:
        raise invalid("%s: meta pages disagree on the page size (%d, %d)" % (DATA, psize, m1.psize))
    current = m1 if m1.txnid > m0.txnid else m0
    return m0, m1, current


def status():
    with open_data() as f:
        _, _, meta = read_metas(f)
    return meta


def position_of(meta):
    return types.ShardPosition(term=1, position=meta.txnid)


class Walker:
    """Checks every page reachable from a database's root."""

    def __init__(self, f, size, psize, last_pg):
        self.f, self.size, self.psize, self.last_pg = f, size, psize, last_pg
        self.seen = {0: "meta", 1: "meta"}

    def page(self, pgno, what):
        if pgno > self.last_pg:
            raise invalid("%s: page %d beyond the last page %d" % (what, pgno, self.last_pg))
        if pgno in self.seen:
            raise invalid("%s: page %d is also used by %s" % (what, pgno, self.seen[pgno]))
        self.seen[pgno] = what
        try:
            self.f.seek(pgno * self.psize)
            data = self.f.read(self.psize)
        except OSError as e:
            raise io_error("reading page %d: %s" % (pgno, e))
        if len(data) != self.psize:
            raise invalid("%s: page %d is truncated" % (what, pgno))
        hdr_pgno, _pad, flags = struct.unpack_from("<QHH", data, 0)
        if hdr_pgno != pgno:
            raise invalid("%s: page %d says it is page %d" % (what, pgno, hdr_pgno))
        return data, flags

    def key_order(self, db_flags):
        if db_flags & MDB_INTEGERKEY:
            def key(k):
                return int.from_bytes(k, "little") if len(k) in (4, 8) else k
            return key
        if db_flags & MDB_REVERSEKEY:
            return lambda k: k[::-1]
        return lambda k: k

    def dup_order(self, db_flags):
        if db_flags & MDB_INTEGERDUP:
            return lambda k: int.from_bytes(k, "little") if len(k) in (4, 8) else k
        if db_flags & MDB_REVERSEDUP:
            return lambda k: k[::-1]
        return lambda k: k

    def nodes(self, data, flags, pgno, what):
        """The node offsets of a branch or leaf page."""
        lower, upper = struct.unpack_from("<HH", data, 12)
        if lower < PAGEHDRSZ or lower > upper or upper > len(data) or (lower - PAGEHDRSZ) % 2:
            raise invalid("%s: page %d has lower %d, upper %d" % (what, pgno, lower, upper))
        n = (lower - PAGEHDRSZ) // 2
        if flags & P_LEAF2:
            return n, lower, upper, None
        ptrs = struct.unpack_from("<%dH" % n, data, PAGEHDRSZ)
        for p in ptrs:
            if p < upper or p + NODESIZE > len(data) or p % 2:
                raise invalid("%s: page %d has a node at offset %d outside [%d, %d)" % (what, pgno, p, upper, len(data)))
        return n, lower, upper, ptrs

    def overflow(self, pgno, what):
        data, flags = self.page(pgno, what)
        if flags & ~(P_OVERFLOW | P_DIRTY) or not flags & P_OVERFLOW:
            raise invalid("%s: overflow page %d has flags 0x%x" % (what, pgno, flags))
        (count,) = struct.unpack_from("<I", data, 12)
        if count < 1 or pgno + count - 1 > self.last_pg:
            raise invalid("%s: overflow run of %d pages at %d passes the last page %d" % (what, count, pgno, self.last_pg))
        for extra in range(pgno + 1, pgno + count):
            if extra in self.seen:
                raise invalid("%s: overflow page %d is also used by %s" % (what, extra, self.seen[extra]))
            self.seen[extra] = what
        return count

    def tree(self, db, what):
        """Walks a database; returns (entries, depth, branch, leaf, overflow) counted."""
        if db.root == P_INVALID:
            if db.depth or db.entries or db.branch_pages or db.leaf_pages or db.overflow_pages:
                raise invalid("%s: empty database with depth %d, %d entries" % (what, db.depth, db.entries))
            return
        if db.flags & 0x8000:
            raise invalid("%s: database flags 0x%x" % (what, db.flags))
        if db.depth < 1 or db.depth > 64:
            raise invalid("%s: depth %d" % (what, db.depth))
        counts = [0, 0, 0, 0]  # entries, branch, leaf, overflow
        self.walk(db, db.root, db.depth, what, counts, None, None)
        entries, branch, leaf, over = counts
        if entries != db.entries:
            raise invalid("%s: %d entries in the tree, %d in its header" % (what, entries, db.entries))
        if (branch, leaf, over) != (db.branch_pages, db.leaf_pages, db.overflow_pages):
            raise invalid("%s: %d branch, %d leaf, %d overflow pages in the tree, header says %d, %d, %d"
                          % (what, branch, leaf, over, db.branch_pages, db.leaf_pages, db.overflow_pages))

    def walk(self, db, pgno, depth, what, counts, lo, hi):
        data, flags = self.page(pgno, what)
        order = self.key_order(db.flags)
        kind = flags & ~P_DIRTY
        if depth > 1:
            if kind != P_BRANCH:
                raise invalid("%s: page %d at depth %d has flags 0x%x, not a branch" % (what, pgno, depth, flags))
        elif kind not in (P_LEAF, P_LEAF | P_LEAF2):
            raise invalid("%s: page %d at the leaf level has flags 0x%x" % (what, pgno, flags))
        n, lower, upper, ptrs = self.nodes(data, flags, pgno, what)
        if n == 0:
            raise invalid("%s: page %d has no nodes" % (what, pgno))
        if kind & P_LEAF2:
            ksize = db.pad
            if ksize < 1 or PAGEHDRSZ + n * ksize > len(data):
                raise invalid("%s: LEAF2 page %d with %d keys of %d bytes" % (what, pgno, n, ksize))
            keys = [data[PAGEHDRSZ + i * ksize:PAGEHDRSZ + (i + 1) * ksize] for i in range(n)]
            self.sorted_keys(keys, order, pgno, what, lo, hi, 0)
            counts[0] += n
            counts[2] += 1
            return
        nodes = []
        for p in ptrs:
            lo16, hi16, nflags, ksize = struct.unpack_from("<HHHH", data, p)
            if p + NODESIZE + ksize > len(data):
                raise invalid("%s: page %d: key of %d bytes runs past the page" % (what, pgno, ksize))
            key = data[p + NODESIZE:p + NODESIZE + ksize]
            nodes.append((p, lo16, hi16, nflags, key))
        if kind == P_BRANCH:
            counts[1] += 1
            keys = [k for (_, _, _, _, k) in nodes]
            self.sorted_keys(keys[1:], order, pgno, what, lo, hi, 1)
            for i, (p, lo16, hi16, nflags, key) in enumerate(nodes):
                child = lo16 | (hi16 << 16) | (nflags << 32)
                clo = key if i > 0 else lo
                chi = keys[i + 1] if i + 1 < n else hi
                self.walk(db, child, depth - 1, what, counts, clo, chi)
            return
        counts[2] += 1
        keys = [k for (_, _, _, _, k) in nodes]
        self.sorted_keys(keys, order, pgno, what, lo, hi, 0)
        for (p, lo16, hi16, nflags, key) in nodes:
            if nflags & ~(F_BIGDATA | F_SUBDATA | F_DUPDATA):
                raise invalid("%s: page %d: node flags 0x%x" % (what, pgno, nflags))
            dsize = lo16 | (hi16 << 16)
            at = p + NODESIZE + len(key)
            if nflags & F_BIGDATA:
                if at + 8 > len(data):
                    raise invalid("%s: page %d: overflow pointer runs past the page" % (what, pgno))
                (opg,) = struct.unpack_from("<Q", data, at)
                count = self.overflow(opg, what)
                if PAGEHDRSZ + dsize > count * self.psize:
                    raise invalid("%s: %d-byte value in %d overflow pages" % (what, dsize, count))
                counts[3] += count
                counts[0] += 1
                continue
            if at + dsize > len(data):
                raise invalid("%s: page %d: value of %d bytes runs past the page" % (what, pgno, dsize))
            value = data[at:at + dsize]
            if nflags & F_SUBDATA:
                if dsize != DB.size:
                    raise invalid("%s: page %d: sub-database record of %d bytes" % (what, pgno, dsize))
                child = Db(value)
                if nflags & F_DUPDATA:
                    # A dup-sort key with its own sub-tree of data items.
                    sub = Db(value)
                    sub.flags = (sub.flags & ~(MDB_REVERSEKEY | MDB_INTEGERKEY)) | (
                        (MDB_REVERSEKEY if db.flags & MDB_REVERSEDUP else 0)
                        | (MDB_INTEGERKEY if db.flags & MDB_INTEGERDUP else 0))
                    self.tree(sub, "%s: duplicates of %r" % (what, key[:32]))
                    counts[0] += child.entries
                else:
                    # A named database, its record in the main database.
                    self.tree(child, "database %r" % key.decode("utf-8", "replace"))
                    counts[0] += 1
                continue
            if nflags & F_DUPDATA:
                # Duplicates in a sub-page embedded in the node.
                if dsize < PAGEHDRSZ:
                    raise invalid("%s: page %d: sub-page of %d bytes" % (what, pgno, dsize))
                _, _, sflags, slower, supper = struct.unpack_from("<QHHHH", value, 0)
                if not sflags & P_SUBP or slower < PAGEHDRSZ or slower > supper or supper > dsize:
                    raise invalid("%s: page %d: bad duplicate sub-page" % (what, pgno))
                sn = (slower - PAGEHDRSZ) // 2
                if sn < 1:
                    raise invalid("%s: page %d: empty duplicate sub-page" % (what, pgno))
                counts[0] += sn
                continue
            counts[0] += 1

    def sorted_keys(self, keys, order, pgno, what, lo, hi, first):
        """Keys strictly ascending, within [lo, hi) set by the parent's separators."""
        try:
            vals = [order(k) for k in keys]
            for i in range(1, len(vals)):
                if not vals[i - 1] < vals[i]:
                    raise invalid("%s: page %d: keys out of order at node %d" % (what, pgno, i + first))
            if vals and lo is not None and vals[0] < order(lo):
                raise invalid("%s: page %d: first key below its separator" % (what, pgno))
            if vals and hi is not None and not vals[-1] < order(hi):
                raise invalid("%s: page %d: last key not below the next separator" % (what, pgno))
        except TypeError:
            pass  # integer keys of mixed widths: no order to check


def check_environment(expect_txnid):
    """Full check of the environment at /shard; returns the current meta."""
    try:
        names = sorted(os.listdir(ROOT))
    except OSError as e:
        raise io_error("listing the shard directory: %s" % e)
    extra = [n for n in names if n not in (DATA, LOCK)]
    if extra:
        raise invalid("unexpected files in an LMDB shard: %s" % ", ".join(extra))
    if DATA not in names:
        raise invalid("no LMDB environment: %s is missing" % DATA)
    with open_data() as f:
        m0, m1, meta = read_metas(f)
        if expect_txnid is not None and meta.txnid != expect_txnid:
            raise invalid("the environment is at transaction %d, the snapshot was of %d" % (meta.txnid, expect_txnid))
        try:
            size = os.fstat(f.fileno()).st_size
        except OSError as e:
            raise io_error("stat %s: %s" % (DATA, e))
        for m in (m0, m1):
            if (m.last_pg + 1) * m.psize > size:
                raise invalid("%s: %d bytes, meta page %d needs %d" % (DATA, size, m.index, (m.last_pg + 1) * m.psize))
        other = m1 if meta is m0 else m0
        if other.last_pg > meta.last_pg:
            raise invalid("the older meta page has the larger last page (%d > %d)" % (other.last_pg, meta.last_pg))
        walker = Walker(f, size, meta.psize, meta.last_pg)
        meta.free.flags |= MDB_INTEGERKEY  # keys are transaction ids
        walker.tree(meta.free, "free database")
        walker.tree(meta.main, "main database")
        log.log(log.Level.DEBUG, "checked %d of %d pages, %d entries at transaction %d"
                % (len(walker.seen), meta.last_pg + 1, meta.main.entries, meta.txnid))
    return meta


class Hooks(exports.Hooks):
    def describe(self):
        return types.EngineInfo(name=ENGINE, plugin_version=VERSION, snapshot_format=SNAPSHOT_FORMAT)

    def shard_status(self, shard):
        return position_of(status())

    def create_snapshot(self, shard):
        meta = status()
        used = (meta.last_pg + 1) * meta.psize
        attributes = [
            ("txnid", str(meta.txnid)),
            ("last-page", str(meta.last_pg)),
            ("page-size", str(meta.psize)),
            ("entries", str(meta.main.entries)),
        ]
        log.log(log.Level.INFO, "snapshot of %s at transaction %d: %d pages, %d entries"
                % (shard, meta.txnid, meta.last_pg + 1, meta.main.entries))
        return types.SnapshotPlan(
            meta=types.SnapshotMeta(term=1, position=meta.txnid, attributes=attributes),
            entries=[types.Entry_File(types.FileEntry(path=DATA, offset=0, length=used))],
        )

    def term_check(self, shard, meta):
        now = status()
        if now.txnid != meta.position:
            raise Err(types.EngineError_TermChanged(
                "%s moved from transaction %d to %d during the snapshot" % (shard, meta.position, now.txnid)))

    def validate(self, shard, meta):
        if meta.term != 1:
            raise invalid("snapshot term %d: this plugin writes term 1" % meta.term)
        attrs = dict(meta.attributes)
        got = check_environment(meta.position)
        want_pages = attrs.get("last-page")
        if want_pages is not None and want_pages != str(got.last_pg):
            raise invalid("last page %d, the snapshot says %s" % (got.last_pg, want_pages))
        want_entries = attrs.get("entries")
        if want_entries is not None and want_entries != str(got.main.entries):
            raise invalid("%d entries, the snapshot says %s" % (got.main.entries, want_entries))
        return position_of(got)

    def apply(self, shard, meta):
        path = shard_path(LOCK)
        try:
            os.remove(path)
            log.log(log.Level.INFO, "removed a received %s" % LOCK)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise io_error("removing %s: %s" % (LOCK, e))

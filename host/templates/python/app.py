"""The `{{ENGINE}}` engine's Ferry plugin (contract ferry:engine@0.2.0), in
Python, made by `ferry plugin new --lang python`. Start from here: it is a
complete engine for a simple format, which yours replaces.

The format: a shard is a directory of append-only files (no
subdirectories; names starting with `.` are the plugin's own).
- Position: the bytes of all files (they only grow).
- Snapshot: every file up to its current size; `term-check` fails if a file
  shrank or went away during the copy.
- `validate`: exactly the snapshot's files, at their sizes.
- Catch-up: the host compares every file block by block.
- Fence: the marker `.fence` holds the epoch; the engine's writers must
  check it before each write (that is the engine's side of the contract).

A hook returns its value, or raises `Err(EngineError_...)` with a message
for the operator. Any other exception is a bug in the plugin: the host sees
it as a trap, and the transfer fails.
"""

import os

from wit_world import exports
from wit_world.imports import log, types
from componentize_py_types import Err

ENGINE = "{{ENGINE}}"
VERSION = "0.1.0"
SNAPSHOT_FORMAT = 1
# The host preopens the shard directory here.
SHARD = "/shard"
FENCE = ".fence"
BLOCK_SIZE = 4096


def invalid(msg):
    return Err(types.EngineError_Invalid(msg))


def io_error(what, e):
    return Err(types.EngineError_Io("%s: %s" % (what, e)))


def fenced(by):
    return Err(types.EngineError_Fenced("fenced by transfer epoch %d" % by))


def files():
    """The shard's files and their sizes, sorted by name."""
    out = []
    try:
        names = os.listdir(SHARD)
    except OSError as e:
        raise io_error("shard", e)
    for name in names:
        if name.startswith("."):
            continue
        try:
            st = os.stat(os.path.join(SHARD, name))
        except OSError as e:
            raise io_error(name, e)
        if not os.path.isfile(os.path.join(SHARD, name)):
            raise Err(types.EngineError_Unsupported("%s is not a regular file" % name))
        out.append((name, st.st_size))
    if not out:
        raise invalid("the shard has no file")
    out.sort()
    return out


def position(found):
    return types.ShardPosition(term=0, position=sum(size for _, size in found))


def recorded(attributes):
    """What a meta records: every file's size."""
    out = []
    for name, size in attributes:
        if not size.isdigit():
            raise invalid("%s: the meta's size is not a number" % name)
        out.append((name, int(size)))
    out.sort()
    return out


def marker():
    """The fence marker: ("fenced", epoch), ("retired", epoch) or None."""
    path = os.path.join(SHARD, FENCE)
    try:
        with open(path) as f:
            text = f.read().strip()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise io_error(FENCE, e)
    state, _, epoch = text.rpartition(" ")
    if state not in ("", "retired") or not epoch.isdigit():
        raise invalid("%s holds %r" % (FENCE, text))
    return ("retired" if state else "fenced", int(epoch))


def write_marker(text):
    try:
        with open(os.path.join(SHARD, FENCE), "w") as f:
            f.write(text)
    except OSError as e:
        raise io_error(FENCE, e)


class Hooks(exports.Hooks):
    def describe(self):
        return types.EngineInfo(name=ENGINE, plugin_version=VERSION, snapshot_format=SNAPSHOT_FORMAT)

    def shard_status(self, shard):
        return position(files())

    def create_snapshot(self, shard):
        found = files()
        log.log(log.Level.INFO, "snapshot of %s: %d files" % (shard, len(found)))
        entries = [types.Entry_File(types.FileEntry(path=name, offset=0, length=size)) for name, size in found]
        at = position(found)
        attributes = [(name, str(size)) for name, size in found]
        meta = types.SnapshotMeta(term=at.term, position=at.position, attributes=attributes)
        return types.SnapshotPlan(meta=meta, entries=entries)

    def term_check(self, shard, meta):
        now = dict(files())
        for name, size in recorded(meta.attributes):
            if now.get(name, -1) < size:
                raise Err(types.EngineError_TermChanged("%s shrank or went away during the snapshot" % name))

    def validate(self, shard, meta):
        now = files()
        want = recorded(meta.attributes)
        if now != want:
            raise invalid("the copy holds %r, the snapshot %r" % (now, want))
        return position(now)

    def apply(self, shard, meta):
        return None


class Live(exports.Live):
    def changes_since(self, shard, since):
        held = marker()
        if held and held[0] == "retired":
            raise Err(types.EngineError_Fenced("retired by transfer epoch %d" % held[1]))
        found = files()
        entries = [
            types.DeltaEntry_BlockDiff(types.BlockDiffEntry(path=name, block_size=BLOCK_SIZE, length=size))
            for name, size in found
        ]
        attributes = [(name, str(size)) for name, size in found]
        meta = types.DeltaMeta(term=0, since=since.position, until=position(found).position, attributes=attributes)
        return types.DeltaPlan(meta=meta, entries=entries)

    def delta_check(self, shard, meta):
        # Block diffs read while writes go on are repaired by the next round;
        # the round under the fence is exact.
        return None

    def apply_changes(self, shard, meta):
        found = files()
        now = dict(found)
        for name, size in recorded(meta.attributes):
            if now.get(name) != size:
                raise invalid("%s is not the source's %d bytes" % (name, size))
        return position(found)

    def fence(self, shard, epoch):
        held = marker()
        if held and held[1] != epoch:
            raise fenced(held[1])
        if held and held[0] == "retired":
            raise Err(types.EngineError_Fenced("retired by transfer epoch %d" % epoch))
        write_marker(str(epoch))
        return types.FenceInfo(last=position(files()), locks=[])

    def unfence(self, shard, epoch):
        held = marker()
        if held is None:
            return None
        if held != ("fenced", epoch):
            raise fenced(held[1])
        try:
            os.remove(os.path.join(SHARD, FENCE))
        except OSError as e:
            raise io_error(FENCE, e)

    def retire(self, shard, epoch):
        held = marker()
        if held == ("retired", epoch):
            return None
        if held and held[1] != epoch:
            raise fenced(held[1])
        write_marker("retired %d" % epoch)

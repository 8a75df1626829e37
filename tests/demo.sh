#!/usr/bin/env bash
# The README's main command: sets up the machine (idempotent), builds Ferry
# and the guest plugins, makes a sample segment-log shard, and runs every hook
# of the plugin on it through the `ferry` CLI.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
tests/setup.sh
cargo build --release --locked -p ferry -p ferry-tests --bins
FERRY=$ROOT/target/release/ferry
SHARDGEN=$ROOT/target/release/shardgen
PLUGINS=$ROOT/target/plugins

WORK=$(mktemp -d "${TMPDIR:-/tmp}/ferry-demo.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
step() { printf '\n== %s\n' "$*"; }

step "plugins in $PLUGINS"
for plugin in "$PLUGINS"/*.wasm; do
  "$FERRY" plugin check "$plugin"
  echo
done

step "a segment-log shard of 64 MiB"
"$SHARDGEN" segment-log "$WORK/source/shard-1" --size 64M --segment-size 16M --term 7

SEG=$PLUGINS/segment-log.wasm
step "shard-status"
"$FERRY" plugin run-hook "$SEG" shard-status --shard-dir "$WORK/source/shard-1"
step "create-snapshot (the plan: inline control file + segments the host streams)"
"$FERRY" plugin run-hook "$SEG" create-snapshot --shard-dir "$WORK/source/shard-1" --json > "$WORK/plan.json"
head -c 600 "$WORK/plan.json"; echo " …"
step "term-check against the live shard"
"$FERRY" plugin run-hook "$SEG" term-check --shard-dir "$WORK/source/shard-1" --meta-file "$WORK/plan.json"
step "copy the planned entries to a staging directory, then validate and apply there"
"$SHARDGEN" materialize --plan "$WORK/plan.json" --from "$WORK/source/shard-1" --to "$WORK/staging/shard-1"
"$FERRY" plugin run-hook "$SEG" validate --shard-dir "$WORK/staging/shard-1" --meta-file "$WORK/plan.json"
"$FERRY" plugin run-hook "$SEG" apply --shard-dir "$WORK/staging/shard-1" --meta-file "$WORK/plan.json"
"$FERRY" plugin run-hook "$SEG" shard-status --shard-dir "$WORK/staging/shard-1"
cmp "$WORK/source/shard-1/control" "$WORK/staging/shard-1/control"
echo
echo "demo ok: the applied copy's control file equals the source's"

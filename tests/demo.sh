#!/usr/bin/env bash
# The README's main command: sets up the machine (idempotent), builds Ferry
# and the guest plugins, starts two local nodes, makes a sample shard for each
# engine on the first (a generated segment-log shard and a real SQLite
# database), transfers both to the second with a progress bar, and verifies
# the copies with each engine's own oracle.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
tests/setup.sh
cargo build --release --locked -p ferry -p ferry-tests --bins
FERRY=$ROOT/target/release/ferry
SHARDGEN=$ROOT/target/release/shardgen

WORK=$(mktemp -d "${TMPDIR:-/tmp}/ferry-demo.XXXXXX")
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
step() { printf '\n== %s\n' "$*"; }

# A shared token for the demo cluster.
head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$WORK/token"
export FERRY_TOKEN_FILE=$WORK/token

start_node() {  # name -> prints its URL
  local name=$1
  mkdir -p "$WORK/$name/plugins"
  cp target/plugins/segment-log.wasm target/plugins/sqlite.wasm "$WORK/$name/plugins/"
  "$FERRY" serve --node-id "$name" --listen 127.0.0.1:0 --data-dir "$WORK/$name" \
    --token-file "$WORK/token" > "$WORK/$name.out" 2> "$WORK/$name.log" &
  PIDS+=($!)
  for _ in $(seq 300); do
    if grep -q listening "$WORK/$name.out"; then break; fi
    sleep 0.1
  done
  grep -o 'http://[0-9.:]*' "$WORK/$name.out" || { cat "$WORK/$name.log" >&2; exit 1; }
}

step "two nodes on 127.0.0.1"
A=$(start_node alpha)
B=$(start_node beta)
echo "alpha: $A"
echo "beta:  $B"

step "sample shards on alpha"
"$SHARDGEN" segment-log "$WORK/alpha/shards/segment-log/wal-1" --size 256M --segment-size 16M --term 7
"$SHARDGEN" sqlite "$WORK/alpha/shards/sqlite/users-1" --size 32M

for pair in segment-log/wal-1 sqlite/users-1; do
  engine=${pair%/*}; shard=${pair#*/}
  step "transfer $engine/$shard: alpha -> beta"
  "$FERRY" transfer start --node "$B" --engine "$engine" --shard "$shard" --source "$A" --wait
  "$SHARDGEN" same "$engine" "$WORK/alpha/shards/$engine/$shard" "$WORK/beta/shards/$engine/$shard"
done

step "beta's transfers"
"$FERRY" transfer list --node "$B"
[ -z "$(ls -A "$WORK/beta/staging")" ] && echo "beta's staging is empty"
echo
echo "demo ok: both shards moved, verified by their engines' oracles"

#!/usr/bin/env bash
# The README's main command: sets up the machine (idempotent), builds Ferry
# and the guest plugins, starts a local cluster of three nodes, makes a sample
# shard for each engine on the first (a generated segment-log shard and a real
# SQLite database), replicates one and moves the other through consensus with
# a progress bar, and verifies the copies with each engine's own oracle. The
# cluster runs as in production: TLS between nodes from its own CA, and
# scoped credentials (the members share a node token; the CLI uses admin).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
tests/setup.sh
cargo build --release --locked -p ferry -p ferry-tests --bins
FERRY=$ROOT/target/release/ferry
SHARDGEN=$ROOT/target/release/shardgen

WORK=$(mktemp -d "${TMPDIR:-/tmp}/ferry-demo.XXXXXX")
cleanup() {
  # start_node runs in a subshell: the nodes' pids are in files.
  for pidfile in "$WORK"/*.pid; do
    [ -e "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
  done
  sleep 0.5
  rm -rf "$WORK"
}
trap cleanup EXIT
step() { printf '\n== %s\n' "$*"; }

step "a cluster CA, a certificate per node, scoped tokens"
"$FERRY" cluster init-ca --dir "$WORK/pki"
for name in alpha beta gamma; do
  "$FERRY" cluster issue-cert --ca-dir "$WORK/pki" --name "$name" --host 127.0.0.1
done
( umask 077
  for scope in node admin; do head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$WORK/$scope.token"; done )
export FERRY_TOKEN_FILE=$WORK/admin.token FERRY_CA_FILE=$WORK/pki/ca.crt

start_node() {  # name -> prints its URL
  local name=$1
  mkdir -p "$WORK/$name/plugins"
  cp target/plugins/segment-log.wasm target/plugins/sqlite.wasm "$WORK/$name/plugins/"
  "$FERRY" serve --node-id "$name" --listen 127.0.0.1:0 --data-dir "$WORK/$name" \
    --node-token-file "$WORK/node.token" --admin-token-file "$WORK/admin.token" \
    --tls-cert "$WORK/pki/$name.crt" --tls-key "$WORK/pki/$name.key" --tls-ca "$WORK/pki/ca.crt" \
    > "$WORK/$name.out" 2> "$WORK/$name.log" &
  echo $! > "$WORK/$name.pid"
  for _ in $(seq 300); do
    if grep -q listening "$WORK/$name.out"; then break; fi
    sleep 0.1
  done
  grep -o 'https://[0-9.:]*' "$WORK/$name.out" || { cat "$WORK/$name.log" >&2; exit 1; }
}

step "three nodes on 127.0.0.1 (TLS), joined into one cluster"
A=$(start_node alpha)
B=$(start_node beta)
C=$(start_node gamma)
"$FERRY" cluster join --node "$B" --to "$A" > /dev/null
"$FERRY" cluster join --node "$C" --to "$A" > /dev/null
"$FERRY" cluster status --node "$C"

step "sample shards on alpha"
"$SHARDGEN" segment-log "$WORK/alpha/shards/segment-log/wal-1" --size 256M --segment-size 16M --term 7
"$SHARDGEN" sqlite "$WORK/alpha/shards/sqlite/users-1" --size 32M
wait_for() {  # description, command...
  local what=$1; shift
  for _ in $(seq 300); do "$@" > /dev/null 2>&1 && return 0; sleep 0.1; done
  echo "timed out waiting for $what" >&2; exit 1
}
wait_for "alpha's shards to be registered" bash -c "'$FERRY' shards --node '$A' | grep -q 'users-1  alpha=active'"
"$FERRY" shards --node "$B"

step "replicate segment-log/wal-1 to beta (the donor is chosen by position)"
cp -r "$WORK/alpha/shards/segment-log/wal-1" "$WORK/wal-1.original"
"$FERRY" transfer start --node "$C" --engine segment-log --shard wal-1 --target beta --wait
"$SHARDGEN" same segment-log "$WORK/wal-1.original" "$WORK/beta/shards/segment-log/wal-1"

step "move sqlite/users-1 from alpha to gamma"
cp -r "$WORK/alpha/shards/sqlite/users-1" "$WORK/users-1.original"
"$FERRY" transfer start --node "$B" --engine sqlite --shard users-1 --target gamma --source alpha --kind move --wait
"$SHARDGEN" same sqlite "$WORK/users-1.original" "$WORK/gamma/shards/sqlite/users-1"
wait_for "alpha to remove the moved replica" test ! -e "$WORK/alpha/shards/sqlite/users-1"
echo "alpha's copy of users-1 is gone"

step "the replica table, from any node"
"$FERRY" shards --node "$A"
"$FERRY" transfer list --node "$A"
for n in alpha beta gamma; do [ -z "$(ls -A "$WORK/$n/staging")" ] || { echo "$n left staging" >&2; exit 1; }; done
echo
echo "demo ok: a replicate and a move through consensus over TLS, verified by each engine's oracle"

#!/usr/bin/env bash
# Benchmarks (not tests): plugin hook-call overhead (criterion) and transfer
# throughput against cp/tar baselines measured in the same run.
# Needs ~7 GiB free in the scratch dir ($FERRY_BENCH_DIR, default /tmp).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
tests/setup.sh
cargo build --release --locked -p ferry-tests --bins
if [ "${1:-}" != "--throughput-only" ]; then
  cargo bench --locked -p ferry --bench plugin
fi
target/release/throughput ${FERRY_BENCH_DIR:+--dir "$FERRY_BENCH_DIR"}

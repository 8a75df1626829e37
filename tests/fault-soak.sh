#!/usr/bin/env bash
# Plays N random fault schedules on real nodes in network namespaces
# (partitions, one-way links, latency, loss, bandwidth caps, paused
# processes, slow disks, at each phase of a live move) and prints each
# failing seed; `tests/fault-soak.sh 1 SEED` replays one. Needs root.
#
#   tests/fault-soak.sh [N] [SEED]     N defaults to 20, SEED to the time
#
# The normal suite plays fixed schedules (tests/tests/cluster_faults.rs);
# this is the slow, random soak, kept out of it.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
tests/setup.sh >/dev/null
cargo build --quiet --locked -p ferry-tests --bin fault-soak --bin ferry-e2e --bin ferry-netem
exec target/debug/fault-soak "${1:-20}" ${2:+"$2"}

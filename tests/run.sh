#!/usr/bin/env bash
# The README's test command: sets up a fresh Debian 12 machine (idempotent),
# builds the guests from source, and runs every test of the workspace.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
tests/setup.sh
# No incremental artifacts (1.7 GiB for the test crates) unless asked for: a
# run of the whole suite gains nothing from them, and CI's disk is bounded.
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}
# --all-targets also builds the benchmarks and runs each once, as a test.
cargo test --workspace --all-targets --locked

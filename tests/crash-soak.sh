#!/usr/bin/env bash
# The long crash test: a target node SIGKILLed at 50 random points of
# transfers through consensus (the normal suite runs 10).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
tests/setup.sh
FERRY_CRASH_POINTS=${FERRY_CRASH_POINTS:-50} \
  cargo test --locked -p ferry-tests --test cluster_crash -- a_target_killed_at_random_points --nocapture

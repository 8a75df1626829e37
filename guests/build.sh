#!/usr/bin/env bash
# Builds every engine plugin in guests/ into target/plugins/<engine>.wasm.
#
# Guests are wasm32-wasip2 components built with Debian's rustc (rustc-web,
# which ships the std sources) and -Zbuild-std, linked by wasm-component-ld.
# `tests/setup.sh` installs all of that; this script only builds.
#
# Env: FERRY_TOOLS_DIR  where setup.sh installed wasm-component-ld
#                       (default ~/.local/share/ferry/tools)
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/toolchain.sh"
cd "$ROOT/guests"   # cargo reads guests/.cargo/config.toml from the cwd

mkdir -p "$OUT"
# Mutants of the segment-log plugin, each broken on purpose (a cargo feature),
# for the conformance kit's own tests: target/plugins/mutants/, which no node
# loads. Built first, so that the last build of segment_log.wasm is the real one.
mkdir -p "$OUT/mutants"
for mutant in validate-accepts-anything plan-drops-a-file read-only-hook-writes; do
  guest_cargo build --release --locked --quiet -p segment-log --features "mutant-$mutant"
  wasm="$ROOT/target/guests/$TARGET/release/segment_log.wasm"
  cmp -s "$wasm" "$OUT/mutants/segment-log-$mutant.wasm" || cp "$wasm" "$OUT/mutants/segment-log-$mutant.wasm"
done
guest_cargo build --release --locked --quiet

# The workspace's plugins only (crates built elsewhere into the same target
# directory, by build-crate.sh, are not the project's).
for manifest in "$ROOT"/guests/*/Cargo.toml; do
  grep -q 'crate-type = \["cdylib"\]' "$manifest" || continue
  name=$(sed -n 's/^name = "\(.*\)"/\1/p' "$manifest" | head -1)
  wasm="$ROOT/target/guests/$TARGET/release/${name//-/_}.wasm"
  engine=$name
  if [ "$(head -c 8 "$wasm" | od -An -tx1 | tr -d ' \n')" != "0061736d0d000100" ]; then
    echo "guests/build.sh: $wasm is not a component" >&2
    exit 1
  fi
  # Copy only on change, so mtimes stay stable for whoever depends on them.
  cmp -s "$wasm" "$OUT/$engine.wasm" || cp "$wasm" "$OUT/$engine.wasm"
done

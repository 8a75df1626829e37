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

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOLS=${FERRY_TOOLS_DIR:-$HOME/.local/share/ferry/tools}
LLVM_MAJOR=22
DEB_RUSTC=/usr/bin/rustc
DEB_CARGO=/usr/bin/cargo
WASM_LD=/usr/lib/llvm-$LLVM_MAJOR/bin/wasm-ld
WASI_LIBC=/usr/lib/wasm32-wasi
LINKER=$TOOLS/bin/wasm-component-ld
TARGET=wasm32-wasip2
OUT=$ROOT/target/plugins

missing=()
[ -x "$DEB_RUSTC" ] && [ -x "$DEB_CARGO" ] || missing+=("Debian rustc-web/cargo-web")
[ -d /usr/lib/rustlib/src/rust/library/std ] || missing+=("rust-web-src")
[ -x "$WASM_LD" ] || missing+=("lld-$LLVM_MAJOR")
[ -f "$WASI_LIBC/crt1-reactor.o" ] || missing+=("wasi-libc")
[ -x "$LINKER" ] || missing+=("wasm-component-ld in $TOOLS")
if [ ${#missing[@]} -gt 0 ]; then
  echo "guests/build.sh: missing ${missing[*]}; run tests/setup.sh first" >&2
  exit 1
fi

cd "$ROOT/guests"   # cargo reads guests/.cargo/config.toml from the cwd
guest_cargo() {
  env -u RUSTFLAGS -u CARGO_ENCODED_RUSTFLAGS -u RUSTC_WRAPPER -u RUSTC_WORKSPACE_WRAPPER \
      -u CARGO_BUILD_TARGET -u RUSTUP_TOOLCHAIN -u CARGO_TARGET_DIR -u RUSTDOC \
    RUSTC="$DEB_RUSTC" RUSTC_BOOTSTRAP=1 \
    CARGO_TARGET_DIR="$ROOT/target/guests" \
    CARGO_TARGET_WASM32_WASIP2_LINKER="$LINKER" \
    CARGO_TARGET_WASM32_WASIP2_RUSTFLAGS="-L native=$WASI_LIBC -C link-arg=--wasm-ld-path=$WASM_LD" \
    "$DEB_CARGO" "$@"
}

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

for wasm in "$ROOT/target/guests/$TARGET/release/"*.wasm; do
  name=$(basename "$wasm" .wasm)
  engine=${name//_/-}
  if [ "$(head -c 8 "$wasm" | od -An -tx1 | tr -d ' \n')" != "0061736d0d000100" ]; then
    echo "guests/build.sh: $wasm is not a component" >&2
    exit 1
  fi
  # Copy only on change, so mtimes stay stable for whoever depends on them.
  cmp -s "$wasm" "$OUT/$engine.wasm" || cp "$wasm" "$OUT/$engine.wasm"
done

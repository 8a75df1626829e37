#!/usr/bin/env bash
# The guest toolchain route (sourced by build.sh and build-crate.sh): Debian's
# rustc-web with -Zbuild-std, linked by wasm-component-ld into wasm32-wasip2
# components. Defines ROOT, TARGET, OUT and `guest_cargo ARGS...` (cargo with
# that toolchain; run it where a guests/.cargo/config.toml applies, or pass
# the same settings).
#
# Env: FERRY_TOOLS_DIR  where setup.sh installed wasm-component-ld
#                       (default ~/.local/share/ferry/tools)
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
  echo "guests/toolchain.sh: missing ${missing[*]}; run tests/setup.sh first" >&2
  exit 1
fi

guest_cargo() {
  env -u RUSTFLAGS -u CARGO_ENCODED_RUSTFLAGS -u RUSTC_WRAPPER -u RUSTC_WORKSPACE_WRAPPER \
      -u CARGO_BUILD_TARGET -u RUSTUP_TOOLCHAIN -u CARGO_TARGET_DIR -u RUSTDOC \
    RUSTC="$DEB_RUSTC" RUSTC_BOOTSTRAP=1 \
    CARGO_TARGET_DIR="$ROOT/target/guests" \
    CARGO_TARGET_WASM32_WASIP2_LINKER="$LINKER" \
    CARGO_TARGET_WASM32_WASIP2_RUSTFLAGS="-L native=$WASI_LIBC -C link-arg=--wasm-ld-path=$WASM_LD" \
    "$DEB_CARGO" "$@"
}


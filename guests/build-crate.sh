#!/usr/bin/env bash
# Builds one plugin crate that lives outside guests/ (one `ferry plugin new`
# wrote, say) with the project's guest toolchain, and prints the path of the
# component. Vendors with rustup build with
# `cargo build --release --target wasm32-wasip2` instead.
#
# Usage: guests/build-crate.sh DIR
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/toolchain.sh"
[ $# -eq 1 ] && [ -f "$1/Cargo.toml" ] || { echo "usage: $0 DIR (a plugin crate)" >&2; exit 2; }
cd "$1"
guest_cargo build --release --offline --quiet --target "$TARGET" -Zbuild-std=std,panic_abort \
  --config "build.rustc=\"$DEB_RUSTC\"" --config 'build.rustdoc="/usr/bin/rustdoc"'
name=$(sed -n 's/^name = "\(.*\)"/\1/p' Cargo.toml | head -1)
echo "$ROOT/target/guests/$TARGET/release/${name//-/_}.wasm"

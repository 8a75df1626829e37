#!/usr/bin/env bash
# Installs what building and testing Ferry needs on a Debian 12 machine, then
# builds the guest plugins. Idempotent: a second run installs nothing.
#
# - Debian packages: rustc-web, cargo-web, rust-web-src (Rust 1.96 with std
#   sources, for -Zbuild-std to wasm32-wasip2), lld-22 (wasm-ld), wasi-libc;
#   sqlite3 (test oracle); prometheus (promtool and a real server for the
#   metrics tests); systemd (systemd-analyze verify of the unit); chromium
#   (the operator page's browser test, with playwright-core from npm);
#   iproute2, iptables, e2fsprogs (the fault tests: network namespaces,
#   packet filters and queues, a loop-mounted disk).
# - wasm-component-ld from crates.io, into $FERRY_TOOLS_DIR.
# - componentize-py from PyPI (a venv in $FERRY_TOOLS_DIR) and lmdb-utils
#   (the LMDB plugin's test oracle): guests/lmdb-py/build.sh.
# - componentize-js from npm (pinned by its package-lock.json) and
#   redis-server/redis-tools (the RDB plugin's oracle): guests/redis-rdb-js/build.sh.
# The host itself builds with the machine's normal (rustup) toolchain.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOLS=${FERRY_TOOLS_DIR:-$HOME/.local/share/ferry/tools}
WASM_COMPONENT_LD_VERSION=0.5.31
LLVM_MAJOR=22
MIN_RUSTC_WEB=1.96
APT_PKGS="rustc-web cargo-web rust-web-src lld-$LLVM_MAJOR wasi-libc sqlite3 python3 python3-venv prometheus systemd chromium iproute2 iptables e2fsprogs"
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"

say() { echo "setup: $*"; }

need_apt=()
for p in $APT_PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$p")
done
if [ ${#need_apt[@]} -eq 0 ] &&
   ! dpkg --compare-versions "$(dpkg-query -W -f='${Version}' rustc-web)" ge "$MIN_RUSTC_WEB"; then
  need_apt+=(rustc-web cargo-web rust-web-src)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  say "apt-get install ${need_apt[*]}"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
v=$(dpkg-query -W -f='${Version}' rustc-web)
dpkg --compare-versions "$v" ge "$MIN_RUSTC_WEB" ||
  { echo "setup: rustc-web $v < $MIN_RUSTC_WEB (it comes from bookworm-security; keep that source enabled)" >&2; exit 1; }
/usr/bin/rustc -vV | grep -q "^LLVM version: $LLVM_MAJOR\." ||
  { echo "setup: Debian rustc's LLVM is not $LLVM_MAJOR; update LLVM_MAJOR here and in guests/build.sh" >&2; exit 1; }

if ! "$TOOLS/bin/wasm-component-ld" --version 2>/dev/null | grep -qF "$WASM_COMPONENT_LD_VERSION"; then
  say "cargo install wasm-component-ld $WASM_COMPONENT_LD_VERSION into $TOOLS (a few minutes)"
  env -u RUSTC -u RUSTFLAGS -u RUSTC_BOOTSTRAP -u CARGO_TARGET_DIR \
    cargo install --quiet --locked --root "$TOOLS" "wasm-component-ld@$WASM_COMPONENT_LD_VERSION"
fi

say "building guest plugins into target/plugins/"
"$ROOT/guests/build.sh"
# Plugins in other languages, each with its own toolchain route, into
# target/plugins/lang/ (which test nodes load only when a test asks).
say "building the Python (LMDB) plugin"
"$ROOT/guests/lmdb-py/build.sh"
say "building the JavaScript (Redis RDB) plugin"
"$ROOT/guests/redis-rdb-js/build.sh" >/dev/null
# The operator page's browser test: playwright-core (pinned by its lock)
# drives Debian's Chromium.
pin=$(sed -n 's/.*"playwright-core": "\(.*\)".*/\1/p' "$ROOT/tests/ui/package.json")
if ! grep -qs "\"version\": \"$pin\"" "$ROOT/tests/ui/node_modules/playwright-core/package.json"; then
  say "npm ci in tests/ui (playwright-core)"
  (cd "$ROOT/tests/ui" && npm ci --no-audit --no-fund >/dev/null)
fi
say "ok"

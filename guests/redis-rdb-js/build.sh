#!/usr/bin/env bash
# Builds the redis-rdb JavaScript plugin with componentize-js into
# target/plugins/lang/redis-rdb.wasm (not target/plugins/: test nodes load
# every plugin there). Idempotent: installs only what is missing and skips the
# build when the output is newer than its sources. Prints the output path.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="$root/target/plugins/lang/redis-rdb.wasm"
tools="${FERRY_TOOLS_DIR:-$HOME/.local/share/ferry/tools}/js"
contract="$root/wit/v0.1.0/engine.wit"

# Redis, for the sample dumps of the tests and the oracle (redis-check-rdb).
if ! command -v redis-server >/dev/null || ! command -v redis-check-rdb >/dev/null; then
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server redis-tools >&2
fi

# Node.js and npm (Debian's, when the machine has none).
if ! command -v npm >/dev/null; then
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm >&2
fi

# componentize-js, pinned by package-lock.json: in this directory, or in the
# shared tools dir when it is there already.
if [ -x "$here/node_modules/.bin/componentize-js" ]; then
    modules="$here/node_modules"
elif [ -x "$tools/node_modules/.bin/componentize-js" ] && cmp -s "$here/package-lock.json" "$tools/package-lock.json"; then
    modules="$tools/node_modules"
else
    (cd "$here" && npm ci --no-audit --no-fund >&2)
    modules="$here/node_modules"
fi

if [ -f "$out" ] && [ "$out" -nt "$here/app.js" ] && [ "$out" -nt "$contract" ] && [ "$out" -nt "$here/build.sh" ] \
    && [ "$out" -nt "$here/package-lock.json" ]; then
    echo "$out"
    exit 0
fi

# The world given to componentize-js: the contract, plus the WASI filesystem
# imports the JS code calls (StarlingMonkey's own WASI 0.2.10; the host
# provides WASI p2). The exported and Ferry-imported interfaces are unchanged.
wit="$here/build/wit"
rm -rf "$wit" && mkdir -p "$wit/deps"
builtin="$modules/@bytecodealliance/jco/lib/wit/builtin"
cp -r "$builtin/0.2.10/wasi-io" "$wit/deps/io"
cp -r "$builtin/0.2.10/wasi-clocks" "$wit/deps/clocks"
cp -r "$builtin/0.2.12/wasi-filesystem" "$wit/deps/filesystem"
sed -i 's/0\.2\.12/0.2.10/g' "$wit/deps/filesystem/"*.wit
sed 's|^    import log;|    import log;\n    import wasi:filesystem/preopens@0.2.10;\n    import wasi:filesystem/types@0.2.10;|' \
    "$contract" > "$wit/engine.wit"
grep -q 'wasi:filesystem/preopens' "$wit/engine.wit"

mkdir -p "$(dirname "$out")"
(cd "$here" && "$modules/.bin/componentize-js" app.js --wit "$wit" --world-name engine \
    -d http fetch-event -o "$out.tmp" >&2)
mv "$out.tmp" "$out"
echo "$out"

#!/usr/bin/env bash
# Builds {{ENGINE}}.wasm from app.js with componentize-js, pinned by
# package-lock.json. Uses the node_modules in $FERRY_JS_MODULES when it holds
# componentize-js, else ./node_modules (made by `npm ci` on the first build:
# needs Node.js 18 or newer and the network once).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
modules="${FERRY_JS_MODULES:-}"
if [ -z "$modules" ] || [ ! -x "$modules/.bin/componentize-js" ]; then
    modules="$here/node_modules"
    if [ ! -x "$modules/.bin/componentize-js" ]; then
        (cd "$here" && npm ci --no-audit --no-fund >&2)
    fi
fi

# The world given to componentize-js: the contract, plus the WASI filesystem
# imports app.js calls (at 0.2.10, the WASI version componentize-js's
# runtime imports; the host provides WASI p2). What the host checks, the
# exports and the Ferry imports, is the contract unchanged.
wit="$here/build/wit"
rm -rf "$wit" && mkdir -p "$wit/deps"
builtin="$modules/@bytecodealliance/jco/lib/wit/builtin"
cp -r "$builtin/0.2.10/wasi-io" "$wit/deps/io"
cp -r "$builtin/0.2.10/wasi-clocks" "$wit/deps/clocks"
cp -r "$builtin/0.2.12/wasi-filesystem" "$wit/deps/filesystem"
sed -i 's/0\.2\.12/0.2.10/g' "$wit/deps/filesystem/"*.wit
sed 's|^    import log;|    import log;\n    import wasi:filesystem/preopens@0.2.10;\n    import wasi:filesystem/types@0.2.10;|' \
    "$here/wit/v0.2.0/engine.wit" > "$wit/engine.wit"
grep -q 'wasi:filesystem/preopens' "$wit/engine.wit"

# `-d http fetch-event`: no wasi:http in the component (the host refuses it).
(cd "$here" && "$modules/.bin/componentize-js" app.js --wit "$wit" --world-name engine \
    -d http fetch-event -o {{ENGINE}}.wasm.tmp >&2)
mv "$here/{{ENGINE}}.wasm.tmp" "$here/{{ENGINE}}.wasm"
echo "$here/{{ENGINE}}.wasm"

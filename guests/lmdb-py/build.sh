#!/usr/bin/env bash
# Builds the LMDB engine plugin (Python, componentize-py) into
# target/plugins/lang/lmdb.wasm. Idempotent: installs the pinned
# componentize-py into a venv and lmdb-utils (for tests) only when missing,
# and rebuilds only when app.py or the WIT is newer than the component.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
TOOLS="${FERRY_TOOLS_DIR:-$HOME/.local/share/ferry/tools}"
CPY_VERSION=0.25.1
out="$root/target/plugins/lang/lmdb.wasm"

if ! "$TOOLS/py/bin/componentize-py" --version 2>/dev/null | grep -q "$CPY_VERSION"; then
    python3 -m venv "$TOOLS/py"
    "$TOOLS/py/bin/pip" install -q "componentize-py==$CPY_VERSION"
fi
if ! command -v mdb_stat >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends lmdb-utils
fi

if [ -f "$out" ] && [ -z "$(find "$here/app.py" "$root/wit/v0.1.0" -newer "$out" 2>/dev/null)" ]; then
    echo "lmdb.wasm is up to date"
    exit 0
fi
mkdir -p "$(dirname "$out")"
cd "$here"
"$TOOLS/py/bin/componentize-py" -d "$root/wit/v0.1.0" -w engine componentize app -o "$out.tmp"
mv "$out.tmp" "$out"
echo "built $out ($(stat -c %s "$out") bytes)"

#!/usr/bin/env bash
# Builds {{ENGINE}}.wasm from app.py with componentize-py (pinned below).
# Uses componentize-py from $COMPONENTIZE_PY, from PATH, or from a venv it
# makes in .venv/ (needs python3 with venv, and the network once).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
version=0.25.1
cpy="${COMPONENTIZE_PY:-}"
if [ -z "$cpy" ] && command -v componentize-py >/dev/null && componentize-py --version | grep -q "$version"; then
    cpy=componentize-py
fi
if [ -z "$cpy" ]; then
    if ! "$here/.venv/bin/componentize-py" --version 2>/dev/null | grep -q "$version"; then
        python3 -m venv "$here/.venv"
        "$here/.venv/bin/pip" install -q "componentize-py==$version"
    fi
    cpy="$here/.venv/bin/componentize-py"
fi
cd "$here"
"$cpy" -d wit/v0.2.0 -w engine componentize app -o {{ENGINE}}.wasm.tmp >&2
mv {{ENGINE}}.wasm.tmp {{ENGINE}}.wasm
echo "$here/{{ENGINE}}.wasm"

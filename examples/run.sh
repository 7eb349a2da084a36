#!/usr/bin/env bash
# The README's first command: build what the example pipeline needs (the priority-router
# policy component), then run examples/reviews on the local mesh and print its results.
# Extra arguments go to `asya-host up` (e.g. --output results.jsonl).
# ASYA_HOST_BIN=path/to/asya-host uses that binary instead of `cargo run`.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
  rustup target add wasm32-wasip2
fi
cargo build --quiet --manifest-path plugins/Cargo.toml --target wasm32-wasip2 --release -p priority-router
if [ -n "${ASYA_HOST_BIN:-}" ]; then
  host=("$ASYA_HOST_BIN")
else
  host=(cargo run --quiet -p asya-host --)
fi
exec "${host[@]}" up examples/reviews/flow.toml --input examples/reviews/inputs.jsonl "$@"

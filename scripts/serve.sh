#!/usr/bin/env bash
# The run command: fetches the default models if needed, builds ragway (release) and
# serves the OpenAI-compatible API with them and an embedded index under ./data.
#
#   scripts/serve.sh [ragway serve flags, e.g. --port 9000]
set -euo pipefail
cd "$(dirname "$0")/.."

cache="${RAGWAY_CACHE:-$HOME/.cache/ragway}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$cache/target}"
export RAGWAY_MODELS_DIR="${RAGWAY_MODELS_DIR:-$PWD/models}"

scripts/setup-models.sh "$RAGWAY_MODELS_DIR" >/dev/null
cargo build --release -p ragway-gateway --bin ragway
exec "$CARGO_TARGET_DIR/release/ragway" serve "$@"

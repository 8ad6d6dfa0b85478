#!/usr/bin/env bash
# Long property-test campaigns over the parsers of untrusted bytes: WAL records and filters
# (index), template files and the prompt store round trip (prompts), chat-template rendering
# (engine), and the OpenAI request types (gateway). CI runs each with proptest's default 256
# cases; this runs CASES of each (default 20000). Failing inputs are shrunk and printed;
# proptest keeps them in proptest-regressions/ beside the test, to be committed.
#
#   scripts/fuzz.sh [CASES]
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${RAGWAY_CACHE:-$HOME/.cache/ragway}/target}"
export PROPTEST_CASES="${1:-20000}"
echo "[fuzz] $PROPTEST_CASES cases per property" >&2
cargo test --profile ci -p ragway-index --test fuzz
cargo test --profile ci -p ragway-prompts --test fuzz
cargo test --profile ci -p ragway-engine --test fuzz
cargo test --profile ci -p ragway-gateway --lib -- fuzz

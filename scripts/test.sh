#!/usr/bin/env bash
# The test command: fetches the default models (scripts/setup-models.sh), creates the
# Python environment with the official `openai` client that the API tests drive, then runs
# every test of the workspace in the `ci` profile (optimized, so real models run fast).
#
#   scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

cache="${RAGWAY_CACHE:-$HOME/.cache/ragway}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$cache/target}"
export RAGWAY_MODELS_DIR="${RAGWAY_MODELS_DIR:-$PWD/models}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"

scripts/setup-models.sh "$RAGWAY_MODELS_DIR" >/dev/null

pyenv="$cache/pyenv"
if ! "$pyenv/bin/python" -c "import openai" 2>/dev/null; then
  echo "[test] creating $pyenv with the openai client" >&2
  python3 -m venv "$pyenv"
  "$pyenv/bin/pip" install --quiet --disable-pip-version-check "openai>=1.40,<4"
fi
export RAGWAY_TEST_PYTHON="${RAGWAY_TEST_PYTHON:-$pyenv/bin/python}"

exec cargo test --profile ci --workspace "$@"

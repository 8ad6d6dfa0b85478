#!/usr/bin/env bash
# The test command: fetches the default models (scripts/setup-models.sh) and PostgreSQL with
# pgvector (scripts/setup-postgres.sh), creates the Python environment with the official
# `openai` client that the API tests drive, then runs
# every test of the workspace in the `ci` profile (optimized, so real models run fast).
#
#   scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

cache="${RAGWAY_CACHE:-$HOME/.cache/ragway}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$cache/target}"
export RAGWAY_MODELS_DIR="${RAGWAY_MODELS_DIR:-$PWD/models}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"

scripts/setup-models.sh --with-gemma3 "$RAGWAY_MODELS_DIR" >/dev/null

pyenv="$cache/pyenv"
if ! "$pyenv/bin/python" -c "import openai, langchain_openai" 2>/dev/null; then
  echo "[test] creating $pyenv with the openai client and LangChain's OpenAI integration" >&2
  [ -x "$pyenv/bin/pip" ] || python3 -m venv "$pyenv"
  "$pyenv/bin/pip" install --quiet --disable-pip-version-check "openai>=1.40,<4" "langchain-openai>=0.3,<2"
fi
export RAGWAY_TEST_PYTHON="${RAGWAY_TEST_PYTHON:-$pyenv/bin/python}"

# PostgreSQL 18 + pgvector for the `postgres` store's tests (each test starts its own server
# from this installation and stops it).
if [ -z "${RAGWAY_PG_INSTALL:-}" ]; then
  RAGWAY_PG_INSTALL=$(scripts/setup-postgres.sh)
  export RAGWAY_PG_INSTALL
fi

# llama.cpp's OpenAI-compatible server as an upstream (fleet::llama_cpp_server_as_upstream)
# runs when an environment with llama-cpp-python[server] exists; building llama.cpp takes
# ~20 minutes on 2 cores, so it is not installed here (the reference drivers' environment has it).
if [ -z "${RAGWAY_LLAMA_SERVER_PYTHON:-}" ] && "$cache/refenv/bin/python" -c "import llama_cpp.server.app" 2>/dev/null; then
  export RAGWAY_LLAMA_SERVER_PYTHON="$cache/refenv/bin/python"
fi

# The deployment checks validate docker-compose.yml and the Prometheus files offline with
# Debian's docker-compose and prometheus (promtool) packages; the GraphiQL page is tested in
# Debian's headless chromium.
if ! command -v docker-compose >/dev/null || ! command -v promtool >/dev/null || ! command -v chromium >/dev/null; then
  echo "[test] installing docker-compose, promtool and chromium (Debian packages) for the deployment and browser checks" >&2
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  pkgs="docker-compose prometheus chromium"
  $sudo apt-get install -y -qq --no-install-recommends $pkgs >/dev/null 2>&1 ||
    { $sudo apt-get update -qq && $sudo apt-get install -y -qq --no-install-recommends $pkgs >/dev/null; }
fi

# Run once, keep the log, and close with one summary line over every test binary.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --profile ci --workspace "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "summary: %d passed, %d failed\n", p, f }' "$log"
exit "$status"

#!/usr/bin/env bash
# Creates the Python environment with the reference implementations that the benchmark
# drivers run beside ragway (sentence-transformers + torch; llama-cpp-python with
# --with-llamacpp, which builds llama.cpp from source: ~20 min on 2 cores).
# Not needed by the tests.
#
#   scripts/setup-reference.sh [--with-llamacpp]
set -euo pipefail
env="${RAGWAY_CACHE:-$HOME/.cache/ragway}/refenv"
[ -x "$env/bin/python" ] || python3 -m venv "$env"
"$env/bin/pip" install --quiet --disable-pip-version-check sentence-transformers torch numpy hnswlib==0.8.0 faiss-cpu
if [ "${1:-}" = "--with-llamacpp" ]; then
  # Native build, but without AMX: -march=native turns on AMX tiles on Sapphire Rapids, and
  # VMs that do not grant the tile state kill the process with SIGILL at the first prefill.
  noamx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  CMAKE_ARGS="-DGGML_NATIVE=ON" CFLAGS="$noamx" CXXFLAGS="$noamx" \
    "$env/bin/pip" install --quiet --force-reinstall --no-deps --no-cache-dir llama-cpp-python==0.3.36
  # Its run-time dependencies (--no-deps above keeps pip from rebuilding numpy and friends).
  "$env/bin/pip" install --quiet --disable-pip-version-check diskcache jinja2 typing-extensions
fi
echo "$env/bin/python"

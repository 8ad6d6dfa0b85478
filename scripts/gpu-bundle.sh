#!/usr/bin/env bash
# Assembles what scripts/gpu-check.sh needs on a GPU machine that has the NVIDIA driver,
# CUDA 13 and PyTorch but no Rust toolchain and no network:
#
#   DIR/bin/{ragway,gpu-bench}   built here with `--features cuda` (scripts/build-cuda.sh)
#   DIR/models/                  SmolLM2-135M-Instruct, all-MiniLM-L6-v2 (and gemma-3-270m if set up)
#   DIR/fixtures/                llama.cpp fixtures the correctness check reads
#   DIR/wheels/                  the reference's Python packages (gguf, transformers,
#                                sentence-transformers and the small packages they need)
#   DIR/gpu-check.sh, DIR/gpu_reference.py
#
#   scripts/gpu-bundle.sh [DIR]          (default: dist/gpu)
#
# PYTHON_VERSIONS (default "3.10 3.11 3.12 3.13") lists the interpreters the binary wheels are
# fetched for, since the GPU machine's Python is not known here.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-dist/gpu}"
models="${RAGWAY_MODELS_DIR:-models}"
python="${PYTHON:-python3}"
log() { echo "[gpu-bundle] $*" >&2; }

scripts/build-cuda.sh "$dir"
mkdir -p "$dir/models" "$dir/fixtures" "$dir/wheels"
for m in SmolLM2-135M-Instruct all-MiniLM-L6-v2 gemma-3-270m; do
  if [ -d "$models/$m" ]; then
    rm -rf "${dir:?}/models/$m"
    cp -r "$models/$m" "$dir/models/$m"
  fi
done
[ -d "$dir/models/SmolLM2-135M-Instruct" ] || { log "run scripts/setup-models.sh first"; exit 1; }
cp engine/tests/data/smollm2_greedy.json engine/tests/data/gemma3_270m.json "$dir/fixtures/"
cp scripts/gpu-check.sh benches/scripts/gpu_reference.py "$dir/"

# Pure-Python packages once; compiled ones for each interpreter.
pure=(gguf transformers sentence-transformers huggingface-hub tqdm packaging requests urllib3 idna certifi filelock fsspec)
binary=(tokenizers safetensors hf-xet regex pyyaml charset-normalizer numpy)
log "fetching the reference's wheels"
"$python" -m pip download --quiet --no-deps --only-binary=:all: --dest "$dir/wheels" "${pure[@]}"
for v in ${PYTHON_VERSIONS:-3.10 3.11 3.12 3.13}; do
  "$python" -m pip download --quiet --no-deps --only-binary=:all: --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --python-version "$v" \
    --dest "$dir/wheels" "${binary[@]}"
done
du -sh "$dir" "$dir"/* >&2
log "copy $dir to the GPU machine and run: $dir/gpu-check.sh"

#!/usr/bin/env bash
# Builds ragway with the `cuda` feature on a machine without a GPU or a CUDA install.
#
# CUDA's compiler, headers and libraries come as PyPI wheels (nvidia-cuda-nvcc, -crt, -nvvm,
# -cccl, -runtime, -nvrtc, nvidia-cublas, nvidia-curand), pinned to CUDA 13.0 so that the
# PTX it writes loads on any driver that supports CUDA 13. The wheels are cached under
# $RAGWAY_CACHE/wheels and unpacked into $RAGWAY_CACHE/cuda-13.0 (a CUDA_HOME layout). The
# driver library (libcuda.so.1) ships with the NVIDIA driver only, so the link uses a stub
# generated from cuda.h; the real driver library is loaded at run time on the GPU machine.
#
#   scripts/build-cuda.sh [OUT_DIR]     (default: dist/cuda)
#
# Environment: CUDA_COMPUTE_CAP (default 90, Hopper) selects the architecture of the
# statically compiled kernels; the PTX kernels are JIT-compiled for the actual GPU.
# CARGO_PROFILE (default release). The result, OUT_DIR/bin/{ragway,gpu-bench}, needs at run
# time libcublas.so.13, libcublasLt.so.13, libcurand.so.10 and libnvrtc.so.13 (PyTorch's CUDA
# 13 wheels carry them; scripts/gpu-check.sh finds them) and the driver's libcuda.so.1.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-dist/cuda}"
cache="${RAGWAY_CACHE:-$HOME/.cache/ragway}"
wheels="$cache/wheels"
cuda="$cache/cuda-13.0"
python="${PYTHON:-python3}"
profile="${CARGO_PROFILE:-release}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR_CUDA:-$cache/target-cuda}"

log() { echo "[build-cuda] $*" >&2; }

reqs=(
  "nvidia-cuda-nvcc==13.0.88" "nvidia-cuda-crt==13.0.88" "nvidia-nvvm==13.0.88"
  "nvidia-cuda-cccl==13.0.85" "nvidia-cuda-runtime==13.0.96" "nvidia-cuda-nvrtc==13.0.88"
  "nvidia-cublas==13.0.2.14" "nvidia-curand==10.4.5.25"
)

if [ ! -x "$cuda/bin/nvcc" ] || [ ! -e "$cuda/.complete" ]; then
  mkdir -p "$wheels"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  for req in "${reqs[@]}"; do
    name="${req%%==*}"; ver="${req##*==}"
    whl="$(ls "$wheels"/"${name//-/_}"-"$ver"-*.whl 2>/dev/null | head -n1 || true)"
    if [ -z "$whl" ]; then
      log "downloading $req"
      "$python" -m pip download --quiet --no-deps --dest "$wheels" "$req"
      whl="$(ls "$wheels"/"${name//-/_}"-"$ver"-*.whl | head -n1)"
    fi
    "$python" - "$whl" "$tmp" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])
PY
  done
  rm -rf "$cuda"
  mkdir -p "$(dirname "$cuda")"
  mv "$tmp/nvidia/cu13" "$cuda"
  chmod +x "$cuda"/bin/* "$cuda"/nvvm/bin/* 2>/dev/null || true
  # The linker looks for unversioned names.
  for lib in cublas cublasLt curand nvrtc cudart; do
    so="$(ls "$cuda/lib/lib$lib.so."* | grep -E "lib$lib\.so\.[0-9]+$" | head -n1)"
    ln -sf "$(basename "$so")" "$cuda/lib/lib$lib.so"
  done
  # A link-time stand-in for the driver library: every cu* entry point that cuda.h declares
  # (and every versioned name its macros map to), with the driver's soname, so that the
  # binary records a dependency on libcuda.so.1 and binds to the real one at run time.
  mkdir -p "$cuda/lib/stubs"
  {
    grep -oE 'CUDAAPI[[:space:]]+cu[A-Za-z0-9_]+' "$cuda/include/cuda.h" | awk '{print $2}'
    grep -oE '#define[[:space:]]+cu[A-Za-z0-9_]+[[:space:]]+cu[A-Za-z0-9_]+' "$cuda/include/cuda.h" | awk '{print $2; print $3}'
  } | sort -u | awk '{print "void " $1 "(void) {}"}' > "$cuda/lib/stubs/cuda_stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$cuda/lib/stubs/libcuda.so" "$cuda/lib/stubs/cuda_stub.c"
  touch "$cuda/.complete"
  log "CUDA 13.0 toolkit in $cuda"
fi

export CUDA_HOME="$cuda" CUDA_PATH="$cuda" CUDA_ROOT="$cuda"
export PATH="$cuda/bin:$PATH"
export LIBRARY_PATH="$cuda/lib:$cuda/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
export RUSTFLAGS="${RUSTFLAGS:-} -L native=$cuda/lib -L native=$cuda/lib/stubs"
log "nvcc: $(nvcc --version | tail -n1); compute capability $CUDA_COMPUTE_CAP; target dir $CARGO_TARGET_DIR"

# One invocation for both, so that they share one feature set (and one build of the kernels).
cargo build --profile "$profile" -p ragway-gateway -p ragway-benches --bin ragway --bin gpu-bench \
  --features ragway-gateway/cuda,ragway-benches/cuda

dir="$CARGO_TARGET_DIR/$profile"
[ "$profile" = dev ] && dir="$CARGO_TARGET_DIR/debug"
mkdir -p "$out/bin"
cp "$dir/ragway" "$dir/gpu-bench" "$out/bin/"
log "built $out/bin/ragway and $out/bin/gpu-bench; they need at run time:"
ldd "$out/bin/ragway" | grep -E 'cuda|cublas|curand|nvrtc' >&2 || true

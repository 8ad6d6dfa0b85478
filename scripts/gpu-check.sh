#!/usr/bin/env bash
# Runs ragway's GPU tests and GPU benchmark on a CUDA machine from a bundle made by
# scripts/gpu-bundle.sh (prebuilt binaries, models, fixtures, reference wheels): no Rust
# toolchain and no network needed, only the NVIDIA driver and a Python with PyTorch (whose
# CUDA 13 packages also provide the cuBLAS, cuRAND and NVRTC libraries the binary loads).
# Budget: under 8 minutes. Writes OUT/gpu-summary.json (OUT: $OUT, or the bundle).
#
#   gpu-check.sh [BUNDLE_DIR]      (default: the folder of this script)
#
# Steps (each with its own time limit; a failed step is reported and the others still run):
#   1. correctness: gpu-bench --mode check for SmolLM2 (and Gemma 3 270M when bundled): GPU
#      logits and greedy tokens against the CPU decoder, batched against sequential;
#   2. ragway's benchmark: gpu-bench --mode bench (decode, prefill 512/4096, 1/8/32/128
#      streams, time to first token, bandwidth share, embedder passages/s);
#   3. the reference: PyTorch + transformers (bf16) and sentence-transformers on the same GPU.
set -uo pipefail
bundle="$(cd "${1:-$(dirname "$0")}" && pwd)"
out="${OUT:-$bundle}"
mkdir -p "$out"
python="${PYTHON:-python3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
log() { echo "[gpu-check] $(date +%T) $*" >&2; }

# The CUDA libraries of the Python environment (PyTorch's nvidia-* packages), for the binary.
libs="$("$python" - <<'PY'
import glob, os, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()]
dirs = set()
for r in roots:
    for pat in ("nvidia/*/lib", "nvidia/cu13/lib", "torch/lib"):
        for d in glob.glob(os.path.join(r, pat)):
            if glob.glob(os.path.join(d, "lib*.so*")):
                dirs.add(d)
print(":".join(sorted(dirs)))
PY
)"
export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
missing=$(ldd "$bundle/bin/gpu-bench" 2>/dev/null | grep "not found" | awk '{print $1}' | tr '\n' ' ')
if [ -n "$missing" ]; then
  log "the binary cannot find: $missing (looked in: $libs)"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$work/gpu.txt" 2>/dev/null || true
log "GPU: $(cat "$work/gpu.txt")"

export RAGWAY_MODELS_DIR="$bundle/models" HF_HUB_OFFLINE=1
run_step() { # name seconds command... -> stdout's last JSON line into $work/name.json
  local name="$1" secs="$2"; shift 2
  log "$name (limit ${secs}s)"
  local t0=$SECONDS
  timeout "$secs" "$@" > "$work/$name.out" 2> "$work/$name.err"
  local rc=$?
  grep '^{' "$work/$name.out" > "$work/$name.jsonl" || true
  log "$name: exit $rc after $((SECONDS - t0))s"
  echo "$rc" > "$work/$name.rc"
  tail -n 20 "$work/$name.err" > "$work/$name.tail"
}

run_step check_smollm2 120 "$bundle/bin/gpu-bench" --mode check --model SmolLM2-135M-Instruct --fixtures "$bundle/fixtures"
if [ -d "$bundle/models/gemma-3-270m" ]; then
  run_step check_gemma3 90 "$bundle/bin/gpu-bench" --mode check --model gemma-3-270m --fixtures "$bundle/fixtures"
fi
run_step bench 170 "$bundle/bin/gpu-bench" --mode bench --model SmolLM2-135M-Instruct --runs 3

# The reference's packages: whatever the environment lacks, from the bundled wheels.
"$python" - "$work/need.txt" <<'PY'
import importlib.util, sys
mods = {"gguf": "gguf", "transformers": "transformers", "sentence_transformers": "sentence-transformers",
        "huggingface_hub": "huggingface-hub", "tokenizers": "tokenizers", "safetensors": "safetensors",
        "tqdm": "tqdm", "packaging": "packaging", "requests": "requests", "urllib3": "urllib3", "idna": "idna",
        "certifi": "certifi", "filelock": "filelock", "fsspec": "fsspec", "regex": "regex", "yaml": "pyyaml",
        "charset_normalizer": "charset-normalizer", "numpy": "numpy", "hf_xet": "hf-xet"}
need = [pkg for mod, pkg in mods.items() if importlib.util.find_spec(mod) is None]
open(sys.argv[1], "w").write(" ".join(need))
PY
if [ -s "$work/need.txt" ]; then
  log "installing from the bundle: $(cat "$work/need.txt")"
  # shellcheck disable=SC2046
  "$python" -m pip install --quiet --no-index --no-deps --find-links "$bundle/wheels" --target "$work/py" \
    $(cat "$work/need.txt") 2> "$work/pip.err" || log "pip: $(tail -n 3 "$work/pip.err")"
  export PYTHONPATH="$work/py${PYTHONPATH:+:$PYTHONPATH}"
fi
run_step reference 150 "$python" "$bundle/gpu_reference.py" --runs 3 \
  --gguf "$bundle/models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf" --minilm "$bundle/models/all-MiniLM-L6-v2"

"$python" - "$work" "$out/gpu-summary.json" <<'PY'
import json, os, sys
work, dest = sys.argv[1], sys.argv[2]
def load(name):
    p = os.path.join(work, name + ".jsonl")
    lines = [l for l in open(p)] if os.path.exists(p) else []
    return json.loads(lines[-1]) if lines else None
def rc(name):
    p = os.path.join(work, name + ".rc")
    return int(open(p).read()) if os.path.exists(p) else None
def tail(name):
    p = os.path.join(work, name + ".tail")
    return open(p).read() if os.path.exists(p) else ""
s = {"gpu": open(os.path.join(work, "gpu.txt")).read().strip() if os.path.exists(os.path.join(work, "gpu.txt")) else None}
for step in ("check_smollm2", "check_gemma3", "bench", "reference"):
    if rc(step) is not None:
        s[step] = {"exit": rc(step), "result": load(step), "stderr_tail": tail(step) if rc(step) else ""}
b = (s.get("bench") or {}).get("result") or {}
r = ((s.get("reference") or {}).get("result") or {})
rd, re_ = r.get("decoder") or {}, r.get("embedder") or {}
def ratio(a, c):
    return a / c if a and c else None
s["goals"] = {
    "single_stream_decode_vs_transformers": ratio(b.get("single_stream_decode_tok_s"), rd.get("single_stream_decode_tok_s")),
    "aggregate_128_over_own_single": b.get("aggregate_over_single"),
    "embedder_vs_sentence_transformers": ratio((b.get("embedder") or {}).get("passages_per_s"), re_.get("passages_per_s")),
    "bandwidth_share": b.get("bandwidth_share"),
    "targets": {"single_stream_decode_vs_transformers": 2.0, "aggregate_128_over_own_single": 30.0,
                "embedder_vs_sentence_transformers": 1.5},
}
s["correctness_passed"] = all((s.get(k) or {}).get("exit") == 0 for k in ("check_smollm2", "check_gemma3") if k in s)
json.dump(s, open(dest, "w"), indent=2)
print(json.dumps(s["goals"]))
print("correctness passed:", s["correctness_passed"])
PY
log "summary: $out/gpu-summary.json"

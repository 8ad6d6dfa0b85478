//! sentence-transformers configuration: pooling, normalization and sequence length, read
//! from the model folder the way sentence-transformers reads them.

use crate::error::{EngineError, Result};
use serde::Deserialize;
use std::path::Path;

/// How token vectors become one sentence vector (`1_Pooling/config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// Mean over the sequence's tokens (`pooling_mode_mean_tokens`).
    Mean,
    /// The first token (`pooling_mode_cls_token`).
    Cls,
    /// Element-wise maximum over tokens (`pooling_mode_max_tokens`).
    Max,
    /// Sum divided by sqrt(length) (`pooling_mode_mean_sqrt_len_tokens`).
    MeanSqrtLen,
}

/// What sentence-transformers' module list says about a model.
#[derive(Debug, Clone, PartialEq)]
pub struct SentenceConfig {
    pub pooling: Pooling,
    /// L2-normalize the pooled vector (a `Normalize` module in `modules.json`).
    pub normalize: bool,
    /// Longest sequence, special tokens included; longer inputs are truncated.
    pub max_seq_length: usize,
}

#[derive(Deserialize)]
struct PoolingFile {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
    #[serde(default)]
    pooling_mode: Option<String>,
}

#[derive(Deserialize)]
struct Module {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    path: String,
}

#[derive(Deserialize)]
struct SbertFile {
    max_seq_length: Option<usize>,
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path)?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| EngineError::InvalidModel { path: path.to_path_buf(), reason: e.to_string() })
}

impl SentenceConfig {
    /// Reads `modules.json`, the pooling module's `config.json` and
    /// `sentence_bert_config.json`. Without them (a plain BERT folder): mean pooling, no
    /// normalization, `max_position_embeddings` as the length limit.
    pub fn load(dir: &Path, max_position_embeddings: usize) -> Result<Self> {
        let modules: Vec<Module> = read_json(&dir.join("modules.json"))?.unwrap_or_default();
        let pooling_dir = modules
            .iter()
            .find(|m| m.kind.ends_with("models.Pooling"))
            .map(|m| m.path.clone())
            .unwrap_or_else(|| "1_Pooling".to_string());
        let pooling = match read_json::<PoolingFile>(&dir.join(&pooling_dir).join("config.json"))? {
            None => Pooling::Mean,
            Some(p) => Self::pooling_mode(&p).map_err(|reason| EngineError::InvalidModel {
                path: dir.join(&pooling_dir).join("config.json"),
                reason,
            })?,
        };
        // sentence-transformers applies a `Normalize` module even when its folder is absent.
        let normalize = modules.iter().any(|m| m.kind.ends_with("models.Normalize"));
        let sbert: Option<SbertFile> = read_json(&dir.join("sentence_bert_config.json"))?;
        let max_seq_length =
            sbert.and_then(|s| s.max_seq_length).unwrap_or(max_position_embeddings).min(max_position_embeddings);
        Ok(Self { pooling, normalize, max_seq_length })
    }

    fn pooling_mode(p: &PoolingFile) -> std::result::Result<Pooling, String> {
        if let Some(mode) = &p.pooling_mode {
            return match mode.as_str() {
                "mean" => Ok(Pooling::Mean),
                "cls" => Ok(Pooling::Cls),
                "max" => Ok(Pooling::Max),
                "mean_sqrt_len_tokens" => Ok(Pooling::MeanSqrtLen),
                other => Err(format!("unsupported pooling mode `{other}`")),
            };
        }
        let modes = [
            (p.pooling_mode_cls_token, Pooling::Cls),
            (p.pooling_mode_mean_tokens, Pooling::Mean),
            (p.pooling_mode_max_tokens, Pooling::Max),
            (p.pooling_mode_mean_sqrt_len_tokens, Pooling::MeanSqrtLen),
        ];
        let on: Vec<Pooling> = modes.iter().filter(|(b, _)| *b).map(|(_, m)| *m).collect();
        match on.as_slice() {
            [m] => Ok(*m),
            [] => Err("no pooling mode is enabled".into()),
            _ => Err("several pooling modes at once (concatenated pooling) are not supported".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    #[test]
    fn reads_cls_pooling_and_no_normalize() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        write(
            dir,
            "modules.json",
            r#"[{"idx":0,"name":"0","path":"","type":"sentence_transformers.models.Transformer"},{"idx":1,"name":"1","path":"1_Pooling","type":"sentence_transformers.models.Pooling"}]"#,
        );
        write(
            dir,
            "1_Pooling/config.json",
            r#"{"word_embedding_dimension":8,"pooling_mode_cls_token":true,"pooling_mode_mean_tokens":false}"#,
        );
        write(dir, "sentence_bert_config.json", r#"{"max_seq_length":1024}"#);
        let c = SentenceConfig::load(dir, 512).unwrap();
        assert_eq!(c, SentenceConfig { pooling: Pooling::Cls, normalize: false, max_seq_length: 512 });
        write(dir, "1_Pooling/config.json", r#"{"pooling_mode_cls_token":true,"pooling_mode_mean_tokens":true}"#);
        assert!(SentenceConfig::load(dir, 512).is_err());
    }

    #[test]
    fn bare_folder_defaults_to_mean() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let c = SentenceConfig::load(dir, 128).unwrap();
        assert_eq!(c, SentenceConfig { pooling: Pooling::Mean, normalize: false, max_seq_length: 128 });
    }
}

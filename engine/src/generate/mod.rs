//! Text generation: llama-family decoders (GGUF quantized or safetensors), their tokenizers
//! and chat templates, sampling, and the continuous-batching scheduler that owns a model.
//!
//! ```no_run
//! use ragway_engine::generate::{GenerateConfig, GenerateWorker, GenerationRequest, SamplingParams};
//! use ragway_engine::models::{default_models_dir, DEFAULT_GENERATION_MODEL_ID};
//!
//! let handle = GenerateWorker::spawn(GenerateConfig::new(DEFAULT_GENERATION_MODEL_ID, DEFAULT_GENERATION_MODEL_ID, default_models_dir()))?;
//! let prompt = handle.tokenizer().encode("The capital of France is", true)?;
//! let mut stream = handle.submit(GenerationRequest::new(prompt, 16, SamplingParams::greedy()))?;
//! while let Some(event) = stream.blocking_next() {
//!     println!("{event:?}");
//! }
//! # Ok::<(), ragway_engine::EngineError>(())
//! ```

pub mod chat;
pub mod constrain;
pub mod device_model;
pub mod model;
pub mod paged;
pub mod qmatmul;
pub mod repack;
pub mod sampling;
pub mod scheduler;
pub mod spm;
pub mod tokenizer;

pub use chat::{ChatMessage, ChatTemplate};
pub use constrain::{Constrainer, Constraint, Grammar, GrammarLimits};
pub use device_model::{DeviceLlama, KvSizing, PagedSeq, SizeKv};
pub use model::{KvCache, Llama, LlamaConfig, Scratch, SeqBatch};
pub use paged::PagedKv;
pub use sampling::{ModelSampling, SamplingParams, TokenLogprob};
pub use scheduler::{
    Decoder, DecoderKind, FinishReason, GenEvent, GenMetrics, GenerateConfig, DEFAULT_MAX_TOKENS, GenerateHandle, GenerateWorker, GenerationRequest, LazyConstraint,
    GenerationStream,
};
pub use tokenizer::{IncrementalDecoder, TextTokenizer};

use crate::error::{EngineError, Result};
use crate::models::{
    resolve_model_dir, resolve_model_file, ModelFiles, DEFAULT_GENERATION_GGUF, DEFAULT_GENERATION_MODEL_ID,
    DEFAULT_GENERATION_REPO,
};
use std::path::{Path, PathBuf};

/// A decoder ([`Llama`] on the CPU, or [`DeviceLlama`]) with everything needed to serve it.
pub struct GenerativeModel<M = Llama> {
    pub model: M,
    pub tokenizer: TextTokenizer,
    /// `None` when the model has no chat template and none was configured.
    pub chat_template: Option<ChatTemplate>,
    /// Sampling values the model recommends.
    pub sampling: ModelSampling,
    /// Where the weights came from.
    pub path: PathBuf,
}

/// Files of a Hugging Face llama repository.
const LLAMA_FILES: ModelFiles<'static> = ModelFiles {
    required: &["config.json", "tokenizer.json", "model.safetensors"],
    optional: &["tokenizer_config.json", "generation_config.json"],
};

/// What [`GenerativeModel`] needs of a decoder.
pub trait DecoderModel {
    fn config(&self) -> &LlamaConfig;
}

impl DecoderModel for Llama {
    fn config(&self) -> &LlamaConfig {
        Llama::config(self)
    }
}

impl DecoderModel for DeviceLlama {
    fn config(&self) -> &LlamaConfig {
        DeviceLlama::config(self)
    }
}

/// Builds a decoder from a GGUF file (with its parsed header) or a safetensors folder.
pub struct DecoderLoader<'a, M> {
    pub gguf: &'a dyn Fn(&Path, &candle_core::quantized::gguf_file::Content) -> Result<M>,
    pub safetensors: &'a dyn Fn(&Path) -> Result<M>,
}

impl GenerativeModel<Llama> {
    /// Loads `source`: a `.gguf` file, a folder holding one, a Hugging Face llama folder
    /// (`config.json` + `*.safetensors` + `tokenizer.json`), a name under `models_dir`, or a
    /// hub repository, on the CPU. `chat_template` overrides the model's own template.
    pub fn load(source: &str, models_dir: &Path, chat_template: Option<&str>) -> Result<Self> {
        Self::load_with(
            source,
            models_dir,
            chat_template,
            DecoderLoader { gguf: &|p, c| Llama::from_gguf(p, c), safetensors: &|d| Llama::from_safetensors(d) },
        )
    }
}

impl GenerativeModel<DeviceLlama> {
    /// [`GenerativeModel::load`] onto `device` with a paged KV cache sized by `kv`.
    pub fn load_on_device(
        source: &str,
        models_dir: &Path,
        chat_template: Option<&str>,
        device: &candle_core::Device,
        kv: KvSizing,
    ) -> Result<Self> {
        Self::load_on_device_sized(source, models_dir, chat_template, device, &|_, _| Ok(kv))
    }

    /// [`GenerativeModel::load_on_device`] with the KV cache sized by `size` once the
    /// weights are on the device (from the model's configuration and the bytes they took).
    pub fn load_on_device_sized(
        source: &str,
        models_dir: &Path,
        chat_template: Option<&str>,
        device: &candle_core::Device,
        size: SizeKv<'_>,
    ) -> Result<Self> {
        Self::load_with(
            source,
            models_dir,
            chat_template,
            DecoderLoader {
                gguf: &|p, c| DeviceLlama::from_gguf(p, c, device, size),
                safetensors: &|d| DeviceLlama::from_safetensors(d, device, size),
            },
        )
    }
}

impl<M: DecoderModel> GenerativeModel<M> {
    /// The same model with its decoder wrapped (or converted) by `f`.
    pub fn map<N>(self, f: impl FnOnce(M) -> N) -> GenerativeModel<N> {
        GenerativeModel {
            model: f(self.model),
            tokenizer: self.tokenizer,
            chat_template: self.chat_template,
            sampling: self.sampling,
            path: self.path,
        }
    }

    /// Resolves `source` (see [`GenerativeModel::load`]) and builds its decoder with `loader`.
    pub fn load_with(
        source: &str,
        models_dir: &Path,
        chat_template: Option<&str>,
        loader: DecoderLoader<'_, M>,
    ) -> Result<Self> {
        let path = resolve_generation_model(source, models_dir)?;
        let _span = tracing::info_span!("load_decoder", path = %path.display()).entered();
        let loaded = if path.is_file() {
            Self::from_gguf(&path, chat_template, loader.gguf)
        } else {
            Self::from_safetensors(&path, chat_template, loader.safetensors)
        };
        release_freed_heap();
        loaded
    }

    fn from_gguf(
        path: &Path,
        template_override: Option<&str>,
        build: &dyn Fn(&Path, &candle_core::quantized::gguf_file::Content) -> Result<M>,
    ) -> Result<Self> {
        let mut file = std::fs::File::open(path)?;
        let content = candle_core::quantized::gguf_file::Content::read(&mut file)
            .map_err(|e| EngineError::InvalidModel { path: path.to_path_buf(), reason: format!("GGUF: {e}") })?;
        let model = build(path, &content)?;
        // tokenizer.json beside the file wins; the special ids come from the GGUF either way.
        let beside = path.with_file_name("tokenizer.json");
        let tokenizer = if beside.is_file() {
            let (bos, eos, add_bos) = TextTokenizer::gguf_specials(&content);
            TextTokenizer::from_file(&beside, bos, eos, add_bos)?
        } else {
            TextTokenizer::from_gguf(&content)?
        };
        let source =
            template_override.map(str::to_string).or_else(|| model::md_str(&content, "tokenizer.chat_template"));
        let chat_template = compile_template(source, &tokenizer)?;
        check_vocab(&model, &tokenizer, path)?;
        let sampling = ModelSampling::from_gguf(&content);
        Ok(Self { model, tokenizer, chat_template, sampling, path: path.to_path_buf() })
    }

    fn from_safetensors(dir: &Path, template_override: Option<&str>, build: &dyn Fn(&Path) -> Result<M>) -> Result<Self> {
        let model = build(dir)?;
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?).unwrap_or_default();
        let tk_cfg: serde_json::Value = std::fs::read_to_string(dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default();
        let id = |v: &serde_json::Value| {
            v.as_u64().map(|v| v as u32).or_else(|| v.as_array()?.first()?.as_u64().map(|v| v as u32))
        };
        let add_bos = tk_cfg.get("add_bos_token").and_then(|v| v.as_bool()).unwrap_or(false);
        let tokenizer = TextTokenizer::from_file(
            &dir.join("tokenizer.json"),
            cfg.get("bos_token_id").and_then(id),
            cfg.get("eos_token_id").and_then(id),
            add_bos,
        )?;
        let source = template_override
            .map(str::to_string)
            .or_else(|| tk_cfg.get("chat_template").and_then(|v| v.as_str()).map(str::to_string));
        let chat_template = compile_template(source, &tokenizer)?;
        check_vocab(&model, &tokenizer, dir)?;
        let sampling = std::fs::read_to_string(dir.join("generation_config.json"))
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .map(|v| ModelSampling::from_generation_config(&v))
            .unwrap_or_default();
        Ok(Self { model, tokenizer, chat_template, sampling, path: dir.to_path_buf() })
    }
}

fn compile_template(source: Option<String>, tk: &TextTokenizer) -> Result<Option<ChatTemplate>> {
    let name = |id: Option<u32>| id.and_then(|i| tk.id_to_token(i)).unwrap_or_default();
    source.map(|s| ChatTemplate::new(&s, &name(tk.bos_id), &name(tk.eos_id))).transpose()
}

fn check_vocab(model: &impl DecoderModel, tk: &TextTokenizer, path: &Path) -> Result<()> {
    if tk.vocab_size() > model.config().vocab {
        return Err(EngineError::InvalidModel {
            path: path.to_path_buf(),
            reason: format!("tokenizer has {} tokens, the model {}", tk.vocab_size(), model.config().vocab),
        });
    }
    Ok(())
}

/// Finds a decoder's files (see [`GenerativeModel::load`]).
pub fn resolve_generation_model(source: &str, models_dir: &Path) -> Result<PathBuf> {
    let candidates = [PathBuf::from(source), models_dir.join(Path::new(source).file_name().unwrap_or_default())];
    for c in &candidates {
        if c.is_file() {
            return Ok(c.clone());
        }
        if c.is_dir() {
            if c.join("config.json").is_file() {
                return Ok(c.clone());
            }
            let mut ggufs: Vec<PathBuf> = std::fs::read_dir(c)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
                .collect();
            ggufs.sort();
            if let Some(g) = ggufs.into_iter().next() {
                return Ok(g);
            }
            return Err(EngineError::InvalidModel {
                path: c.clone(),
                reason: "neither a .gguf file nor config.json + *.safetensors".into(),
            });
        }
    }
    if source == DEFAULT_GENERATION_MODEL_ID || source == DEFAULT_GENERATION_REPO {
        return resolve_model_file(
            DEFAULT_GENERATION_GGUF,
            models_dir,
            DEFAULT_GENERATION_MODEL_ID,
            DEFAULT_GENERATION_REPO,
        );
    }
    resolve_model_dir(source, models_dir, LLAMA_FILES)
}

/// Hands the heap a load freed back to the system. Reading and rewriting the weights leaves
/// ~100 MB of freed blocks (Gemma 3 270M: 439 MB resident after its load, 332 MB after
/// this) that glibc's allocator keeps mapped but never reuses for the fewer, larger blocks
/// the model holds.
fn release_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of the heap to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

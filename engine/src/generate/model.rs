//! Decoder on the CPU for the llama family and Gemma 3 (one forward pass, per-architecture
//! switches: embedding scale, per-head Q/K norms, norms after attention and MLP, GeGLU,
//! sliding-window layers with their own RoPE base): GGUF (quantized) or safetensors
//! (f32/f16/bf16) weights,
//! per-sequence KV caches, and one forward pass over a *batch of sequences* — each with its
//! own new tokens (a prefill chunk or one decode token), position and cache. Every linear
//! layer runs once over all the batch's tokens, so the weights are read once per step.
//!
//! Layout: activations are row-major `[tokens, width]` f32; Q, K and V come out of one fused
//! product, as do the MLP's gate and up projections. Attention reads the cache in place.

use super::qmatmul::{DenseMatrix, HalfMatrix, HalfWeights, Linear, PackedMatrix, QActs};
use super::repack;
use crate::error::{EngineError, Result};
use crate::kernels::{dot, exp, exp_shifted_inplace, gemm_f32, softmax_inplace, Parallel};
use crate::team::{team, Parts};
use candle_core::quantized::{gguf_file, QTensor};
use candle_core::Device;
use half::f16;
use half::slice::HalfFloatSliceExt;
use std::ops::Range;
use std::path::Path;

/// `general.architecture` values [`Llama::from_gguf`] loads.
pub const GGUF_ARCHITECTURES: &[&str] = &["llama", "granite", "qwen2", "qwen3", "phi3", "gemma2", "gemma3"];

/// `model_type` values of `config.json` that [`Llama::from_safetensors`] loads.
pub const SAFETENSORS_ARCHITECTURES: &[&str] =
    &["llama", "granite", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text"];

/// How rotary embeddings pair the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs `(2i, 2i+1)`: GGUF llama weights (llama.cpp permutes Q and K).
    Interleaved,
    /// Halves `(i, i + d/2)`: Hugging Face safetensors weights.
    Half,
}

/// Shape and constants of a llama-family model.
#[derive(Debug, Clone)]
pub struct LlamaConfig {
    pub n_layers: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub context_length: usize,
    pub rope_theta: f32,
    pub rms_eps: f32,
    pub rope_style: RopeStyle,
    /// What differs between the architectures this decoder runs.
    pub arch: ArchConfig,
}

/// The feed-forward activation of a gated MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu(gate) * up` (llama).
    Silu,
    /// `gelu_tanh(gate) * up` (Gemma).
    GeluTanh,
}

/// Per-architecture switches of the one decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct ArchConfig {
    /// `general.architecture` (`llama`, `granite`, `qwen2`, `qwen3`, `phi3`, `gemma2`,
    /// `gemma3`) or the safetensors `model_type` (also `mistral`, `gemma3_text`).
    pub name: String,
    /// Token embeddings are multiplied by this (Gemma: sqrt(width)).
    pub embed_scale: Option<f32>,
    pub activation: Activation,
    /// Layers with a local attention window (Gemma 3: five of every six), in tokens: a
    /// position sees itself and the `window - 1` before it.
    pub sliding_window: Option<usize>,
    /// `Some(n)`: every `n`-th layer (the last of each group) is global, the others slide
    /// (Gemma 3: 6); `None`: every layer slides (Mistral).
    pub sliding_pattern: Option<usize>,
    /// RoPE base of the sliding layers (the global ones use `rope_theta`).
    pub rope_theta_local: f32,
    /// Linear RoPE scaling of the global layers (positions divided by this).
    pub rope_scale_global: f32,
    /// Attention logits are `q·k * attn_scale`.
    pub attn_scale: f32,
    /// Gemma 2: attention logits become `cap * tanh(logit / cap)` before the softmax.
    pub attn_softcap: Option<f32>,
    /// Gemma 2: the output logits likewise.
    pub final_softcap: Option<f32>,
    /// Granite: each layer's attention and MLP outputs are scaled by this before the
    /// residual add.
    pub residual_scale: Option<f32>,
    /// Granite: the output logits are divided by this.
    pub logit_scale: Option<f32>,
}

impl ArchConfig {
    fn llama(head_dim: usize) -> Self {
        Self {
            name: "llama".into(),
            embed_scale: None,
            activation: Activation::Silu,
            sliding_window: None,
            sliding_pattern: None,
            rope_theta_local: 10_000.0,
            rope_scale_global: 1.0,
            attn_scale: 1.0 / (head_dim as f32).sqrt(),
            attn_softcap: None,
            final_softcap: None,
            residual_scale: None,
            logit_scale: None,
        }
    }

    /// Granite's multipliers — embedding, residual, attention, logits — where given; a
    /// multiplier of 0 (absent in some conversions) or not finite means none.
    fn with_granite(self, [embedding, residual, attention, logits]: [Option<f32>; 4]) -> Self {
        let some = |v: Option<f32>| v.filter(|v| *v != 0.0 && v.is_finite());
        Self {
            embed_scale: some(embedding),
            residual_scale: some(residual),
            attn_scale: some(attention).unwrap_or(self.attn_scale),
            logit_scale: some(logits),
            ..self
        }
    }

    /// Gemma 2 and 3 (the pre- and post-norms around attention and the MLP).
    pub fn is_gemma(&self) -> bool {
        matches!(self.name.as_str(), "gemma2" | "gemma3" | "gemma3_text")
    }

    /// Whether layer `i` uses the sliding window.
    fn slides(&self, i: usize) -> bool {
        self.sliding_window.is_some() && self.sliding_pattern.is_none_or(|n| n > 1 && i % n < n - 1)
    }
}

impl LlamaConfig {
    /// Width of K (or V) for one token: `n_kv_heads * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Bytes of KV cache per token (K and V, f16, every layer).
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.n_layers * self.kv_dim() * 2
    }

    /// The attention window of layer `i` (`None`: it sees every earlier position).
    pub fn layer_window(&self, i: usize) -> Option<usize> {
        if self.arch.slides(i) {
            self.arch.sliding_window
        } else {
            None
        }
    }

    /// RoPE base and position scale of layer `i`: sliding layers use the local base
    /// unscaled, the others `rope_theta` with the global scale.
    pub fn layer_rope(&self, i: usize) -> (f32, f32) {
        if self.arch.slides(i) {
            (self.arch.rope_theta_local, 1.0)
        } else {
            (self.rope_theta, self.arch.rope_scale_global)
        }
    }

    /// KV memory of a sequence of `len` tokens between forward passes, in tokens of every
    /// layer (`kv_bytes_per_token` each, rounded up): `len` for models without sliding
    /// layers; sliding layers count at most `window + 15` positions.
    pub fn kv_tokens(&self, len: usize) -> usize {
        let slots: usize = (0..self.n_layers)
            .map(|i| match self.layer_window(i) {
                Some(w) => len.min(w + KB - 1),
                None => len,
            })
            .sum();
        slots.div_ceil(self.n_layers.max(1))
    }

    /// The longest sequence whose [`kv_tokens`](Self::kv_tokens) fit `budget`, up to the
    /// context length.
    pub fn max_len_within(&self, budget: usize) -> usize {
        if self.kv_tokens(self.context_length) <= budget {
            return self.context_length;
        }
        // kv_tokens is non-decreasing in len: the largest len with kv_tokens(len) <= budget.
        let (mut lo, mut hi) = (0, self.context_length);
        while lo < hi {
            let mid = (lo + hi).div_ceil(2);
            if self.kv_tokens(mid) <= budget {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        lo
    }

    /// Refuses `tokens` at positions `start..` that run past the context or name no token of
    /// the vocabulary (the forward passes' own check; requests are validated before).
    pub(crate) fn check_input(&self, start: usize, tokens: &[u32]) -> Result<()> {
        if start + tokens.len() > self.context_length {
            return Err(EngineError::Internal(format!(
                "sequence of {} tokens exceeds the context of {}",
                start + tokens.len(),
                self.context_length
            )));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.vocab) {
            return Err(EngineError::InvalidTokenId { index: 0, token_id: bad, vocab_size: self.vocab });
        }
        Ok(())
    }

    fn check(&self, path: &Path) -> Result<()> {
        let bad = |reason: String| Err(EngineError::InvalidModel { path: path.to_path_buf(), reason });
        if self.n_heads == 0 || self.n_kv_heads == 0 || self.n_heads % self.n_kv_heads != 0 {
            return bad(format!("{} heads cannot share {} KV heads", self.n_heads, self.n_kv_heads));
        }
        if self.head_dim % 2 != 0 || self.head_dim == 0 {
            return bad(format!("head size {} is not a positive even number", self.head_dim));
        }
        if self.arch.name == "llama" && self.n_heads * self.head_dim != self.hidden {
            return bad(format!("{} heads of {} do not make width {}", self.n_heads, self.head_dim, self.hidden));
        }
        if self.arch.sliding_window == Some(0) || self.arch.rope_scale_global <= 0.0 {
            return bad("sliding window 0 or a non-positive RoPE scale".into());
        }
        Ok(())
    }
}

struct Layer {
    attn_norm: Vec<f32>,
    qkv: Linear,
    /// Added to Q, K and V (Qwen 2).
    qkv_bias: Option<Vec<f32>>,
    /// Per-head RMS norms of Q and K before RoPE (Gemma 3, Qwen 3).
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    o: Linear,
    /// RMS norm of the attention output before the residual add (Gemma).
    post_attn_norm: Option<Vec<f32>>,
    ffn_norm: Vec<f32>,
    gate_up: Linear,
    down: Linear,
    /// RMS norm of the MLP output before the residual add (Gemma).
    post_ffn_norm: Option<Vec<f32>>,
}

impl Layer {
    fn plain(attn_norm: Vec<f32>, qkv: Linear, o: Linear, ffn_norm: Vec<f32>, gate_up: Linear, down: Linear) -> Self {
        Self {
            attn_norm,
            qkv,
            qkv_bias: None,
            q_norm: None,
            k_norm: None,
            o,
            post_attn_norm: None,
            ffn_norm,
            gate_up,
            down,
            post_ffn_norm: None,
        }
    }
}

/// A loaded llama-family model (CPU).
pub struct Llama {
    cfg: LlamaConfig,
    embed: Linear,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    /// `None`: tied to the token embedding.
    lm_head: Option<Linear>,
    weight_bytes: usize,
}

/// Keys and values of one sequence, every layer, in f16 (as llama.cpp's default cache:
/// half the memory traffic of f32 for attention, computed in f32).
///
/// Keys are stored in blocks of 16 positions, `[block][kv_head][head_dim][16]`: for one KV
/// head a block is 2 KiB of contiguous memory in which each dimension holds 16 positions side
/// by side, so decoding scores 16 positions with one vector multiply-add per dimension and
/// streams the cache sequentially; growing appends blocks (no re-layout). Values are
/// `[tokens, kv_dim]`. Memory grows on demand.
///
/// A sliding-window layer keeps only the blocks a later query can still see: after each
/// forward pass the blocks wholly before `len + 1 - window` are dropped, so it holds at most
/// `window + 15` positions between passes (plus the chunk being prefilled), whatever the
/// sequence's length. Each layer's storage starts at its own `base` (a multiple of 16).
#[derive(Debug, Default, Clone)]
pub struct KvCache {
    k: Vec<Vec<f16>>,
    v: Vec<Vec<f16>>,
    /// First position each layer still stores.
    base: Vec<usize>,
    /// The window of each sliding layer.
    window: Vec<Option<usize>>,
    len: usize,
    kv_dim: usize,
}

/// Positions per key block.
const KB: usize = 16;

impl KvCache {
    pub fn new(cfg: &LlamaConfig) -> Self {
        Self {
            k: vec![Vec::new(); cfg.n_layers],
            v: vec![Vec::new(); cfg.n_layers],
            base: vec![0; cfg.n_layers],
            window: (0..cfg.n_layers).map(|i| cfg.layer_window(i)).collect(),
            len: 0,
            kv_dim: cfg.kv_dim(),
        }
    }

    /// Tokens whose keys and values are stored (or were, for dropped window blocks).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions held in memory, summed over the layers.
    pub fn held_positions(&self) -> usize {
        self.v.iter().map(|v| v.len() / self.kv_dim.max(1)).sum()
    }

    /// Makes room for positions up to `tokens` in every layer, growing in steps of `step`.
    pub fn reserve(&mut self, tokens: usize, step: usize) {
        let step = step.max(KB).div_ceil(KB) * KB;
        for ((k, v), &base) in self.k.iter_mut().zip(self.v.iter_mut()).zip(&self.base) {
            let need = tokens - base;
            if k.len() < need * self.kv_dim {
                k.resize(need.div_ceil(step) * step * self.kv_dim, f16::ZERO);
            }
            if v.capacity() < need * self.kv_dim {
                v.reserve_exact(need * self.kv_dim - v.len());
            }
        }
    }

    /// Stores the key and value of position `pos` (room reserved) in layer `layer`.
    fn put(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let rel = pos - self.base[layer];
        let kl = &mut self.k[layer];
        let at = rel / KB * self.kv_dim * KB + rel % KB;
        for (r, &x) in k.iter().enumerate() {
            kl[at + r * KB] = f16::from_f32(x);
        }
        let vl = &mut self.v[layer];
        vl.truncate(rel * v.len());
        vl.extend(v.iter().map(|&x| f16::from_f32(x)));
    }

    /// Drops the blocks of sliding layers that no query from position `len` on can see.
    fn trim(&mut self) {
        for l in 0..self.k.len() {
            let Some(w) = self.window[l] else { continue };
            let new_base = (self.len + 1).saturating_sub(w) / KB * KB;
            let base = self.base[l];
            if new_base > base {
                let drop = (new_base - base) * self.kv_dim;
                let (k, v) = (&mut self.k[l], &mut self.v[l]);
                k.drain(..drop.min(k.len()));
                v.drain(..drop.min(v.len()));
                self.base[l] = new_base;
            }
        }
    }

    /// Drops every stored token and frees the memory.
    pub fn clear(&mut self) {
        for buf in self.k.iter_mut().chain(self.v.iter_mut()) {
            *buf = Vec::new();
        }
        self.base.iter_mut().for_each(|b| *b = 0);
        self.len = 0;
    }
}

/// One sequence's part of a forward pass.
pub struct SeqBatch<'a> {
    /// New tokens, at positions `cache.len()..`.
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
    /// Whether to return logits for the last new token.
    pub want_logits: bool,
}

/// Buffers reused from step to step.
#[derive(Default)]
pub struct Scratch {
    x: Vec<f32>,
    h: Vec<f32>,
    qkv: Vec<f32>,
    attn: Vec<f32>,
    proj: Vec<f32>,
    gate_up: Vec<f32>,
    act: Vec<f32>,
    acts: QActs,
}

impl Llama {
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// Bytes of weights held in memory.
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// Loads a GGUF file with `general.architecture` `llama`, `qwen2`, `qwen3`, `phi3` or
    /// `gemma3`.
    pub fn from_gguf(path: &Path, content: &gguf_file::Content) -> Result<Self> {
        let invalid = |reason: String| EngineError::InvalidModel { path: path.to_path_buf(), reason };
        let cfg = gguf_config(path, content)?;
        let gemma = cfg.arch.is_gemma();
        let has = |name: &str| content.tensor_infos.contains_key(name);
        let mut file = std::fs::File::open(path)?;
        let mut tensor = |name: &str| -> Result<QTensor> {
            content.tensor(&mut file, name, &Device::Cpu).map_err(|e| invalid(format!("tensor {name}: {e}")))
        };
        let embed_q = tensor("token_embd.weight")?;
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let p = format!("blk.{i}");
            let n = |t: &str| format!("{p}.{t}");
            let (qkv_names, gate_up_names) = stacked_names(i, true, has);
            let qkv = qkv_names.iter().map(|t| tensor(t)).collect::<Result<Vec<_>>>()?;
            let gate_up = gate_up_names.iter().map(|t| tensor(t)).collect::<Result<Vec<_>>>()?;
            let mut layer = Layer::plain(
                vector(&tensor(&n("attn_norm.weight"))?)?,
                linear_from_q(qkv)?,
                linear_from_q(vec![tensor(&n("attn_output.weight"))?])?,
                vector(&tensor(&n("ffn_norm.weight"))?)?,
                linear_from_q(gate_up)?,
                linear_from_q(vec![tensor(&n("ffn_down.weight"))?])?,
            );
            if has(&n("attn_q.bias")) {
                let mut bias = vector(&tensor(&n("attn_q.bias"))?)?;
                bias.extend(vector(&tensor(&n("attn_k.bias"))?)?);
                bias.extend(vector(&tensor(&n("attn_v.bias"))?)?);
                layer.qkv_bias = Some(bias);
            }
            if has(&n("attn_q_norm.weight")) {
                // Gemma's `1 +` is already in these weights (the converter adds it).
                layer.q_norm = Some(vector(&tensor(&n("attn_q_norm.weight"))?)?);
                layer.k_norm = Some(vector(&tensor(&n("attn_k_norm.weight"))?)?);
            }
            if gemma {
                layer.post_attn_norm = Some(vector(&tensor(&n("post_attention_norm.weight"))?)?);
                layer.post_ffn_norm = Some(vector(&tensor(&n("post_ffw_norm.weight"))?)?);
            }
            layers.push(layer);
        }
        let norm = vector(&tensor("output_norm.weight")?)?;
        let lm_head = match has("output.weight") {
            true => Some(linear_from_q(vec![tensor("output.weight")?])?),
            false => None,
        };
        let embed = linear_from_q(vec![embed_q])?;
        Self::assemble(cfg, embed, layers, norm, lm_head, path)
    }

    /// Loads a Hugging Face folder (`config.json` and `*.safetensors`) of a `model_type` in
    /// [`SAFETENSORS_ARCHITECTURES`].
    pub fn from_safetensors(dir: &Path) -> Result<Self> {
        let invalid = |reason: String| EngineError::InvalidModel { path: dir.to_path_buf(), reason };
        let (cfg, c) = safetensors_config(dir)?;
        let st = mmap_safetensors(dir)?;
        let has = |name: &str| st.get(name).is_ok();
        let load = |name: &str| -> Result<(Vec<usize>, Vec<f32>)> {
            let t = st.load(name, &Device::Cpu).map_err(|e| invalid(format!("{name}: {e}")))?;
            let dims = t.dims().to_vec();
            let v = t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            Ok((dims, v))
        };
        // Matrices keep f16/bf16 as they are (half the memory); f32 stays f32.
        let dense = |names: &[String]| -> Result<Linear> {
            let mut tensors = Vec::with_capacity(names.len());
            let (mut n, mut k) = (0, 0);
            for name in names {
                let t = st.load(name, &Device::Cpu).map_err(|e| invalid(format!("{name}: {e}")))?;
                let dims = t.dims().to_vec();
                if dims.len() != 2 || (k != 0 && dims[1] != k) {
                    return Err(invalid(format!("{name}: unexpected shape {dims:?}")));
                }
                n += dims[0];
                k = dims[1];
                tensors.push(t);
            }
            let t = candle_core::Tensor::cat(&tensors, 0)?;
            half_or_f32(t, n, k)
        };
        let vec1 = |name: &str| -> Result<Vec<f32>> { Ok(load(name)?.1) };
        let names = hf_norms(&cfg.arch);
        let norm = |name: &str| -> Result<Vec<f32>> {
            let mut w = vec1(name)?;
            if names.plus_one {
                w.iter_mut().for_each(|x| *x += 1.0);
            }
            Ok(w)
        };
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let p = format!("model.layers.{i}");
            let n = |t: &str| format!("{p}.{t}");
            // phi3 fuses Q, K and V into `qkv_proj`, and gate and up into `gate_up_proj`.
            let (qkv_names, gate_up_names) = stacked_names(i, false, has);
            let (qkv, gate_up) = (dense(&qkv_names)?, dense(&gate_up_names)?);
            let mut layer = Layer::plain(
                norm(&n(names.attn))?,
                qkv,
                dense(&[n("self_attn.o_proj.weight")])?,
                norm(&n(names.ffn))?,
                gate_up,
                dense(&[n("mlp.down_proj.weight")])?,
            );
            if let (Some(a), Some(f)) = (names.post_attn, names.post_ffn) {
                layer.post_attn_norm = Some(norm(&n(a))?);
                layer.post_ffn_norm = Some(norm(&n(f))?);
            }
            if has(&n("self_attn.q_proj.bias")) {
                let mut bias = vec1(&n("self_attn.q_proj.bias"))?;
                bias.extend(vec1(&n("self_attn.k_proj.bias"))?);
                bias.extend(vec1(&n("self_attn.v_proj.bias"))?);
                layer.qkv_bias = Some(bias);
            }
            if has(&n("self_attn.q_norm.weight")) {
                layer.q_norm = Some(norm(&n("self_attn.q_norm.weight"))?);
                layer.k_norm = Some(norm(&n("self_attn.k_norm.weight"))?);
            }
            layers.push(layer);
        }
        let embed = dense(&["model.embed_tokens.weight".to_string()])?;
        let tied = c.tie_word_embeddings.unwrap_or(false) || st.get("lm_head.weight").is_err();
        let lm_head = if tied { None } else { Some(dense(&["lm_head.weight".to_string()])?) };
        let norm = norm("model.norm.weight")?;
        Self::assemble(cfg, embed, layers, norm, lm_head, dir)
    }

    fn assemble(
        cfg: LlamaConfig,
        embed: Linear,
        layers: Vec<Layer>,
        norm: Vec<f32>,
        lm_head: Option<Linear>,
        path: &Path,
    ) -> Result<Self> {
        let bad = |reason: String| Err(EngineError::InvalidModel { path: path.to_path_buf(), reason });
        let q_dim = cfg.n_heads * cfg.head_dim;
        let qkv_n = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim;
        if embed.n() != cfg.vocab || embed.k() != cfg.hidden {
            return bad(format!("token embedding is [{}, {}]", embed.n(), embed.k()));
        }
        let norm_ok = |n: &Option<Vec<f32>>, len: usize| n.as_ref().is_none_or(|n| n.len() == len);
        for (i, l) in layers.iter().enumerate() {
            if l.qkv.n() != qkv_n
                || l.qkv.k() != cfg.hidden
                || l.o.n() != cfg.hidden
                || l.o.k() != q_dim
                || l.gate_up.n() != 2 * cfg.ffn
                || l.down.k() != cfg.ffn
                || l.attn_norm.len() != cfg.hidden
                || l.ffn_norm.len() != cfg.hidden
                || !norm_ok(&l.qkv_bias, qkv_n)
                || !norm_ok(&l.q_norm, cfg.head_dim)
                || !norm_ok(&l.k_norm, cfg.head_dim)
                || !norm_ok(&l.post_attn_norm, cfg.hidden)
                || !norm_ok(&l.post_ffn_norm, cfg.hidden)
            {
                return bad(format!("layer {i} has shapes that do not match the configuration"));
            }
        }
        let weight_bytes = embed.size_in_bytes()
            + lm_head.as_ref().map_or(0, |l| l.size_in_bytes())
            + layers
                .iter()
                .map(|l| {
                    l.qkv.size_in_bytes() + l.o.size_in_bytes() + l.gate_up.size_in_bytes() + l.down.size_in_bytes()
                })
                .sum::<usize>();
        tracing::info!(
            architecture = %cfg.arch.name,
            layers = cfg.n_layers,
            width = cfg.hidden,
            heads = cfg.n_heads,
            kv_heads = cfg.n_kv_heads,
            context = cfg.context_length,
            sliding_window = ?cfg.arch.sliding_window,
            weights = %layers.first().map(|l| l.qkv.describe()).unwrap_or_default(),
            weight_mib = weight_bytes / (1 << 20),
            "decoder loaded"
        );
        Ok(Self { cfg, embed, layers, norm, lm_head, weight_bytes })
    }

    /// Runs the new tokens of every sequence through the model, appends their keys and values
    /// to each cache, and returns `[n, vocab]` logits for the sequences with `want_logits`
    /// (in batch order).
    pub fn forward(&self, batch: &mut [SeqBatch<'_>], s: &mut Scratch) -> Result<Vec<f32>> {
        let cfg = &self.cfg;
        let (hd, kv_dim) = (cfg.head_dim, cfg.kv_dim());
        let q_dim = cfg.n_heads * hd;
        let qkv_w = q_dim + 2 * kv_dim;
        let total: usize = batch.iter().map(|b| b.tokens.len()).sum();
        if total == 0 {
            return Ok(Vec::new());
        }
        // Positions and validation.
        let mut starts = Vec::with_capacity(batch.len());
        let mut offset = 0;
        for b in batch.iter() {
            let start = b.cache.len;
            cfg.check_input(start, b.tokens)?;
            starts.push((offset, start, b.tokens.len()));
            offset += b.tokens.len();
        }
        let positions: Vec<usize> = starts.iter().flat_map(|&(_, start, n)| start..start + n).collect();
        // Embeddings.
        s.x.resize(total * cfg.hidden, 0.0);
        let tokens: Vec<u32> = batch.iter().flat_map(|b| b.tokens.iter().copied()).collect();
        let embed_scale = cfg.arch.embed_scale;
        team().for_chunks(&mut s.x, cfg.hidden, 8, |i, row| {
            self.embed.row(tokens[i] as usize, row);
            if let Some(scale) = embed_scale {
                row.iter_mut().for_each(|x| *x *= scale);
            }
        });
        for b in batch.iter_mut() {
            let need = b.cache.len + b.tokens.len();
            b.cache.reserve(need, 256);
        }
        // cos/sin of this batch's positions for each RoPE base the layers use.
        let mut ropes: Vec<((f32, f32), Rope)> = Vec::new();
        for li in 0..cfg.n_layers {
            let key = cfg.layer_rope(li);
            if !ropes.iter().any(|(k, _)| *k == key) {
                ropes.push((key, Rope::new(key, cfg.head_dim, &positions)));
            }
        }
        for (li, layer) in self.layers.iter().enumerate() {
            rms_norm(&s.x, &layer.attn_norm, cfg.rms_eps, &mut s.h);
            layer.qkv.forward(&s.h, total, &mut s.acts, &mut s.qkv);
            if let Some(bias) = &layer.qkv_bias {
                s.qkv.chunks_exact_mut(qkv_w).for_each(|row| add_inplace(row, bias));
            }
            if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
                head_norms(&mut s.qkv, qkv_w, cfg, qn, kn);
            }
            let key = cfg.layer_rope(li);
            let rope = &ropes.iter().find(|(k, _)| *k == key).expect("computed above").1;
            self.rope(&mut s.qkv, qkv_w, rope);
            for (b, &(off, start, n)) in batch.iter_mut().zip(&starts) {
                for i in 0..n {
                    let row = &s.qkv[(off + i) * qkv_w..(off + i + 1) * qkv_w];
                    b.cache.put(li, start + i, &row[q_dim..q_dim + kv_dim], &row[q_dim + kv_dim..]);
                }
            }
            s.attn.resize(total * q_dim, 0.0);
            let caches: Vec<(&[f16], &[f16], usize)> =
                batch.iter().map(|b| (b.cache.k[li].as_slice(), b.cache.v[li].as_slice(), b.cache.base[li])).collect();
            attention(cfg, &s.qkv, &caches, &starts, cfg.layer_window(li), &mut s.attn);
            layer.o.forward(&s.attn, total, &mut s.acts, &mut s.proj);
            if let Some(w) = &layer.post_attn_norm {
                rms_norm_inplace(&mut s.proj, w, cfg.rms_eps);
            }
            if let Some(r) = cfg.arch.residual_scale {
                s.proj.iter_mut().for_each(|v| *v *= r);
            }
            add_inplace(&mut s.x, &s.proj);
            rms_norm(&s.x, &layer.ffn_norm, cfg.rms_eps, &mut s.h);
            layer.gate_up.forward(&s.h, total, &mut s.acts, &mut s.gate_up);
            gated(&s.gate_up, cfg.ffn, cfg.arch.activation, &mut s.act);
            layer.down.forward(&s.act, total, &mut s.acts, &mut s.proj);
            if let Some(w) = &layer.post_ffn_norm {
                rms_norm_inplace(&mut s.proj, w, cfg.rms_eps);
            }
            if let Some(r) = cfg.arch.residual_scale {
                s.proj.iter_mut().for_each(|v| *v *= r);
            }
            add_inplace(&mut s.x, &s.proj);
        }
        for b in batch.iter_mut() {
            b.cache.len += b.tokens.len();
            b.cache.trim();
        }
        // Logits for the last token of each sequence that asked.
        let rows: Vec<usize> =
            batch.iter().zip(&starts).filter(|(b, _)| b.want_logits).map(|(_, &(off, _, n))| off + n - 1).collect();
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let mut last = Vec::with_capacity(rows.len() * cfg.hidden);
        for &r in &rows {
            last.extend_from_slice(&s.x[r * cfg.hidden..(r + 1) * cfg.hidden]);
        }
        rms_norm(&last, &self.norm, cfg.rms_eps, &mut s.h);
        let mut logits = Vec::new();
        self.lm_head.as_ref().unwrap_or(&self.embed).forward(&s.h, rows.len(), &mut s.acts, &mut logits);
        if let Some(cap) = cfg.arch.final_softcap {
            softcap(&mut logits, cap);
        }
        if let Some(l) = cfg.arch.logit_scale {
            logits.iter_mut().for_each(|v| *v /= l);
        }
        Ok(logits)
    }

    /// Rotates Q and K of every row by its position.
    fn rope(&self, qkv: &mut [f32], qkv_w: usize, rope: &Rope) {
        let cfg = &self.cfg;
        let (hd, half) = (cfg.head_dim, cfg.head_dim / 2);
        let heads = cfg.n_heads + cfg.n_kv_heads;
        let style = cfg.rope_style;
        team().for_chunks(qkv, qkv_w, 16, |r, row| {
            let cos = &rope.cos[r * half..(r + 1) * half];
            let sin = &rope.sin[r * half..(r + 1) * half];
            for h in 0..heads {
                let x = &mut row[h * hd..(h + 1) * hd];
                match style {
                    RopeStyle::Interleaved => {
                        for i in 0..half {
                            let (a, b) = (x[2 * i], x[2 * i + 1]);
                            x[2 * i] = a * cos[i] - b * sin[i];
                            x[2 * i + 1] = a * sin[i] + b * cos[i];
                        }
                    }
                    RopeStyle::Half => {
                        for i in 0..half {
                            let (a, b) = (x[i], x[i + half]);
                            x[i] = a * cos[i] - b * sin[i];
                            x[i + half] = a * sin[i] + b * cos[i];
                        }
                    }
                }
            }
        });
    }
}

/// cos and sin of the rotary angles of a batch's positions, `[rows, head_dim / 2]`.
pub(crate) struct Rope {
    pub(crate) cos: Vec<f32>,
    pub(crate) sin: Vec<f32>,
}

impl Rope {
    /// For RoPE base `theta` with positions divided by `scale`.
    pub(crate) fn new((theta, scale): (f32, f32), head_dim: usize, positions: &[usize]) -> Self {
        let half = head_dim / 2;
        let freqs: Vec<f64> = (0..half).map(|i| (theta as f64).powf(-2.0 * i as f64 / head_dim as f64)).collect();
        let mut cos = vec![0f32; positions.len() * half];
        let mut sin = vec![0f32; positions.len() * half];
        for (r, &pos) in positions.iter().enumerate() {
            let p = pos as f64 / scale as f64;
            for (i, f) in freqs.iter().enumerate() {
                let angle = p * f;
                cos[r * half + i] = angle.cos() as f32;
                sin[r * half + i] = angle.sin() as f32;
            }
        }
        Self { cos, sin }
    }
}

#[derive(serde::Deserialize)]
pub(crate) struct HfLlamaConfig {
    #[serde(default)]
    model_type: Option<String>,
    #[serde(default)]
    sliding_window: Option<usize>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    max_position_embeddings: usize,
    rope_theta: Option<f32>,
    rms_norm_eps: Option<f32>,
    pub(crate) tie_word_embeddings: Option<bool>,
    /// Gemma 3: attention logits scale by this to the -1/2 (default: the head size).
    #[serde(default)]
    query_pre_attn_scalar: Option<f32>,
    /// Gemma 3: RoPE base of the sliding layers.
    #[serde(default)]
    rope_local_base_freq: Option<f32>,
    /// Gemma 3: every n-th layer is global (older configs) ...
    #[serde(default)]
    sliding_window_pattern: Option<usize>,
    /// ... or each layer's kind (newer ones).
    #[serde(default)]
    layer_types: Option<Vec<String>>,
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    attn_logit_softcapping: Option<f64>,
    #[serde(default)]
    final_logit_softcapping: Option<f64>,
    /// Granite's multipliers.
    #[serde(default)]
    embedding_multiplier: Option<f32>,
    #[serde(default)]
    residual_multiplier: Option<f32>,
    #[serde(default)]
    attention_multiplier: Option<f32>,
    #[serde(default)]
    logits_scaling: Option<f32>,
}

/// The shape and constants of a GGUF decoder (`general.architecture` in
/// [`GGUF_ARCHITECTURES`]), from its metadata; checked for consistency.
pub(crate) fn gguf_config(path: &Path, content: &gguf_file::Content) -> Result<LlamaConfig> {
    let invalid = |reason: String| EngineError::InvalidModel { path: path.to_path_buf(), reason };
    let arch = md_str(content, "general.architecture").unwrap_or_default();
    if !GGUF_ARCHITECTURES.contains(&arch.as_str()) {
        return Err(invalid(format!("architecture `{arch}` is not supported ({})", GGUF_ARCHITECTURES.join(", "))));
    }
    let value = |key: &str| content.metadata.get(&format!("{arch}.{key}"));
    let get = |key: &str| -> Result<usize> {
        value(key)
            .ok_or_else(|| invalid(format!("missing metadata {arch}.{key}")))?
            .to_u32()
            .map(|v| v as usize)
            .map_err(|e| invalid(format!("{arch}.{key}: {e}")))
    };
    let getf = |key: &str, default: f32| -> f32 { value(key).and_then(|v| v.to_f32().ok()).unwrap_or(default) };
    let hidden = get("embedding_length")?;
    let n_heads = get("attention.head_count")?;
    let vocab = content
        .tensor_infos
        .get("token_embd.weight")
        .map(|t| t.shape.dims()[0])
        .ok_or_else(|| invalid("missing tensor token_embd.weight".into()))?;
    let head_dim =
        get("attention.key_length").or_else(|_| get("rope.dimension_count")).unwrap_or(hidden / n_heads.max(1));
    let mut arch_cfg = ArchConfig { name: arch.clone(), ..ArchConfig::llama(head_dim) };
    let n_layers = get("block_count")?;
    if arch == "gemma2" {
        let theta = getf("rope.freq_base", 10_000.0);
        let cap = |key: &str| value(key).and_then(|v| v.to_f32().ok()).filter(|c| *c > 0.0);
        arch_cfg = ArchConfig {
            embed_scale: Some((hidden as f32).sqrt()),
            activation: Activation::GeluTanh,
            sliding_window: get("attention.sliding_window").ok(),
            // Even layers slide, odd ones are global; one RoPE base for both.
            sliding_pattern: Some(2),
            rope_theta_local: theta,
            // As llama.cpp: Gemma 2 27B (46 layers) scales by width / heads, the others by
            // the head size (GGUF does not carry query_pre_attn_scalar).
            attn_scale: if n_layers == 46 {
                1.0 / ((hidden / n_heads.max(1)) as f32).sqrt()
            } else {
                1.0 / (head_dim as f32).sqrt()
            },
            attn_softcap: cap("attn_logit_softcapping"),
            final_softcap: cap("final_logit_softcapping"),
            ..arch_cfg
        };
    }
    if arch == "gemma3" {
        let linear = value("rope.scaling.type").and_then(|v| v.to_string().ok()).is_some_and(|t| t == "linear");
        arch_cfg = ArchConfig {
            embed_scale: Some((hidden as f32).sqrt()),
            activation: Activation::GeluTanh,
            sliding_window: get("attention.sliding_window").ok(),
            // llama.cpp's Gemma 3 pattern: five local layers, then a global one.
            sliding_pattern: Some(6),
            rope_theta_local: 10_000.0,
            rope_scale_global: if linear { getf("rope.scaling.factor", 1.0) } else { 1.0 },
            ..arch_cfg
        };
    }
    if arch == "granite" {
        // llama.cpp's keys.
        let f = |key: &str| value(key).and_then(|v| v.to_f32().ok());
        arch_cfg =
            arch_cfg.with_granite([f("embedding_scale"), f("residual_scale"), f("attention.scale"), f("logit_scale")]);
    }
    // llama.cpp ignores the sliding window of llama-architecture (Mistral) and phi3 files, and
    // so does ragway: outputs stay equal to llama.cpp's.
    let cfg = LlamaConfig {
        n_layers,
        hidden,
        ffn: get("feed_forward_length")?,
        n_heads,
        n_kv_heads: get("attention.head_count_kv").unwrap_or(n_heads),
        head_dim,
        vocab,
        context_length: get("context_length")?,
        rope_theta: getf("rope.freq_base", 10_000.0),
        rms_eps: getf("attention.layer_norm_rms_epsilon", 1e-5),
        // llama.cpp permutes llama's (and Granite's) Q and K for adjacent pairs; the others
        // keep halves.
        rope_style: if arch == "llama" || arch == "granite" { RopeStyle::Interleaved } else { RopeStyle::Half },
        arch: arch_cfg,
    };
    cfg.check(path)?;
    Ok(cfg)
}

/// The shape and constants of a Hugging Face decoder folder (`config.json`, a `model_type` in
/// [`SAFETENSORS_ARCHITECTURES`]); checked for consistency.
pub(crate) fn safetensors_config(dir: &Path) -> Result<(LlamaConfig, HfLlamaConfig)> {
    let invalid = |reason: String| EngineError::InvalidModel { path: dir.to_path_buf(), reason };
    let raw = std::fs::read_to_string(dir.join("config.json"))?;
    let c: HfLlamaConfig = serde_json::from_str(&raw).map_err(|e| invalid(format!("config.json: {e}")))?;
    let model_type = c.model_type.clone().unwrap_or_else(|| "llama".into());
    if !SAFETENSORS_ARCHITECTURES.contains(&model_type.as_str()) {
        return Err(invalid(format!(
            "model_type `{model_type}` is not supported ({})",
            SAFETENSORS_ARCHITECTURES.join(", ")
        )));
    }
    let head_dim = c.head_dim.unwrap_or(c.hidden_size / c.num_attention_heads.max(1));
    let mut arch = ArchConfig { name: model_type.clone(), ..ArchConfig::llama(head_dim) };
    if model_type == "mistral" {
        // Every layer sees the last `sliding_window` positions (Mistral 7B v0.1: 4096).
        arch.sliding_window = c.sliding_window;
    }
    if model_type == "granite" {
        arch = arch.with_granite([
            c.embedding_multiplier,
            c.residual_multiplier,
            c.attention_multiplier,
            c.logits_scaling,
        ]);
    }
    if model_type == "gemma2" || model_type == "gemma3_text" {
        let gemma2 = model_type == "gemma2";
        let pattern = match &c.layer_types {
            Some(types) => gemma_pattern(types)
                .ok_or_else(|| invalid("layer_types: full-attention layers are not every n-th layer".into()))?,
            None if gemma2 => 2,
            None => c.sliding_window_pattern.unwrap_or(6),
        };
        let scale = match &c.rope_scaling {
            Some(r) if r.get("rope_type").or_else(|| r.get("type")).and_then(|t| t.as_str()) == Some("linear") => {
                r.get("factor").and_then(|f| f.as_f64()).unwrap_or(1.0) as f32
            }
            _ => 1.0,
        };
        arch = ArchConfig {
            embed_scale: Some((c.hidden_size as f32).sqrt()),
            activation: Activation::GeluTanh,
            sliding_window: c.sliding_window,
            sliding_pattern: Some(pattern),
            // Gemma 2 uses one RoPE base for every layer.
            rope_theta_local: if gemma2 {
                c.rope_theta.unwrap_or(10_000.0)
            } else {
                c.rope_local_base_freq.unwrap_or(10_000.0)
            },
            rope_scale_global: scale,
            attn_scale: 1.0 / c.query_pre_attn_scalar.unwrap_or(head_dim as f32).sqrt(),
            attn_softcap: c.attn_logit_softcapping.map(|v| v as f32).filter(|v| *v > 0.0),
            final_softcap: c.final_logit_softcapping.map(|v| v as f32).filter(|v| *v > 0.0),
            ..arch
        };
    }
    let cfg = LlamaConfig {
        n_layers: c.num_hidden_layers,
        hidden: c.hidden_size,
        ffn: c.intermediate_size,
        n_heads: c.num_attention_heads,
        n_kv_heads: c.num_key_value_heads.unwrap_or(c.num_attention_heads),
        head_dim,
        vocab: c.vocab_size,
        context_length: c.max_position_embeddings,
        rope_theta: c.rope_theta.unwrap_or(10_000.0),
        rms_eps: c.rms_norm_eps.unwrap_or(1e-5),
        rope_style: RopeStyle::Half,
        arch,
    };
    cfg.check(dir)?;
    Ok((cfg, c))
}

/// Every `*.safetensors` file of a folder, memory-mapped.
pub(crate) fn mmap_safetensors(dir: &Path) -> Result<candle_core::safetensors::MmapedSafetensors> {
    let invalid = |reason: String| EngineError::InvalidModel { path: dir.to_path_buf(), reason };
    let mut files: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(invalid("no *.safetensors file".into()));
    }
    // SAFETY: the files are memory-mapped read-only for the duration of the load; ragway does
    // not modify model files while it runs.
    unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }
        .map_err(|e| invalid(format!("safetensors: {e}")))
}

/// The tensor names of layer `i`'s stacked matrices, Q/K/V and gate/up, each either fused
/// in one tensor (phi3) or apart, for a GGUF file (`gguf`) or a Hugging Face folder; `has`
/// says whether a tensor exists.
pub(crate) fn stacked_names(i: usize, gguf: bool, has: impl Fn(&str) -> bool) -> (Vec<String>, Vec<String>) {
    let name = |t: &str| if gguf { format!("blk.{i}.{t}.weight") } else { format!("model.layers.{i}.{t}.weight") };
    let one = |fused: &str, apart: &[&str]| -> Vec<String> {
        if has(&name(fused)) {
            vec![name(fused)]
        } else {
            apart.iter().map(|t| name(t)).collect()
        }
    };
    if gguf {
        // phi3 stores gate and up as one `ffn_up` of twice the width.
        let gate_up =
            if has(&name("ffn_gate")) { vec![name("ffn_gate"), name("ffn_up")] } else { vec![name("ffn_up")] };
        (one("attn_qkv", &["attn_q", "attn_k", "attn_v"]), gate_up)
    } else {
        (
            one("self_attn.qkv_proj", &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
            one("mlp.gate_up_proj", &["mlp.gate_proj", "mlp.up_proj"]),
        )
    }
}

/// Where a Hugging Face decoder layer keeps its norms, and whether their weights are stored as
/// offsets from 1 (Gemma computes `x * (1 + w)`; its GGUF converter adds the 1).
pub(crate) struct HfNorms {
    pub(crate) attn: &'static str,
    pub(crate) ffn: &'static str,
    pub(crate) post_attn: Option<&'static str>,
    pub(crate) post_ffn: Option<&'static str>,
    pub(crate) plus_one: bool,
}

pub(crate) fn hf_norms(arch: &ArchConfig) -> HfNorms {
    if arch.is_gemma() {
        HfNorms {
            attn: "input_layernorm.weight",
            ffn: "pre_feedforward_layernorm.weight",
            post_attn: Some("post_attention_layernorm.weight"),
            post_ffn: Some("post_feedforward_layernorm.weight"),
            plus_one: true,
        }
    } else {
        HfNorms {
            attn: "input_layernorm.weight",
            ffn: "post_attention_layernorm.weight",
            post_attn: None,
            post_ffn: None,
            plus_one: false,
        }
    }
}

/// The `n` of "every n-th layer is global" that `layer_types` follows, if it follows one.
fn gemma_pattern(types: &[String]) -> Option<usize> {
    (1..=types.len().max(1))
        .find(|&n| types.iter().enumerate().all(|(i, t)| (t == "full_attention") == ((i + 1) % n == 0)))
}

pub(crate) fn md_str(content: &gguf_file::Content, key: &str) -> Option<String> {
    content.metadata.get(key).and_then(|v| v.to_string().ok()).cloned()
}

fn vector(t: &QTensor) -> Result<Vec<f32>> {
    Ok(t.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?)
}

/// One linear layer from GGUF tensors stacked along the output dimension: packed when every
/// part is (or rewrites into, see [`super::repack`]) the same packed kind and the shape tiles,
/// f32 otherwise.
fn linear_from_q(parts: Vec<QTensor>) -> Result<Linear> {
    let k = parts[0].shape().dims()[1];
    let n: usize = parts.iter().map(|p| p.shape().dims()[0]).sum();
    let dtypes: Vec<_> = parts.iter().map(|p| p.dtype()).collect();
    if let Some(kind) = repack::common_target(&dtypes) {
        if parts.iter().all(|p| p.shape().dims()[1] == k) {
            let mut raw = Vec::new();
            for p in &parts {
                let values = || p.dequantize(&Device::Cpu).ok()?.flatten_all().ok()?.to_vec1::<f32>().ok();
                match repack::rewrite_as(p.dtype(), kind, &p.data()?, values) {
                    Some(bytes) => raw.extend_from_slice(&bytes),
                    None => {
                        raw.clear();
                        break;
                    }
                }
            }
            if !raw.is_empty() {
                if let Ok(packed) = PackedMatrix::from_ggml(kind, n, k, &raw) {
                    return Ok(Linear::Packed(packed));
                }
            }
        }
    }
    // F16/BF16 parts stay half precision when they all share the type.
    use candle_core::quantized::GgmlDType;
    let half = [GgmlDType::F16, GgmlDType::BF16].into_iter().find(|&d| parts.iter().all(|p| p.dtype() == d));
    if let Some(dtype) = half {
        let target = if dtype == GgmlDType::F16 { candle_core::DType::F16 } else { candle_core::DType::BF16 };
        let tensors = parts
            .iter()
            .map(|p| p.dequantize(&Device::Cpu).and_then(|t| t.to_dtype(target)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        return half_or_f32(candle_core::Tensor::cat(&tensors, 0)?, n, k);
    }
    let mut w = Vec::with_capacity(n * k);
    for p in &parts {
        w.extend(p.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(Linear::Dense(DenseMatrix::new(n, k, w)))
}

/// A `[n, k]` tensor as a linear layer: f16 and bf16 stay half precision, anything else f32.
fn half_or_f32(t: candle_core::Tensor, n: usize, k: usize) -> Result<Linear> {
    use candle_core::DType;
    Ok(match t.dtype() {
        DType::F16 => Linear::Half(HalfMatrix::new(n, k, HalfWeights::F16(t.flatten_all()?.to_vec1()?))),
        DType::BF16 => Linear::Half(HalfMatrix::new(n, k, HalfWeights::Bf16(t.flatten_all()?.to_vec1()?))),
        _ => Linear::Dense(DenseMatrix::new(n, k, t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)),
    })
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut Vec<f32>) {
    let d = w.len();
    out.resize(x.len(), 0.0);
    team().for_chunks(out, d, 16, |i, o| {
        let x = &x[i * d..(i + 1) * d];
        let ss = dot(x, x) / d as f32;
        let inv = 1.0 / (ss + eps).sqrt();
        for ((o, x), w) in o.iter_mut().zip(x).zip(w) {
            *o = x * inv * w;
        }
    });
}

fn add_inplace(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// `act[t, i] = f(gate[t, i]) * up[t, i]` with `gate_up[t] = [gate | up]`, `f` SiLU or
/// GELU (tanh approximation).
fn gated(gate_up: &[f32], ffn: usize, f: Activation, act: &mut Vec<f32>) {
    let rows = gate_up.len() / (2 * ffn);
    act.resize(rows * ffn, 0.0);
    team().for_chunks(act, ffn, 16, |i, a| {
        let (g, u) = gate_up[i * 2 * ffn..(i + 1) * 2 * ffn].split_at(ffn);
        match f {
            Activation::Silu => {
                for ((a, &g), &u) in a.iter_mut().zip(g).zip(u) {
                    *a = g / (1.0 + exp(-g)) * u;
                }
            }
            Activation::GeluTanh => {
                const SQRT_2_OVER_PI: f32 = 0.797_884_6;
                for ((a, &g), &u) in a.iter_mut().zip(g).zip(u) {
                    *a = 0.5 * g * (1.0 + (SQRT_2_OVER_PI * (g + 0.044_715 * g * g * g)).tanh()) * u;
                }
            }
        }
    });
}

/// RMS norm of each `w.len()`-wide row in place.
fn rms_norm_inplace(x: &mut [f32], w: &[f32], eps: f32) {
    team().for_chunks(x, w.len(), 16, |_, x| rms_norm_inplace_serial(x, w, eps));
}

/// Per-head RMS norms of the Q heads (`qn`) and K heads (`kn`) of each `[q | k | v]` row.
fn head_norms(qkv: &mut [f32], qkv_w: usize, cfg: &LlamaConfig, qn: &[f32], kn: &[f32]) {
    let hd = cfg.head_dim;
    let q_dim = cfg.n_heads * hd;
    let k_end = q_dim + cfg.kv_dim();
    team().for_chunks(qkv, qkv_w, 16, |_, row| {
        rms_norm_inplace_serial(&mut row[..q_dim], qn, cfg.rms_eps);
        rms_norm_inplace_serial(&mut row[q_dim..k_end], kn, cfg.rms_eps);
    });
}

fn rms_norm_inplace_serial(x: &mut [f32], w: &[f32], eps: f32) {
    let d = w.len();
    for x in x.chunks_exact_mut(d) {
        let inv = 1.0 / (dot(x, x) / d as f32 + eps).sqrt();
        for (x, w) in x.iter_mut().zip(w) {
            *x *= inv * w;
        }
    }
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: each attention task writes its own (token rows × head columns) block of the output.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// Causal attention of each sequence's new queries over its cache (which already holds the
/// new keys and values): all of it, or the last `window` positions of each query's.
/// `starts[i] = (row offset in the batch, first position, new tokens)`; `caches[i]` = keys,
/// values and the first position they hold.
fn attention(
    cfg: &LlamaConfig,
    qkv: &[f32],
    caches: &[(&[f16], &[f16], usize)],
    starts: &[(usize, usize, usize)],
    window: Option<usize>,
    out: &mut [f32],
) {
    let (hd, kv_dim) = (cfg.head_dim, cfg.kv_dim());
    let q_dim = cfg.n_heads * hd;
    let qkv_w = q_dim + 2 * kv_dim;
    let group = cfg.n_heads / cfg.n_kv_heads;
    let scale = cfg.arch.attn_scale;
    let cap = cfg.arch.attn_softcap;
    let first_seen = |end: usize| window.map_or(0, |w| end.saturating_sub(w));
    let optr = SendPtr(out.as_mut_ptr());
    let decoding = starts.iter().filter(|s| s.2 == 1).count();
    // A decoding sequence: one task per KV head (its query heads share K and V) and range of
    // positions, the ranges' partial softmaxes combined after (as flash-decoding does), so
    // that a model's few KV heads still spread over the threads. A prompt chunk: one task
    // per query head.
    let mut tasks: Vec<(usize, usize, Range<usize>)> = Vec::new();
    // Per decoding sequence and KV head: (row offset, KV head, its tasks).
    let mut heads: Vec<(usize, usize, Range<usize>)> = Vec::new();
    for (s, &(off, start, n)) in starts.iter().enumerate() {
        if n == 1 {
            let (lo, ctx) = (first_seen(start + 1), start + 1);
            let want = (4 * team().threads()).div_ceil(decoding * cfg.n_kv_heads);
            let parts = ((ctx - lo) / MIN_SPLIT).clamp(1, want);
            let per = (ctx - lo).div_ceil(parts).next_multiple_of(W);
            for g in 0..cfg.n_kv_heads {
                let first = tasks.len();
                tasks.extend((lo..ctx).step_by(per).map(|a| (s, g, a..(a + per).min(ctx))));
                heads.push((off, g, first..tasks.len()));
            }
        } else {
            tasks.extend((0..cfg.n_heads).map(|h| (s, h, 0..0)));
        }
    }
    // Each decode task's partial result: per query head of its group the maximum score,
    // the sum of exp(score - maximum), and the values weighted by those exponentials.
    let slot = group * (hd + 2);
    let mut partials = vec![0f32; tasks.len() * slot];
    let parts = Parts::new(&mut partials);
    let total_new: usize = starts.iter().map(|s| s.2).sum();
    let single = total_new * cfg.n_heads < 64 && starts.iter().all(|s| s.1 + s.2 < 256);
    let run = |i: usize| {
        let optr = optr;
        let (si, h, ref span) = tasks[i];
        let (off, start, n) = starts[si];
        let (kc, vc, base) = caches[si];
        let ctx = start + n;
        if n == 1 {
            let g = h;
            let q = &qkv[off * qkv_w + g * group * hd..off * qkv_w + (g + 1) * group * hd];
            let mut scores = decode_scores(q, kc, g, kv_dim, span.start - base..span.end - base, hd, scale, cap);
            // SAFETY: slot `i` is this task's own.
            let part = unsafe { parts.slice(i * slot..(i + 1) * slot) };
            let (ml, o) = part.split_at_mut(2 * group);
            for (head, row) in scores.chunks_exact_mut(span.len()).enumerate() {
                (ml[2 * head], ml[2 * head + 1]) = exp_shifted_inplace(row);
            }
            o.copy_from_slice(&decode_values(
                &scores,
                &vc[(span.start - base) * kv_dim + g * hd..],
                kv_dim,
                span.len(),
                hd,
            ));
            return;
        }
        let g = h / group;
        // Positions [from, ctx) are visible to some query of the chunk (`from` is at or
        // after the cache's base: the window dropped only blocks no query here sees).
        let from = first_seen(start + 1);
        let span = ctx - from;
        // Keys of KV head g as a plain [span, hd] matrix for the product.
        let mut keys = vec![0f32; span * hd];
        for (j, row) in keys.chunks_exact_mut(hd).enumerate() {
            let rel = from + j - base;
            let at = rel / KB * kv_dim * KB + g * hd * KB + rel % KB;
            for (d, x) in row.iter_mut().enumerate() {
                *x = kc[at + d * KB].to_f32();
            }
        }
        let mut values = vec![0f32; span * hd];
        for (j, row) in values.chunks_exact_mut(hd).enumerate() {
            let rel = from + j - base;
            vc[rel * kv_dim + g * hd..rel * kv_dim + (g + 1) * hd].convert_to_f32_slice(row);
        }
        let mut scores = vec![0f32; n * span];
        // SAFETY: Q rows [off, off + n) of head h read through the qkv row stride; K rows
        // [0, span) of KV head g through hd; the output block is this task's own.
        unsafe {
            gemm_f32(
                n,
                span,
                hd,
                scores.as_mut_ptr(),
                span,
                (qkv.as_ptr().add(off * qkv_w + h * hd), qkv_w as isize, 1),
                (keys.as_ptr(), 1, hd as isize),
                Parallel::Single,
            );
        }
        for i in 0..n {
            let row = &mut scores[i * span..(i + 1) * span];
            let visible = start + i + 1 - from;
            let lo = first_seen(start + i + 1) - from;
            for v in row[lo..visible].iter_mut() {
                *v *= scale;
            }
            if let Some(c) = cap {
                softcap(&mut row[lo..visible], c);
            }
            softmax_inplace(&mut row[lo..visible]);
            row[..lo].fill(0.0);
            row[visible..].fill(0.0);
        }
        unsafe {
            gemm_f32(
                n,
                hd,
                span,
                optr.0.add(off * q_dim + h * hd),
                q_dim,
                (scores.as_ptr(), span as isize, 1),
                (values.as_ptr(), hd as isize, 1),
                Parallel::Single,
            );
        }
    };
    if single {
        (0..tasks.len()).for_each(run);
    } else {
        team().for_each(tasks.len(), run);
    }
    // Each decoding sequence's KV heads: their ranges' partial softmaxes into one.
    for (off, g, range) in heads {
        let slots = &partials[range.start * slot..range.end * slot];
        let row = &mut out[off * q_dim + g * group * hd..off * q_dim + (g + 1) * group * hd];
        for (head, o) in row.chunks_exact_mut(hd).enumerate() {
            let m = slots.chunks_exact(slot).fold(f32::NEG_INFINITY, |m, p| m.max(p[2 * head]));
            o.fill(0.0);
            let mut l = 0.0;
            for p in slots.chunks_exact(slot) {
                let w = exp(p[2 * head] - m);
                l += w * p[2 * head + 1];
                for (o, v) in o.iter_mut().zip(&p[2 * group + head * hd..2 * group + (head + 1) * hd]) {
                    *o += w * v;
                }
            }
            o.iter_mut().for_each(|v| *v /= l);
        }
    }
}

/// Fewest positions a decode attention task takes on (below twice this, a KV head's
/// positions are not split).
const MIN_SPLIT: usize = 128;

const W: usize = 16;
/// Query heads handled together (independent accumulator chains).
const HEADS: usize = 4;

/// The first 16 values of `src` as f32, converted in registers where the build targets F16C
/// (`vcvtph2ps`), instead of a call per 16 values into `half`'s slice conversion (which
/// decode attention made 7% of SmolLM2's decode time).
#[inline(always)]
fn load16(src: &[f16]) -> [f32; W] {
    let src = &src[..W];
    #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
    {
        use std::arch::x86_64::*;
        // SAFETY: 16 f16 values (32 bytes) are in bounds; the build targets AVX-512 F.
        unsafe { std::mem::transmute::<__m512, [f32; W]>(_mm512_cvtph_ps(_mm256_loadu_si256(src.as_ptr().cast()))) }
    }
    #[cfg(all(target_arch = "x86_64", target_feature = "f16c", not(target_feature = "avx512f")))]
    {
        use std::arch::x86_64::*;
        // SAFETY: 16 f16 values (32 bytes) are in bounds; the build targets F16C.
        unsafe {
            let lo = _mm256_cvtph_ps(_mm_loadu_si128(src.as_ptr().cast()));
            let hi = _mm256_cvtph_ps(_mm_loadu_si128(src.as_ptr().add(8).cast()));
            std::mem::transmute::<[__m256; 2], [f32; W]>([lo, hi])
        }
    }
    #[cfg(not(all(target_arch = "x86_64", any(target_feature = "f16c", target_feature = "avx512f"))))]
    {
        std::array::from_fn(|i| src[i].to_f32())
    }
}

/// Scaled (and soft-capped, where the model caps) scores `[heads, span.len()]` of the query
/// heads `q` (`[heads, hd]`) against positions `span` of KV head `g` of the blocked keys `kc`
/// (see [`KvCache`]): 16 positions at a time, one fused multiply-add per dimension and head,
/// no horizontal sums.
/// Blocks at the span's ends are computed whole (their unused positions are allocated) and cut.
fn decode_scores(
    q: &[f32],
    kc: &[f16],
    g: usize,
    kv_dim: usize,
    span: std::ops::Range<usize>,
    hd: usize,
    scale: f32,
    cap: Option<f32>,
) -> Vec<f32> {
    let heads = q.len() / hd;
    let (lo, ctx) = (span.start, span.end);
    let len = ctx - lo;
    let mut scores = vec![0f32; heads * len];
    for h0 in (0..heads).step_by(HEADS) {
        let hn = HEADS.min(heads - h0);
        let mut qs = vec![[0f32; HEADS]; hd];
        for (d, qd) in qs.iter_mut().enumerate() {
            for i in 0..hn {
                qd[i] = q[(h0 + i) * hd + d];
            }
        }
        for b in lo / W..ctx.div_ceil(W) {
            let blk = &kc[b * kv_dim * W + g * hd * W..b * kv_dim * W + (g + 1) * hd * W];
            let mut acc = [[0f32; W]; HEADS];
            for (k16, qd) in blk.chunks_exact(W).zip(&qs) {
                let k = load16(k16);
                for i in 0..HEADS {
                    for l in 0..W {
                        acc[i][l] = qd[i].mul_add(k[l], acc[i][l]);
                    }
                }
            }
            let from = lo.max(b * W);
            let to = ctx.min((b + 1) * W);
            for i in 0..hn {
                for pos in from..to {
                    scores[(h0 + i) * len + pos - lo] = acc[i][pos - b * W] * scale;
                }
            }
        }
    }
    if let Some(c) = cap {
        softcap(&mut scores, c);
    }
    scores
}

/// `x = cap * tanh(x / cap)` (Gemma 2's soft-capping of logits).
fn softcap(x: &mut [f32], cap: f32) {
    for v in x.iter_mut() {
        *v = cap * (*v / cap).tanh();
    }
}

/// `o[h] = Σ_j p[h, j] · v[j]` for every head of `p` (`[heads, ctx]`); `v` starts at the KV
/// head's first value, rows `kv_dim` apart. 16 dimensions and up to 4 heads per pass.
fn decode_values(p: &[f32], v: &[f16], kv_dim: usize, ctx: usize, hd: usize) -> Vec<f32> {
    let heads = p.len() / ctx;
    let mut o = vec![0f32; heads * hd];
    for h0 in (0..heads).step_by(HEADS) {
        let hn = HEADS.min(heads - h0);
        let mut d0 = 0;
        while d0 + W <= hd {
            let mut acc = [[0f32; W]; HEADS];
            for j in 0..ctx {
                let vj = load16(&v[j * kv_dim + d0..j * kv_dim + d0 + W]);
                let mut pj = [0f32; HEADS];
                for i in 0..hn {
                    pj[i] = p[(h0 + i) * ctx + j];
                }
                for i in 0..HEADS {
                    for l in 0..W {
                        acc[i][l] = pj[i].mul_add(vj[l], acc[i][l]);
                    }
                }
            }
            for i in 0..hn {
                o[(h0 + i) * hd + d0..(h0 + i) * hd + d0 + W].copy_from_slice(&acc[i]);
            }
            d0 += W;
        }
        for d in d0..hd {
            for i in 0..hn {
                o[(h0 + i) * hd + d] = (0..ctx).map(|j| p[(h0 + i) * ctx + j] * v[j * kv_dim + d].to_f32()).sum();
            }
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gemma3_text(extra: serde_json::Value) -> Result<LlamaConfig> {
        // A directory of its own per call: tests run in parallel, several with the same config.
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("ragway-gemma3-config-{}-{call}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut c = serde_json::json!({
            "model_type": "gemma3_text", "hidden_size": 640, "intermediate_size": 2048, "vocab_size": 1000,
            "num_hidden_layers": 12, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
            "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
            "sliding_window": 512, "rope_local_base_freq": 10000.0, "query_pre_attn_scalar": 256,
        });
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
        let out = safetensors_config(&dir).map(|(cfg, _)| cfg);
        let _ = std::fs::remove_dir_all(&dir);
        out
    }

    /// A small grouped-query shape for the attention tests (6 query heads over 2 KV heads of
    /// 32): the config, KV width, Q width and QKV row width.
    fn attention_shape() -> (LlamaConfig, usize, usize, usize) {
        let cfg = gemma3_text(serde_json::json!({
            "hidden_size": 192, "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 32,
            "query_pre_attn_scalar": 32, "num_hidden_layers": 1
        }))
        .unwrap();
        let (kv_dim, q_dim) = (cfg.kv_dim(), cfg.n_heads * cfg.head_dim);
        (cfg, kv_dim, q_dim, q_dim + 2 * kv_dim)
    }

    /// A seeded LCG's next value, 31 bits.
    fn lcg(seed: &mut u64) -> u64 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        *seed >> 33
    }

    /// Decode attention (split over ranges of positions at long contexts, the ranges'
    /// softmaxes combined) against the prompt path's (one product and one softmax per head,
    /// through gemm) for the same query over the same cache.
    #[test]
    fn decode_attention_over_split_positions_matches_the_prompt_path() {
        let (cfg, kv_dim, q_dim, qkv_w) = attention_shape();
        let mut seed = 7u64;
        let mut rand = || lcg(&mut seed) as f32 / (1u64 << 31) as f32 * 4.0 - 2.0;
        for ctx in [5usize, 300, 700, 1500] {
            let mut cache = KvCache::new(&cfg);
            cache.reserve(ctx, 64);
            for pos in 0..ctx {
                let (k, v): (Vec<f32>, Vec<f32>) = (0..kv_dim).map(|_| (rand(), rand())).unzip();
                cache.put(0, pos, &k, &v);
            }
            // Two new rows: positions ctx - 2 and ctx - 1 (their keys are in the cache).
            let qkv: Vec<f32> = (0..2 * qkv_w).map(|_| rand()).collect();
            let caches = [(cache.k[0].as_slice(), cache.v[0].as_slice(), 0)];
            for window in [None, Some(200)] {
                let mut prompt = vec![0f32; 2 * q_dim];
                attention(&cfg, &qkv, &caches, &[(0, ctx - 2, 2)], window, &mut prompt);
                let mut decode = vec![0f32; q_dim];
                attention(&cfg, &qkv[qkv_w..], &caches, &[(0, ctx - 1, 1)], window, &mut decode);
                for (a, b) in decode.iter().zip(&prompt[q_dim..]) {
                    assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "ctx {ctx} window {window:?}: {a} vs {b}");
                }
                // In one batch with a prompt chunk (and another decode) over the same cache,
                // each row is what it was alone.
                let rows: Vec<f32> = [&qkv[qkv_w..], &qkv[..], &qkv[qkv_w..]].concat();
                let mut batched = vec![0f32; 4 * q_dim];
                let caches = [caches[0]; 3];
                let starts = [(0, ctx - 1, 1), (1, ctx - 2, 2), (3, ctx - 1, 1)];
                attention(&cfg, &rows, &caches, &starts, window, &mut batched);
                let alone = [&decode[..], &prompt[..], &decode[..]].concat();
                for (a, b) in batched.iter().zip(&alone) {
                    assert!(
                        (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                        "batched, ctx {ctx} window {window:?}: {a} vs {b}"
                    );
                }
            }
        }
    }

    /// Batches of sequences with caches of their own, decoding and prefilling chunks at
    /// once: each sequence's rows are what they are when it runs alone.
    #[test]
    fn attention_rows_do_not_depend_on_the_batch() {
        let (cfg, kv_dim, q_dim, qkv_w) = attention_shape();
        let mut seed = 11u64;
        let mut next = move || lcg(&mut seed);
        for round in 0..40 {
            let seqs = 1 + next() as usize % 4;
            let mut caches = Vec::new();
            let mut shapes = Vec::new();
            for _ in 0..seqs {
                let n = [1usize, 1, 2, 5, 16][next() as usize % 5];
                let ctx = n + next() as usize % 600;
                let mut cache = KvCache::new(&cfg);
                cache.reserve(ctx, 64);
                for pos in 0..ctx {
                    let kv: Vec<f32> = (0..2 * kv_dim).map(|_| (next() % 1000) as f32 / 250.0 - 2.0).collect();
                    cache.put(0, pos, &kv[..kv_dim], &kv[kv_dim..]);
                }
                caches.push(cache);
                shapes.push((ctx - n, n));
            }
            let total: usize = shapes.iter().map(|s| s.1).sum();
            let qkv: Vec<f32> = (0..total * qkv_w).map(|_| (next() % 1000) as f32 / 250.0 - 2.0).collect();
            let views: Vec<(&[f16], &[f16], usize)> =
                caches.iter().map(|c| (c.k[0].as_slice(), c.v[0].as_slice(), 0)).collect();
            let mut starts = Vec::new();
            let mut off = 0;
            for &(start, n) in &shapes {
                starts.push((off, start, n));
                off += n;
            }
            let window = if round % 2 == 0 { None } else { Some(100) };
            let mut batched = vec![0f32; total * q_dim];
            attention(&cfg, &qkv, &views, &starts, window, &mut batched);
            for (i, &(off, start, n)) in starts.iter().enumerate() {
                let mut alone = vec![0f32; n * q_dim];
                attention(
                    &cfg,
                    &qkv[off * qkv_w..(off + n) * qkv_w],
                    &views[i..i + 1],
                    &[(0, start, n)],
                    window,
                    &mut alone,
                );
                for (a, b) in batched[off * q_dim..(off + n) * q_dim].iter().zip(&alone) {
                    assert!(
                        (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                        "round {round}, sequence {i} {shapes:?}: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn gemma3_text_config_follows_transformers() {
        let cfg = gemma3_text(serde_json::json!({})).unwrap();
        assert_eq!(cfg.arch.embed_scale, Some((640f32).sqrt()));
        assert_eq!(cfg.arch.activation, Activation::GeluTanh);
        // Five sliding layers, then a global one (the default pattern of 6).
        let windows: Vec<_> = (0..12).map(|i| cfg.layer_window(i)).collect();
        assert_eq!(windows[..6], [Some(512), Some(512), Some(512), Some(512), Some(512), None]);
        assert_eq!(cfg.layer_rope(0), (10_000.0, 1.0));
        assert_eq!(cfg.layer_rope(5), (1_000_000.0, 1.0));
        // Attention scales by query_pre_attn_scalar ** -0.5, not the head size's.
        let cfg = gemma3_text(serde_json::json!({"query_pre_attn_scalar": 144})).unwrap();
        assert!((cfg.arch.attn_scale - 1.0 / 12.0).abs() < 1e-7);
        // Newer configs list each layer's kind; linear RoPE scaling applies to global layers.
        let types: Vec<&str> =
            (0..12).map(|i| if (i + 1) % 3 == 0 { "full_attention" } else { "sliding_attention" }).collect();
        let cfg = gemma3_text(serde_json::json!({
            "layer_types": types, "rope_scaling": {"rope_type": "linear", "factor": 8.0}
        }))
        .unwrap();
        assert_eq!(cfg.arch.sliding_pattern, Some(3));
        assert_eq!(cfg.layer_rope(2), (1_000_000.0, 8.0));
        assert_eq!(cfg.layer_rope(0), (10_000.0, 1.0));
        // What the decoder cannot run is refused, not approximated.
        let irregular: Vec<&str> =
            (0..12).map(|i| if i == 4 { "full_attention" } else { "sliding_attention" }).collect();
        assert!(gemma3_text(serde_json::json!({"layer_types": irregular})).is_err());
        // Soft-capping (Gemma 2's, which the decoders run) is read when a config sets it.
        let cfg = gemma3_text(serde_json::json!({"final_logit_softcapping": 30.0})).unwrap();
        assert_eq!((cfg.arch.attn_softcap, cfg.arch.final_softcap), (None, Some(30.0)));
    }
}

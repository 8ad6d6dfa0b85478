//! The decoder on a candle device (CUDA, or the CPU for tests): the same architectures as the
//! native CPU decoder ([`super::model::Llama`]), computed with candle tensors, over a paged KV
//! cache ([`super::paged`]) that lives in device memory.
//!
//! - Weights stay as loaded: GGUF matrices quantized (candle's quantized matmul: on CUDA its
//!   matrix-vector kernels for decoding and dequantize + cuBLAS for longer inputs), the
//!   quantized token embedding read row by row, safetensors matrices in their own f16, bf16 or
//!   f32 through the device's matmul (cuBLAS).
//! - Keys and values of every layer are rows of two f16 tensors `[blocks * BLOCK, kv_dim]`;
//!   each sequence maps its positions to rows with a block table per layer. New rows are
//!   written with one scatter per layer; attention gathers each sequence's blocks.
//! - Decoding sequences attend together: one gather of their blocks (padded to the longest)
//!   and two batched matmuls per layer for the whole batch, masked per sequence. Prompt chunks
//!   attend one sequence at a time with a causal (and, for sliding layers, windowed) mask.
//!
//! Activations are f32 throughout (the KV cache f16, as on the CPU path), so that on the CPU
//! device this decoder's logits match the native decoder's to within rounding.

use super::model::{
    gguf_config, hf_norms, mmap_safetensors, safetensors_config, stacked_names, Activation, LlamaConfig, Rope,
    RopeStyle,
};
use super::paged::{BlockPool, PagedKv, SharedPool, BLOCK};
use crate::error::{EngineError, Result};
use candle_core::quantized::{gguf_file, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor, D};
use std::cell::{Cell, RefCell};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// A linear layer on the device.
enum DLinear {
    /// Quantized parts stacked along the output (Q, K and V; gate and up).
    Quant(Vec<QMatMul>),
    /// `[n, k]` in f16, bf16 or f32.
    Dense(Tensor),
}

impl DLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            DLinear::Quant(parts) => {
                let outs = parts.iter().map(|p| p.forward(x)).collect::<candle_core::Result<Vec<_>>>()?;
                if outs.len() == 1 {
                    outs.into_iter().next().expect("one part")
                } else {
                    Tensor::cat(&outs, D::Minus1)?
                }
            }
            DLinear::Dense(w) => x.to_dtype(w.dtype())?.matmul(&w.t()?)?.to_dtype(DType::F32)?,
        })
    }
}

/// The token embedding (and the output projection when they are tied).
enum Embedding {
    Quant(QMatMul),
    Dense(Tensor),
}

struct DLayer {
    attn_norm: Tensor,
    qkv: DLinear,
    qkv_bias: Option<Tensor>,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    o: DLinear,
    post_attn_norm: Option<Tensor>,
    ffn_norm: Tensor,
    gate_up: DLinear,
    down: DLinear,
    post_ffn_norm: Option<Tensor>,
}

/// How much KV memory to set aside, in tokens of every layer (as the scheduler counts them).
#[derive(Debug, Clone, Copy)]
pub struct KvSizing {
    /// Tokens of KV the scheduler may admit.
    pub budget_tokens: usize,
    /// Sequences running at once (each may leave one partial block per layer).
    pub max_running: usize,
    /// Tokens of one forward pass (a prompt chunk briefly holds its rows beyond a window).
    pub max_batch_tokens: usize,
}

impl KvSizing {
    /// Blocks that hold `budget_tokens` of every layer with room for partial blocks.
    pub fn blocks(&self, n_layers: usize) -> usize {
        let tokens = self.budget_tokens.saturating_mul(n_layers);
        let slack = (self.max_running + 1 + self.max_batch_tokens.div_ceil(BLOCK)).saturating_mul(n_layers);
        tokens.div_ceil(BLOCK).saturating_add(slack)
    }
}

/// Sizes the KV cache once the weights are on the device: gets the model's configuration
/// and the bytes its weights took there.
pub type SizeKv<'a> = &'a dyn Fn(&LlamaConfig, usize) -> Result<KvSizing>;

/// A llama-family decoder on a candle device with a paged KV cache.
pub struct DeviceLlama {
    cfg: LlamaConfig,
    device: Device,
    embed: Embedding,
    layers: Vec<DLayer>,
    norm: Tensor,
    lm_head: Option<DLinear>,
    k_cache: Tensor,
    v_cache: Tensor,
    pool: SharedPool,
    windows: Arc<Vec<Option<usize>>>,
    weight_bytes: usize,
    kv: KvSizing,
}

/// One sequence's part of a forward pass on the paged cache.
pub struct PagedSeq<'a> {
    /// New tokens, at positions `kv.len()..`.
    pub tokens: &'a [u32],
    pub kv: &'a mut PagedKv,
    pub want_logits: bool,
}

fn f32_vec(t: &QTensor, device: &Device) -> Result<Tensor> {
    Ok(t.dequantize(device)?.to_dtype(DType::F32)?.flatten_all()?)
}

impl DeviceLlama {
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Bytes of weights on the device.
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// How the KV cache was sized (its token budget is the scheduler's).
    pub fn kv_sizing(&self) -> KvSizing {
        self.kv
    }

    /// Blocks of the KV pool in use and in all.
    pub fn blocks(&self) -> (usize, usize) {
        let p = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        (p.used_blocks(), p.capacity())
    }

    /// An empty KV cache for a new sequence.
    pub fn new_kv(&self) -> PagedKv {
        PagedKv::new(self.pool.clone(), self.windows.clone())
    }

    /// Loads a GGUF decoder onto `device`; `kv` sizes the paged cache once the weights are
    /// there. Quantized matrices stay quantized on the device.
    pub fn from_gguf(path: &Path, content: &gguf_file::Content, device: &Device, kv: SizeKv<'_>) -> Result<Self> {
        let cfg = gguf_config(path, content)?;
        let gemma = cfg.arch.is_gemma();
        let has = |name: &str| content.tensor_infos.contains_key(name);
        let file = RefCell::new(std::fs::File::open(path)?);
        let bytes = Cell::new(0usize);
        let tensor = |name: &str| -> Result<QTensor> {
            let t = content.tensor(&mut *file.borrow_mut(), name, device).map_err(|e| load_error(path, name, e))?;
            bytes.set(bytes.get() + t.storage_size_in_bytes());
            Ok(t)
        };
        let linear = |names: &[String]| -> Result<DLinear> {
            let parts = names
                .iter()
                .map(|n| tensor(n).and_then(|t| QMatMul::from_qtensor(t).map_err(|e| load_error(path, n, e))))
                .collect::<Result<Vec<_>>>()?;
            Ok(DLinear::Quant(parts))
        };
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let n = |t: &str| format!("blk.{i}.{t}");
            let (qkv_names, gate_up_names) = stacked_names(i, true, has);
            let (qkv, gate_up) = (linear(&qkv_names)?, linear(&gate_up_names)?);
            let o = linear(&[n("attn_output.weight")])?;
            let down = linear(&[n("ffn_down.weight")])?;
            let small = |t: &str| -> Result<Tensor> { f32_vec(&tensor(&n(t))?, device) };
            let qkv_bias = if has(&n("attn_q.bias")) {
                Some(Tensor::cat(&[small("attn_q.bias")?, small("attn_k.bias")?, small("attn_v.bias")?], 0)?)
            } else {
                None
            };
            let (q_norm, k_norm) = if has(&n("attn_q_norm.weight")) {
                (Some(small("attn_q_norm.weight")?), Some(small("attn_k_norm.weight")?))
            } else {
                (None, None)
            };
            let (post_attn_norm, post_ffn_norm) = if gemma {
                (Some(small("post_attention_norm.weight")?), Some(small("post_ffw_norm.weight")?))
            } else {
                (None, None)
            };
            layers.push(DLayer {
                attn_norm: small("attn_norm.weight")?,
                qkv,
                qkv_bias,
                q_norm,
                k_norm,
                o,
                post_attn_norm,
                ffn_norm: small("ffn_norm.weight")?,
                gate_up,
                down,
                post_ffn_norm,
            });
        }
        let norm = f32_vec(&tensor("output_norm.weight")?, device)?;
        let lm_head = if has("output.weight") { Some(linear(&["output.weight".to_string()])?) } else { None };
        let embed_q = tensor("token_embd.weight")?;
        let embed = if embed_q.shape().dims()[1] % embed_q.dtype().block_size() == 0 {
            Embedding::Quant(QMatMul::from_qtensor(embed_q).map_err(|e| load_error(path, "token_embd.weight", e))?)
        } else {
            Embedding::Dense(embed_q.dequantize(device)?)
        };
        Self::assemble(cfg, device, embed, layers, norm, lm_head, bytes.get(), kv, path)
    }

    /// Loads a Hugging Face decoder folder onto `device`, matrices in their own precision.
    pub fn from_safetensors(dir: &Path, device: &Device, kv: SizeKv<'_>) -> Result<Self> {
        let (cfg, hf) = safetensors_config(dir)?;
        let st = mmap_safetensors(dir)?;
        let has = |name: &str| st.get(name).is_ok();
        let bytes = Cell::new(0usize);
        let load = |name: &str| -> Result<Tensor> {
            let t = st.load(name, device).map_err(|e| load_error(dir, name, e))?;
            bytes.set(bytes.get() + t.elem_count() * t.dtype().size_in_bytes());
            Ok(t)
        };
        let dense = |names: &[String]| -> Result<DLinear> {
            let parts = names.iter().map(|n| load(n)).collect::<Result<Vec<_>>>()?;
            let w = if parts.len() == 1 { parts.into_iter().next().expect("one") } else { Tensor::cat(&parts, 0)? };
            let w = match w.dtype() {
                DType::F16 | DType::BF16 | DType::F32 => w,
                _ => w.to_dtype(DType::F32)?,
            };
            Ok(DLinear::Dense(w))
        };
        let vec1 = |name: &str| -> Result<Tensor> {
            Ok(st.load(name, device).map_err(|e| load_error(dir, name, e))?.to_dtype(DType::F32)?)
        };
        let names = hf_norms(&cfg.arch);
        let norm = |name: &str| -> Result<Tensor> {
            let w = vec1(name)?;
            Ok(if names.plus_one { (w + 1.0)? } else { w })
        };
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let n = |t: &str| format!("model.layers.{i}.{t}");
            let (qkv_names, gate_up_names) = stacked_names(i, false, has);
            let (qkv, gate_up) = (dense(&qkv_names)?, dense(&gate_up_names)?);
            let o = dense(&[n("self_attn.o_proj.weight")])?;
            let down = dense(&[n("mlp.down_proj.weight")])?;
            let qkv_bias = if has(&n("self_attn.q_proj.bias")) {
                Some(Tensor::cat(
                    &[
                        vec1(&n("self_attn.q_proj.bias"))?,
                        vec1(&n("self_attn.k_proj.bias"))?,
                        vec1(&n("self_attn.v_proj.bias"))?,
                    ],
                    0,
                )?)
            } else {
                None
            };
            let (q_norm, k_norm) = if has(&n("self_attn.q_norm.weight")) {
                (Some(norm(&n("self_attn.q_norm.weight"))?), Some(norm(&n("self_attn.k_norm.weight"))?))
            } else {
                (None, None)
            };
            layers.push(DLayer {
                attn_norm: norm(&n(names.attn))?,
                qkv,
                qkv_bias,
                q_norm,
                k_norm,
                o,
                post_attn_norm: names.post_attn.map(|a| norm(&n(a))).transpose()?,
                ffn_norm: norm(&n(names.ffn))?,
                gate_up,
                down,
                post_ffn_norm: names.post_ffn.map(|f| norm(&n(f))).transpose()?,
            });
        }
        let embed = Embedding::Dense(load("model.embed_tokens.weight")?);
        let tied = hf.tie_word_embeddings.unwrap_or(false) || !has("lm_head.weight");
        let lm_head = if tied { None } else { Some(dense(&["lm_head.weight".to_string()])?) };
        let norm = norm("model.norm.weight")?;
        Self::assemble(cfg, device, embed, layers, norm, lm_head, bytes.get(), kv, dir)
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        cfg: LlamaConfig,
        device: &Device,
        embed: Embedding,
        layers: Vec<DLayer>,
        norm: Tensor,
        lm_head: Option<DLinear>,
        weight_bytes: usize,
        kv: SizeKv<'_>,
        path: &Path,
    ) -> Result<Self> {
        let bad = |reason: String| Err(EngineError::InvalidModel { path: path.to_path_buf(), reason });
        let qkv_n = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim;
        let len = |t: &Tensor| t.elem_count();
        for (i, l) in layers.iter().enumerate() {
            let norms_ok = len(&l.attn_norm) == cfg.hidden
                && len(&l.ffn_norm) == cfg.hidden
                && l.qkv_bias.as_ref().is_none_or(|b| len(b) == qkv_n)
                && l.q_norm.as_ref().is_none_or(|n| len(n) == cfg.head_dim)
                && l.k_norm.as_ref().is_none_or(|n| len(n) == cfg.head_dim)
                && l.post_attn_norm.as_ref().is_none_or(|n| len(n) == cfg.hidden)
                && l.post_ffn_norm.as_ref().is_none_or(|n| len(n) == cfg.hidden);
            if !norms_ok {
                return bad(format!("layer {i} has norms that do not match the configuration"));
            }
        }
        let kv = kv(&cfg, weight_bytes)?;
        let blocks = kv.blocks(cfg.n_layers);
        let rows = blocks.checked_mul(BLOCK).ok_or_else(|| EngineError::Internal("KV cache size overflows".into()))?;
        let kv_bytes = rows.saturating_mul(cfg.kv_dim()).saturating_mul(2 * 2);
        let alloc = |what: &str| -> Result<Tensor> {
            Tensor::zeros((rows, cfg.kv_dim()), DType::F16, device).map_err(|e| {
                EngineError::Internal(format!(
                    "cannot allocate the {what} cache of {} MiB ({} tokens of {} layers) on {device:?}: {e}",
                    kv_bytes >> 20,
                    kv.budget_tokens,
                    cfg.n_layers
                ))
            })
        };
        let k_cache = alloc("key")?;
        let v_cache = alloc("value")?;
        let windows = Arc::new((0..cfg.n_layers).map(|i| cfg.layer_window(i)).collect::<Vec<_>>());
        tracing::info!(
            architecture = %cfg.arch.name,
            device = ?device,
            layers = cfg.n_layers,
            weight_mib = weight_bytes >> 20,
            kv_blocks = blocks,
            kv_mib = kv_bytes >> 20,
            "decoder loaded on the device"
        );
        let this = Self {
            cfg,
            device: device.clone(),
            embed,
            layers,
            norm,
            lm_head,
            k_cache,
            v_cache,
            pool: Arc::new(Mutex::new(BlockPool::new(blocks))),
            windows,
            weight_bytes,
            kv,
        };
        // A one-token pass checks every weight's shape now, not on the first request.
        let mut probe = this.new_kv();
        this.forward(&mut [PagedSeq { tokens: &[0], kv: &mut probe, want_logits: true }])
            .map_err(|e| EngineError::InvalidModel { path: path.to_path_buf(), reason: format!("test pass: {e}") })?;
        Ok(this)
    }

    /// Runs the new tokens of every sequence, writes their keys and values to the paged cache,
    /// and returns `[n, vocab]` logits for the sequences with `want_logits` (in batch order).
    pub fn forward(&self, batch: &mut [PagedSeq<'_>]) -> Result<Vec<f32>> {
        let cfg = &self.cfg;
        let (hd, kv_dim, nh, nkv) = (cfg.head_dim, cfg.kv_dim(), cfg.n_heads, cfg.n_kv_heads);
        let q_dim = nh * hd;
        let total: usize = batch.iter().map(|b| b.tokens.len()).sum();
        if total == 0 {
            return Ok(Vec::new());
        }
        let mut starts = Vec::with_capacity(batch.len());
        for b in batch.iter() {
            let start = b.kv.len();
            cfg.check_input(start, b.tokens)?;
            starts.push(start);
        }
        // Blocks for the new positions (copies of shared blocks first), all or nothing per
        // sequence; blocks a failed pass took stay with their sequences for the next one.
        for (i, b) in batch.iter_mut().enumerate() {
            let copies = b.kv.grow(starts[i] + b.tokens.len()).map_err(|e| EngineError::Internal(e.to_string()))?;
            for c in copies {
                for cache in [&self.k_cache, &self.v_cache] {
                    let rows = cache.narrow(0, c.from as usize * BLOCK, BLOCK)?.copy()?;
                    cache.slice_set(&rows, 0, c.to as usize * BLOCK)?;
                }
            }
        }
        let dev = &self.device;
        let positions: Vec<usize> = batch.iter().zip(&starts).flat_map(|(b, &s)| s..s + b.tokens.len()).collect();
        let tokens: Vec<u32> = batch.iter().flat_map(|b| b.tokens.iter().copied()).collect();
        let ids = Tensor::from_vec(tokens, total, dev)?;
        let mut x = match &self.embed {
            Embedding::Quant(q) => q.embedding(&ids)?,
            Embedding::Dense(w) => w.index_select(&ids, 0)?,
        }
        .to_dtype(DType::F32)?;
        if let Some(scale) = cfg.arch.embed_scale {
            x = (x * scale as f64)?;
        }
        // cos/sin of each RoPE base, rows in batch order.
        let mut ropes: Vec<((f32, f32), Tensor, Tensor)> = Vec::new();
        for li in 0..cfg.n_layers {
            let key = cfg.layer_rope(li);
            if !ropes.iter().any(|(k, _, _)| *k == key) {
                let r = Rope::new(key, hd, &positions);
                let cos = Tensor::from_vec(r.cos, (total, hd / 2), dev)?;
                let sin = Tensor::from_vec(r.sin, (total, hd / 2), dev)?;
                ropes.push((key, cos, sin));
            }
        }
        // Rows the new keys and values go to, every layer: [layers, total].
        let mut write = Vec::with_capacity(cfg.n_layers * total);
        for li in 0..cfg.n_layers {
            for (b, &s) in batch.iter().zip(&starts) {
                let t = b.kv.table(li);
                for pos in s..s + b.tokens.len() {
                    write.push(t.slot(pos).ok_or_else(|| EngineError::Internal(format!("no block for {pos}")))?);
                }
            }
        }
        let write = Tensor::from_vec(write, (cfg.n_layers, total), dev)?;
        // Attention plans: decoding sequences together, prompt chunks one by one.
        let mut offsets = Vec::with_capacity(batch.len());
        let mut off = 0;
        for b in batch.iter() {
            offsets.push(off);
            off += b.tokens.len();
        }
        let decoding: Vec<usize> = (0..batch.len()).filter(|&i| batch[i].tokens.len() == 1).collect();
        let prompts: Vec<usize> = (0..batch.len()).filter(|&i| batch[i].tokens.len() > 1).collect();
        let window_kinds: Vec<Option<usize>> = {
            let mut w: Vec<Option<usize>> = self.windows.iter().copied().collect();
            w.sort_unstable();
            w.dedup();
            w
        };
        // For each window kind: the decode gather ([layers of that kind] × [seqs, blocks]) and
        // mask, and per prompt its blocks and mask.
        let span = |start: usize, n: usize, window: Option<usize>| -> (usize, usize) {
            // First and last block any of the n queries sees.
            let lo = window.map_or(0, |w| (start + 1).saturating_sub(w));
            (lo / BLOCK, (start + n - 1) / BLOCK)
        };
        let decode_plan = if decoding.is_empty() {
            None
        } else {
            let rows =
                Tensor::from_vec(decoding.iter().map(|&i| offsets[i] as u32).collect::<Vec<_>>(), decoding.len(), dev)?;
            let mut per_kind = Vec::new();
            for &w in &window_kinds {
                let nb = decoding
                    .iter()
                    .map(|&i| {
                        let (a, z) = span(starts[i], 1, w);
                        z - a + 1
                    })
                    .max()
                    .unwrap_or(1);
                let ctx = nb * BLOCK;
                let mut mask = vec![f32::NEG_INFINITY; decoding.len() * ctx];
                for (r, &i) in decoding.iter().enumerate() {
                    let pos = starts[i];
                    let (a, _) = span(pos, 1, w);
                    let lo = w.map_or(0, |w| (pos + 1).saturating_sub(w));
                    for p in lo..=pos {
                        mask[r * ctx + (p - a * BLOCK)] = 0.0;
                    }
                }
                let mask = Tensor::from_vec(mask, (decoding.len(), 1, 1, ctx), dev)?;
                per_kind.push((w, nb, mask));
            }
            Some((rows, per_kind))
        };
        let mut prompt_masks = Vec::with_capacity(prompts.len());
        for &i in &prompts {
            let n = batch[i].tokens.len();
            let mut per_kind = Vec::new();
            for &w in &window_kinds {
                let (a, z) = span(starts[i], n, w);
                let ctx = (z - a + 1) * BLOCK;
                let mut mask = vec![f32::NEG_INFINITY; n * ctx];
                for q in 0..n {
                    let pos = starts[i] + q;
                    let lo = w.map_or(0, |w| (pos + 1).saturating_sub(w));
                    for p in lo..=pos {
                        mask[q * ctx + (p - a * BLOCK)] = 0.0;
                    }
                }
                per_kind.push((w, a, z, Tensor::from_vec(mask, (n, ctx), dev)?));
            }
            prompt_masks.push(per_kind);
        }
        // Order of attention outputs: decoding rows, then each prompt's rows; `order` maps a
        // batch row to its row there.
        let mut order = vec![0u32; total];
        let mut at = 0u32;
        for &i in &decoding {
            order[offsets[i]] = at;
            at += 1;
        }
        for &i in &prompts {
            for q in 0..batch[i].tokens.len() {
                order[offsets[i] + q] = at;
                at += 1;
            }
        }
        let in_order = order.iter().enumerate().all(|(r, &o)| o as usize == r);
        let order = Tensor::from_vec(order, total, dev)?;
        // The blocks each layer's attention gathers, for every layer, in one upload: decoding
        // sequences' (padded to the longest of their window kind), then each prompt's.
        let mut flat: Vec<u32> = Vec::new();
        let mut decode_ids: Vec<(usize, usize)> = Vec::with_capacity(cfg.n_layers);
        let mut prompt_ids: Vec<Vec<(usize, usize)>> = vec![Vec::with_capacity(cfg.n_layers); prompts.len()];
        for li in 0..cfg.n_layers {
            let window = self.windows[li];
            if let Some((_, per_kind)) = &decode_plan {
                let nb = per_kind.iter().find(|(w, _, _)| *w == window).expect("every kind planned").1;
                let from = flat.len();
                for &i in &decoding {
                    let (a, z) = span(starts[i], 1, window);
                    let t = batch[i].kv.table(li).blocks();
                    // Blocks past this sequence's end are padding (masked out).
                    flat.extend((0..nb).map(|j| if a + j <= z { t[a + j].unwrap_or(0) } else { 0 }));
                }
                decode_ids.push((from, flat.len() - from));
            }
            for (pi, &i) in prompts.iter().enumerate() {
                let (_, a, z, _) =
                    prompt_masks[pi].iter().find(|(w, _, _, _)| *w == window).expect("every kind planned");
                let t = batch[i].kv.table(li).blocks();
                let from = flat.len();
                flat.extend((*a..=*z).map(|j| t[j].unwrap_or(0)));
                prompt_ids[pi].push((from, flat.len() - from));
            }
        }
        let flat_len = flat.len();
        let flat = Tensor::from_vec(flat, flat_len, dev)?;
        let group = nh / nkv;
        let scale = cfg.arch.attn_scale as f64;
        let eps = cfg.rms_eps;
        for (li, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, eps)?;
            let mut qkv = layer.qkv.forward(&h)?;
            if let Some(b) = &layer.qkv_bias {
                qkv = qkv.broadcast_add(b)?;
            }
            let mut q = qkv.narrow(1, 0, q_dim)?.reshape((total, nh, hd))?;
            let mut k = qkv.narrow(1, q_dim, kv_dim)?.reshape((total, nkv, hd))?;
            let v = qkv.narrow(1, q_dim + kv_dim, kv_dim)?;
            if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
                q = candle_nn::ops::rms_norm(&q.contiguous()?, qn, eps)?;
                k = candle_nn::ops::rms_norm(&k.contiguous()?, kn, eps)?;
            }
            let key = cfg.layer_rope(li);
            let (_, cos, sin) = ropes.iter().find(|(k, _, _)| *k == key).expect("computed above");
            let q = rope(&q, cos, sin, cfg.rope_style)?;
            let k = rope(&k, cos, sin, cfg.rope_style)?;
            // Store the new keys and values.
            let slots = write.get(li)?.unsqueeze(1)?.broadcast_as((total, kv_dim))?.contiguous()?;
            self.k_cache.scatter_set(&slots, &k.reshape((total, kv_dim))?.to_dtype(DType::F16)?, 0)?;
            self.v_cache.scatter_set(&slots, &v.contiguous()?.to_dtype(DType::F16)?, 0)?;
            let window = self.windows[li];
            let mut outs = Vec::with_capacity(1 + prompts.len());
            if let Some((rows, per_kind)) = &decode_plan {
                let (_, nb, mask) = per_kind.iter().find(|(w, _, _)| *w == window).expect("every kind planned");
                let nb = *nb;
                let bd = decoding.len();
                let (from, len) = decode_ids[li];
                let blocks = flat.narrow(0, from, len)?;
                let keys = gather(&self.k_cache, &blocks, bd, nb * BLOCK, nkv, hd)?;
                let values = gather(&self.v_cache, &blocks, bd, nb * BLOCK, nkv, hd)?;
                let qd = q.index_select(rows, 0)?.reshape((bd, nkv, group, hd))?;
                let scores = softcap((qd.matmul(&keys.transpose(2, 3)?)? * scale)?, cfg.arch.attn_softcap)?
                    .broadcast_add(mask)?;
                let p = candle_nn::ops::softmax_last_dim(&scores)?;
                outs.push(p.matmul(&values)?.reshape((bd, q_dim))?);
            }
            for (pi, &i) in prompts.iter().enumerate() {
                let n = batch[i].tokens.len();
                let (_, _, _, mask) =
                    prompt_masks[pi].iter().find(|(w, _, _, _)| *w == window).expect("every kind planned");
                let (from, nb) = prompt_ids[pi][li];
                let ids = flat.narrow(0, from, nb)?;
                let keys = gather(&self.k_cache, &ids, 1, nb * BLOCK, nkv, hd)?.squeeze(0)?;
                let values = gather(&self.v_cache, &ids, 1, nb * BLOCK, nkv, hd)?.squeeze(0)?;
                // [n, heads, hd] -> [kv heads, group * n, hd]
                let qs = q
                    .narrow(0, offsets[i], n)?
                    .reshape((n, nkv, group, hd))?
                    .permute((1, 2, 0, 3))?
                    .contiguous()?
                    .reshape((nkv, group * n, hd))?;
                let scores =
                    softcap((qs.matmul(&keys.transpose(1, 2)?.contiguous()?)? * scale)?, cfg.arch.attn_softcap)?
                        .reshape((nkv, group, n, nb * BLOCK))?
                        .broadcast_add(mask)?;
                let p = candle_nn::ops::softmax_last_dim(&scores)?.reshape((nkv, group * n, nb * BLOCK))?;
                let o = p.matmul(&values)?.reshape((nkv, group, n, hd))?.permute((2, 0, 1, 3))?;
                outs.push(o.contiguous()?.reshape((n, q_dim))?);
            }
            let attn = if outs.len() == 1 { outs.pop().expect("one") } else { Tensor::cat(&outs, 0)? };
            let attn = if in_order { attn } else { attn.index_select(&order, 0)? };
            let mut proj = layer.o.forward(&attn)?;
            if let Some(w) = &layer.post_attn_norm {
                proj = candle_nn::ops::rms_norm(&proj, w, eps)?;
            }
            if let Some(r) = cfg.arch.residual_scale {
                proj = (proj * r as f64)?;
            }
            x = (x + proj)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, eps)?;
            let gu = layer.gate_up.forward(&h)?;
            let (gate, up) = (gu.narrow(1, 0, cfg.ffn)?, gu.narrow(1, cfg.ffn, cfg.ffn)?);
            let act = match cfg.arch.activation {
                Activation::Silu => gate.silu()?,
                Activation::GeluTanh => gate.gelu()?,
            };
            let mut down = layer.down.forward(&(act * up)?)?;
            if let Some(w) = &layer.post_ffn_norm {
                down = candle_nn::ops::rms_norm(&down, w, eps)?;
            }
            if let Some(r) = cfg.arch.residual_scale {
                down = (down * r as f64)?;
            }
            x = (x + down)?;
        }
        for (b, &s) in batch.iter_mut().zip(&starts) {
            b.kv.advance(s + b.tokens.len());
        }
        let rows: Vec<u32> = batch
            .iter()
            .zip(&offsets)
            .filter(|(b, _)| b.want_logits)
            .map(|(b, &o)| (o + b.tokens.len() - 1) as u32)
            .collect();
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let n = rows.len();
        let last = x.index_select(&Tensor::from_vec(rows, n, dev)?, 0)?;
        let h = candle_nn::ops::rms_norm(&last, &self.norm, eps)?;
        let logits = match (&self.lm_head, &self.embed) {
            (Some(head), _) => head.forward(&h)?,
            (None, Embedding::Quant(q)) => q.forward(&h)?,
            (None, Embedding::Dense(w)) => h.to_dtype(w.dtype())?.matmul(&w.t()?)?,
        };
        let mut logits = softcap(logits.to_dtype(DType::F32)?, cfg.arch.final_softcap)?;
        if let Some(l) = cfg.arch.logit_scale {
            logits = (logits / l as f64)?;
        }
        Ok(logits.flatten_all()?.to_vec1::<f32>()?)
    }
}

/// Gemma 2's soft-capping: `cap * tanh(x / cap)`.
fn softcap(x: Tensor, cap: Option<f32>) -> Result<Tensor> {
    Ok(match cap {
        Some(c) => ((x / c as f64)?.tanh()? * c as f64)?,
        None => x,
    })
}

fn load_error(path: &Path, name: &str, e: candle_core::Error) -> EngineError {
    EngineError::InvalidModel { path: path.to_path_buf(), reason: format!("tensor {name}: {e}") }
}

/// Rotates `[rows, heads, hd]` by each row's cos/sin (`[rows, hd / 2]`).
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, style: RopeStyle) -> Result<Tensor> {
    let (rows, heads, hd) = x.dims3()?;
    let x = x.contiguous()?.unsqueeze(0)?;
    Ok(match style {
        // [1, rows, heads, hd] is the layout rope_thd takes.
        RopeStyle::Half => candle_nn::rotary_emb::rope_thd(&x, cos, sin)?,
        RopeStyle::Interleaved => {
            let t = x.transpose(1, 2)?.contiguous()?;
            candle_nn::rotary_emb::rope_i(&t, cos, sin)?.transpose(1, 2)?
        }
    }
    .reshape((rows, heads, hd))?)
}

/// The rows of `blocks` (`[seqs * blocks_per_seq]` block ids) as `[seqs, kv heads, ctx, hd]`
/// f32, `ctx = blocks_per_seq * BLOCK`.
fn gather(cache: &Tensor, blocks: &Tensor, seqs: usize, ctx: usize, nkv: usize, hd: usize) -> Result<Tensor> {
    let kv_dim = nkv * hd;
    let by_block = cache.reshape((cache.dim(0)? / BLOCK, BLOCK * kv_dim))?;
    Ok(by_block
        .index_select(blocks, 0)?
        .reshape((seqs, ctx, nkv, hd))?
        .transpose(1, 2)?
        .to_dtype(DType::F32)?
        .contiguous()?)
}

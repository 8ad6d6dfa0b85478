//! BERT-family encoder over packed (unpadded) batches.
//!
//! - Paper: "BERT: Pre-training of Deep Bidirectional Transformers for Language Understanding"
//!   (<https://arxiv.org/abs/1810.04805>); weights and config as in Hugging Face
//!   `transformers`' `BertModel`, read with candle-transformers' `bert::Config`.
//!
//! The batch is packed: the tokens of all sequences are rows of one `[T, H]` matrix, so the
//! dense layers (96% of the FLOPs) run as single large matrix products with no padding, and
//! attention runs per sequence. On CPU the element-wise steps use the fused kernels of
//! [`crate::kernels`]; on other devices the same maths runs as plain candle ops.

use crate::kernels;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Device, InplaceOp1, Layout, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{Config, HiddenAct};
use std::sync::Arc;

/// Reads a CPU tensor's contiguous f32 data.
fn cpu_f32<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("ragway kernels need contiguous tensors"),
    }
}

fn to_vec(t: &Tensor) -> candle_core::Result<Arc<[f32]>> {
    Ok(t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?.into())
}

/// Dense layer `y = x W^T (+ b)` with W stored transposed (`[in, out]`) for the matmul.
struct Dense {
    weight_t: Tensor,
    bias: Tensor,
    bias_cpu: Arc<[f32]>,
}

impl Dense {
    fn load(vb: VarBuilder, in_dim: usize, out_dim: usize) -> candle_core::Result<Self> {
        let w = vb.get((out_dim, in_dim), "weight")?;
        let bias = vb.get(out_dim, "bias")?;
        Ok(Self { weight_t: w.t()?.contiguous()?, bias_cpu: to_vec(&bias)?, bias })
    }

    /// Concatenates several layers sharing an input (Q, K, V) into one.
    fn fused(parts: Vec<Dense>) -> candle_core::Result<Self> {
        let ws: Vec<&Tensor> = parts.iter().map(|p| &p.weight_t).collect();
        let bs: Vec<&Tensor> = parts.iter().map(|p| &p.bias).collect();
        let bias = Tensor::cat(&bs, 0)?;
        Ok(Self { weight_t: Tensor::cat(&ws, 1)?.contiguous()?, bias_cpu: to_vec(&bias)?, bias })
    }

    /// `x W^T` without the bias (fused into the next kernel). On CPU, `threads` says
    /// whether the product itself is split across the rayon pool (`Parallelism::Rayon`) or
    /// runs on the calling thread because whole batches already run in parallel.
    fn matmul(&self, x: &Tensor, threads: Threads) -> candle_core::Result<Tensor> {
        if !(x.device().is_cpu() && x.dtype() == DType::F32 && x.is_contiguous()) {
            return x.matmul(&self.weight_t);
        }
        let (storage, layout) = self.weight_t.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else { return x.matmul(&self.weight_t) };
        let (k, n) = self.weight_t.dims2()?;
        let op = MatmulOp { weight: cpu_f32(cpu, layout)?, k, n, threads };
        x.apply_op1_no_bwd(&op)
    }
}

/// How a forward pass uses the CPU's threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threads {
    /// Split each matrix product across the rayon pool (one batch at a time).
    IntraOp,
    /// Run each product on the calling thread (batches run in parallel).
    Single,
}

/// `[M, K] x [K, N]` with gemm directly, so that the caller chooses the parallelism.
struct MatmulOp<'a> {
    weight: &'a [f32],
    k: usize,
    n: usize,
    threads: Threads,
}

impl CustomOp1 for MatmulOp<'_> {
    fn name(&self) -> &'static str {
        "ragway-matmul"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s, l)?;
        let (m, k) = l.shape().dims2()?;
        if k != self.k || self.weight.len() != k * self.n {
            candle_core::bail!("matmul shapes [{m}, {k}] x [{}, {}] do not fit", self.k, self.n);
        }
        let n = self.n;
        let mut dst = vec![0f32; m * n];
        let parallel = match self.threads {
            Threads::IntraOp => kernels::Parallel::Pool,
            Threads::Single => kernels::Parallel::Single,
        };
        // SAFETY: row-major [m, k], [k, n] and [m, n] buffers of exactly those sizes.
        unsafe {
            kernels::gemm_f32(
                m,
                n,
                k,
                dst.as_mut_ptr(),
                n,
                (x.as_ptr(), k as isize, 1),
                (self.weight.as_ptr(), n as isize, 1),
                parallel,
            );
        }
        Ok((CpuStorage::F32(dst), Shape::from((m, n))))
    }
}

struct Norm {
    gamma: Tensor,
    beta: Tensor,
    gamma_cpu: Arc<[f32]>,
    beta_cpu: Arc<[f32]>,
    eps: f64,
}

impl Norm {
    fn load(vb: VarBuilder, dim: usize, eps: f64) -> candle_core::Result<Self> {
        // Older checkpoints name the parameters gamma/beta.
        let gamma = vb.get(dim, "weight").or_else(|_| vb.get(dim, "gamma"))?;
        let beta = vb.get(dim, "bias").or_else(|_| vb.get(dim, "beta"))?;
        Ok(Self { gamma_cpu: to_vec(&gamma)?, beta_cpu: to_vec(&beta)?, gamma, beta, eps })
    }

    /// `LayerNorm(x + bias + residual)`.
    fn forward(&self, x: &Tensor, bias: Option<&Dense>, residual: Option<&Tensor>) -> candle_core::Result<Tensor> {
        if x.device().is_cpu() && x.dtype() == DType::F32 {
            let op = AddNormOp { norm: self, bias: bias.map(|b| b.bias_cpu.clone()) };
            return match residual {
                Some(r) => x.apply_op2_no_bwd(r, &op),
                None => x.apply_op1_no_bwd(&op),
            };
        }
        let mut h = x.clone();
        if let Some(b) = bias {
            h = h.broadcast_add(&b.bias)?;
        }
        if let Some(r) = residual {
            h = (h + r)?;
        }
        candle_nn::ops::layer_norm(&h.contiguous()?, &self.gamma, &self.beta, self.eps as f32)
    }
}

struct AddNormOp<'a> {
    norm: &'a Norm,
    bias: Option<Arc<[f32]>>,
}

impl AddNormOp<'_> {
    fn run(&self, x: &[f32], residual: Option<&[f32]>, shape: &Shape) -> (CpuStorage, Shape) {
        let out = kernels::add_layer_norm(
            x,
            self.bias.as_deref(),
            residual,
            &self.norm.gamma_cpu,
            &self.norm.beta_cpu,
            self.norm.eps as f32,
        );
        (CpuStorage::F32(out), shape.clone())
    }
}

impl CustomOp1 for AddNormOp<'_> {
    fn name(&self) -> &'static str {
        "ragway-add-layer-norm"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok(self.run(cpu_f32(s, l)?, None, l.shape()))
    }
}

impl CustomOp2 for AddNormOp<'_> {
    fn name(&self) -> &'static str {
        "ragway-add-layer-norm"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("residual shape {:?} differs from {:?}", l2.shape(), l1.shape());
        }
        Ok(self.run(cpu_f32(s1, l1)?, Some(cpu_f32(s2, l2)?), l1.shape()))
    }
}

struct BiasGeluOp(Arc<[f32]>);

impl InplaceOp1 for BiasGeluOp {
    fn name(&self) -> &'static str {
        "ragway-bias-gelu"
    }
    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("bias-gelu needs a contiguous tensor") };
        match s {
            CpuStorage::F32(data) => kernels::bias_gelu_inplace(&mut data[a..b], &self.0),
            _ => candle_core::bail!("bias-gelu needs f32"),
        }
        Ok(())
    }
}

/// Packed attention: `[T, 3H]` QKV (without bias) to `[T, H]` context. The QKV buffer is
/// the fresh output of the QKV matmul and is biased in place.
struct AttentionOp<'a> {
    bias: &'a [f32],
    seq_lens: &'a [usize],
    heads: usize,
    head_dim: usize,
    out: std::cell::RefCell<Option<Vec<f32>>>,
}

impl InplaceOp1 for AttentionOp<'_> {
    fn name(&self) -> &'static str {
        "ragway-packed-attention"
    }
    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("attention needs a contiguous qkv") };
        let CpuStorage::F32(data) = s else { candle_core::bail!("attention needs f32") };
        let scale = 1.0 / (self.head_dim as f32).sqrt();
        let ctx =
            kernels::packed_attention(&mut data[a..b], self.bias, self.seq_lens, self.heads, self.head_dim, scale);
        *self.out.borrow_mut() = Some(ctx);
        Ok(())
    }
}

struct Layer {
    qkv: Dense,
    attn_out: Dense,
    attn_norm: Norm,
    intermediate: Dense,
    output: Dense,
    out_norm: Norm,
}

/// A BERT encoder (embeddings + transformer layers, no pooler).
pub struct BertEncoder {
    word_embeddings: Tensor,
    position_embeddings: Tensor,
    token_type_embeddings: Tensor,
    embed_norm: Norm,
    layers: Vec<Layer>,
    heads: usize,
    head_dim: usize,
    hidden_act: HiddenAct,
    device: Device,
    config: Config,
}

impl BertEncoder {
    /// Loads the weights; accepts both `embeddings.*` and `bert.embeddings.*` (and other
    /// `<model_type>.` prefixes) naming.
    pub fn load(vb: VarBuilder, config: &Config) -> candle_core::Result<Self> {
        let vb = if vb.contains_tensor("embeddings.word_embeddings.weight") {
            vb
        } else if let Some(prefix) = [config.model_type.as_deref().unwrap_or("bert"), "bert", "model"]
            .into_iter()
            .find(|p| vb.contains_tensor(&format!("{p}.embeddings.word_embeddings.weight")))
        {
            vb.pp(prefix)
        } else {
            candle_core::bail!("no `embeddings.word_embeddings.weight` tensor: not a BERT checkpoint")
        };
        let h = config.hidden_size;
        if h % config.num_attention_heads != 0 {
            candle_core::bail!("hidden_size {h} is not a multiple of num_attention_heads");
        }
        let eps = config.layer_norm_eps;
        let emb = vb.pp("embeddings");
        let word_embeddings = emb.get((config.vocab_size, h), "word_embeddings.weight")?;
        let position_embeddings = emb.get((config.max_position_embeddings, h), "position_embeddings.weight")?;
        let token_type_embeddings = emb.get((config.type_vocab_size, h), "token_type_embeddings.weight")?;
        let embed_norm = Norm::load(emb.pp("LayerNorm"), h, eps)?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let l = vb.pp(format!("encoder.layer.{i}"));
            let att = l.pp("attention");
            let qkv = Dense::fused(vec![
                Dense::load(att.pp("self.query"), h, h)?,
                Dense::load(att.pp("self.key"), h, h)?,
                Dense::load(att.pp("self.value"), h, h)?,
            ])?;
            layers.push(Layer {
                qkv,
                attn_out: Dense::load(att.pp("output.dense"), h, h)?,
                attn_norm: Norm::load(att.pp("output.LayerNorm"), h, eps)?,
                intermediate: Dense::load(l.pp("intermediate.dense"), h, config.intermediate_size)?,
                output: Dense::load(l.pp("output.dense"), config.intermediate_size, h)?,
                out_norm: Norm::load(l.pp("output.LayerNorm"), h, eps)?,
            });
        }
        Ok(Self {
            word_embeddings,
            position_embeddings,
            token_type_embeddings,
            embed_norm,
            layers,
            heads: config.num_attention_heads,
            head_dim: h / config.num_attention_heads,
            hidden_act: config.hidden_act,
            device: vb.device().clone(),
            config: config.clone(),
        })
    }

    /// The model configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Runs the encoder on a packed batch: `ids` holds the token ids of all sequences one
    /// after the other, `seq_lens` their lengths. Returns the last hidden states `[T, H]`.
    pub fn forward(&self, ids: &[u32], seq_lens: &[usize], threads: Threads) -> candle_core::Result<Tensor> {
        let total: usize = seq_lens.iter().sum();
        if total != ids.len() {
            candle_core::bail!("seq_lens sum to {total} but {} ids were given", ids.len());
        }
        if let Some(&l) = seq_lens.iter().find(|&&l| l > self.config.max_position_embeddings) {
            candle_core::bail!("sequence of {l} tokens exceeds {} positions", self.config.max_position_embeddings);
        }
        let positions: Vec<u32> = seq_lens.iter().flat_map(|&l| 0..l as u32).collect();
        let ids_t = Tensor::from_slice(ids, ids.len(), &self.device)?;
        let pos_t = Tensor::from_vec(positions, total, &self.device)?;
        let words = self.word_embeddings.embedding(&ids_t)?;
        let pos = self.position_embeddings.embedding(&pos_t)?;
        // Single-sentence inputs: token type 0 everywhere.
        let type0 = self.token_type_embeddings.get(0)?;
        let emb = (words + pos)?.broadcast_add(&type0)?;
        let mut x = self.embed_norm.forward(&emb, None, None)?;
        for layer in &self.layers {
            x = self.layer_forward(layer, &x, seq_lens, threads)?;
        }
        Ok(x)
    }

    fn layer_forward(
        &self,
        l: &Layer,
        x: &Tensor,
        seq_lens: &[usize],
        threads: Threads,
    ) -> candle_core::Result<Tensor> {
        let qkv = l.qkv.matmul(x, threads)?;
        let ctx = self.attention(&qkv, &l.qkv, seq_lens)?;
        let attn = l.attn_out.matmul(&ctx, threads)?;
        let h = l.attn_norm.forward(&attn, Some(&l.attn_out), Some(x))?;
        let inter = l.intermediate.matmul(&h, threads)?;
        let inter = self.activation(inter, &l.intermediate)?;
        let out = l.output.matmul(&inter, threads)?;
        l.out_norm.forward(&out, Some(&l.output), Some(&h))
    }

    fn activation(&self, x: Tensor, dense: &Dense) -> candle_core::Result<Tensor> {
        if x.device().is_cpu() && x.dtype() == DType::F32 && self.hidden_act == HiddenAct::Gelu {
            x.inplace_op1(&BiasGeluOp(dense.bias_cpu.clone()))?;
            return Ok(x);
        }
        let x = x.broadcast_add(&dense.bias)?;
        match self.hidden_act {
            HiddenAct::Gelu => x.gelu_erf(),
            HiddenAct::GeluApproximate => x.gelu(),
            HiddenAct::Relu => x.relu(),
        }
    }

    fn attention(&self, qkv: &Tensor, dense: &Dense, seq_lens: &[usize]) -> candle_core::Result<Tensor> {
        if qkv.device().is_cpu() && qkv.dtype() == DType::F32 {
            let op = AttentionOp {
                bias: &dense.bias_cpu,
                seq_lens,
                heads: self.heads,
                head_dim: self.head_dim,
                out: Default::default(),
            };
            qkv.inplace_op1(&op)?;
            let ctx = op.out.into_inner().expect("attention produced no output");
            let t = qkv.dim(0)?;
            return Tensor::from_vec(ctx, (t, self.heads * self.head_dim), qkv.device());
        }
        attention_generic(&qkv.broadcast_add(&dense.bias)?, seq_lens, self.heads, self.head_dim)
    }

    /// Hidden size.
    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }
}

/// Attention with plain candle ops, one sequence at a time: the GPU path, and the oracle
/// the CPU kernel is tested against. `qkv` is `[T, 3H]` with its bias already added.
fn attention_generic(qkv: &Tensor, seq_lens: &[usize], heads: usize, head_dim: usize) -> candle_core::Result<Tensor> {
    {
        let h = heads * head_dim;
        let scale = 1.0 / (head_dim as f64).sqrt();
        let mut outs = Vec::with_capacity(seq_lens.len());
        let mut start = 0;
        for &len in seq_lens {
            let rows = qkv.narrow(0, start, len)?;
            let split = |i: usize| -> candle_core::Result<Tensor> {
                rows.narrow(1, i * h, h)?.reshape((len, heads, head_dim))?.transpose(0, 1)?.contiguous()
            };
            let (q, k, v) = (split(0)?, split(1)?, split(2)?);
            let scores = (q.matmul(&k.t()?)? * scale)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let ctx = probs.matmul(&v)?.transpose(0, 1)?.reshape((len, h))?;
            outs.push(ctx);
            start += len;
        }
        Tensor::cat(&outs, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_attention_kernel_matches_candle_ops() {
        let (heads, head_dim) = (4, 8);
        let h = heads * head_dim;
        let lens = [5usize, 1, 17, 9];
        let t: usize = lens.iter().sum();
        let qkv = Tensor::randn(0f32, 1.0, (t, 3 * h), &Device::Cpu).unwrap();
        let bias = Tensor::randn(0f32, 0.5, 3 * h, &Device::Cpu).unwrap();
        let want = attention_generic(&qkv.broadcast_add(&bias).unwrap(), &lens, heads, head_dim).unwrap();
        let mut data = qkv.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = bias.to_vec1::<f32>().unwrap();
        let scale = 1.0 / (head_dim as f32).sqrt();
        let got = kernels::packed_attention(&mut data, &b, &lens, heads, head_dim, scale);
        let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(diff < 1e-5, "max abs diff {diff}");
    }
}

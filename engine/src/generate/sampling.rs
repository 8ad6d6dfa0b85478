//! Token selection: logit bias, repetition / presence / frequency penalties, temperature,
//! top-k, top-p, min-p and a seeded random draw; log-probabilities with top alternatives.
//!
//! Order (as in vLLM): bias and penalties change the logits; temperature scales them;
//! top-k, top-p and min-p cut the candidates; the draw picks one. Temperature 0 is greedy.
//! Log-probabilities are those of the model's own distribution (before bias, penalties and
//! temperature).

use crate::rng::SplitMix64;
use crate::error::{EngineError, Result};
use std::collections::HashMap;

/// How to pick tokens for one request.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 = off).
    pub top_p: f32,
    /// Keep the `top_k` most likely tokens (0 = off).
    pub top_k: usize,
    /// Drop tokens less likely than `min_p` × the most likely one (0 = off).
    pub min_p: f32,
    /// Hugging Face style: logits of tokens already in the prompt or output are divided
    /// (positive) or multiplied (negative) by this (1 = off).
    pub repetition_penalty: f32,
    /// OpenAI style, over the output so far: `- presence * [count > 0] - frequency * count`.
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Added to the logits of the given tokens (OpenAI's `logit_bias`, -100..100).
    pub logit_bias: Vec<(u32, f32)>,
    /// Same seed, same input: same output. `None`: a random seed.
    pub seed: Option<u64>,
    /// Return the chosen token's log-probability and this many alternatives (`Some(0)`: only
    /// the chosen one).
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: None,
            logprobs: None,
        }
    }
}

/// Sampling values a model's authors recommend: the GGUF `general.sampling.*` keys
/// (llama.cpp's) or the `generation_config.json` beside safetensors weights. A request's own
/// fields win; what neither sets comes from [`SamplingParams::server_default`].
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct ModelSampling {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_p: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repetition_penalty: Option<f32>,
}

impl ModelSampling {
    /// From GGUF metadata (`general.sampling.temp`, `top_p`, `top_k`, `min_p`,
    /// `penalty_repeat`).
    pub fn from_gguf(content: &candle_core::quantized::gguf_file::Content) -> Self {
        let f = |k: &str| content.metadata.get(&format!("general.sampling.{k}")).and_then(|v| v.to_f32().ok().or_else(|| v.to_f64().ok().map(|x| x as f32)));
        let u = |k: &str| {
            let v = content.metadata.get(&format!("general.sampling.{k}"))?;
            v.to_u32().ok().map(|x| x as usize).or_else(|| v.to_i32().ok().map(|x| x.max(0) as usize))
        };
        Self {
            temperature: f("temp"),
            top_p: f("top_p"),
            top_k: u("top_k"),
            min_p: f("min_p"),
            repetition_penalty: f("penalty_repeat"),
        }
        .sane()
    }

    /// From a Hugging Face `generation_config.json`; `do_sample: false` means greedy.
    pub fn from_generation_config(v: &serde_json::Value) -> Self {
        let f = |k: &str| v.get(k).and_then(serde_json::Value::as_f64).map(|x| x as f32);
        let greedy = v.get("do_sample").and_then(serde_json::Value::as_bool) == Some(false);
        Self {
            temperature: if greedy { Some(0.0) } else { f("temperature") },
            top_p: f("top_p"),
            top_k: v.get("top_k").and_then(serde_json::Value::as_u64).map(|k| k as usize),
            min_p: f("min_p"),
            repetition_penalty: f("repetition_penalty"),
        }
        .sane()
    }

    /// Drops values a request could not set either (a model file is input too).
    fn sane(mut self) -> Self {
        let keep = |v: &mut Option<f32>, ok: &dyn Fn(f32) -> bool, name: &str| {
            if let Some(x) = *v {
                if !ok(x) {
                    tracing::warn!(value = x, "the model's recommended {name} is out of range; ignored");
                    *v = None;
                }
            }
        };
        keep(&mut self.temperature, &|t| (0.0..=2.0).contains(&t), "temperature");
        keep(&mut self.top_p, &|p| p > 0.0 && p <= 1.0, "top_p");
        keep(&mut self.min_p, &|p| (0.0..=1.0).contains(&p), "min_p");
        keep(&mut self.repetition_penalty, &|p| p > 0.0 && p <= 10.0, "repetition_penalty");
        self
    }

    /// ragway's defaults with the model's values over them.
    pub fn resolve(&self) -> SamplingParams {
        let base = SamplingParams::server_default();
        SamplingParams {
            temperature: self.temperature.unwrap_or(base.temperature),
            top_p: self.top_p.unwrap_or(base.top_p),
            top_k: self.top_k.unwrap_or(base.top_k),
            min_p: self.min_p.unwrap_or(base.min_p),
            repetition_penalty: self.repetition_penalty.unwrap_or(base.repetition_penalty),
            ..base
        }
    }
}

/// Most alternatives a caller may ask for (OpenAI allows 20).
pub const MAX_TOP_LOGPROBS: usize = 20;

impl SamplingParams {
    pub fn greedy() -> Self {
        Self { temperature: 0.0, ..Self::default() }
    }

    /// What a request that sets no sampling field gets when the model recommends nothing
    /// (llama.cpp server's defaults): temperature 0.8, top-k 40, top-p 0.95, min-p 0.05. The
    /// truncation keeps small models on topic, where OpenAI's temperature 1.0 over the whole
    /// vocabulary drifts into noise.
    pub fn server_default() -> Self {
        Self { temperature: 0.8, top_k: 40, top_p: 0.95, min_p: 0.05, ..Self::default() }
    }

    /// Rejects values outside their ranges, naming the parameter.
    pub fn validate(&self, vocab: usize) -> Result<()> {
        let bad =
            |param: &str, message: String| Err(EngineError::InvalidRequest { param: Some(param.into()), message });
        if !(0.0..=2.0).contains(&self.temperature) || self.temperature.is_nan() {
            return bad("temperature", format!("temperature must be between 0 and 2, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty <= 10.0) {
            return bad(
                "repetition_penalty",
                format!("repetition_penalty must be in (0, 10], got {}", self.repetition_penalty),
            );
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return bad(
                "presence_penalty",
                format!("presence_penalty must be between -2 and 2, got {}", self.presence_penalty),
            );
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return bad(
                "frequency_penalty",
                format!("frequency_penalty must be between -2 and 2, got {}", self.frequency_penalty),
            );
        }
        for &(id, b) in &self.logit_bias {
            if id as usize >= vocab {
                return bad("logit_bias", format!("logit_bias token {id} is outside the vocabulary of {vocab} tokens"));
            }
            if !(-100.0..=100.0).contains(&b) {
                return bad(
                    "logit_bias",
                    format!("logit_bias values must be between -100 and 100, got {b} for token {id}"),
                );
            }
        }
        if self.logprobs.is_some_and(|k| k > MAX_TOP_LOGPROBS) {
            return bad("top_logprobs", format!("at most {MAX_TOP_LOGPROBS} alternatives per token"));
        }
        Ok(())
    }
}

/// Log-probability of a chosen token and its best alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
    /// `(id, logprob)`, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// Per-sequence sampling state: RNG and output token counts.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: SplitMix64,
    counts: HashMap<u32, u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams, seed: u64) -> Self {
        Self { params, rng: SplitMix64::new(seed), counts: HashMap::new() }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from `logits` (modified in place). `context` is the prompt and
    /// output so far (for the repetition penalty).
    pub fn sample(&mut self, logits: &mut [f32], context: &[u32]) -> (u32, Option<TokenLogprob>) {
        // Log-probabilities come from the model's own distribution: keep the raw logits.
        let raw = self.params.logprobs.map(|_| logits.to_vec());
        let p = &self.params;
        for &(id, b) in &p.logit_bias {
            logits[id as usize] += b;
        }
        if p.repetition_penalty != 1.0 {
            let mut seen = std::collections::HashSet::with_capacity(context.len());
            for &t in context {
                if seen.insert(t) {
                    if let Some(l) = logits.get_mut(t as usize) {
                        *l = if *l > 0.0 { *l / p.repetition_penalty } else { *l * p.repetition_penalty };
                    }
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &c) in &self.counts {
                logits[t as usize] -= p.presence_penalty + p.frequency_penalty * c as f32;
            }
        }
        let id = if p.temperature == 0.0 { argmax(logits) } else { self.draw(logits) };
        *self.counts.entry(id).or_insert(0) += 1;
        let lp = raw.map(|raw| {
            let lse = log_sum_exp(&raw);
            let k = self.params.logprobs.unwrap_or(0);
            let top = top_k_indices(&raw, k).into_iter().map(|i| (i as u32, raw[i] - lse)).collect();
            TokenLogprob { id, logprob: raw[id as usize] - lse, top }
        });
        (id, lp)
    }

    fn draw(&mut self, logits: &mut [f32]) -> u32 {
        let p = &self.params;
        let inv_t = 1.0 / p.temperature;
        // Candidates: top-k first (selection, not a full sort), else all.
        let mut cand: Vec<u32> = if p.top_k > 0 && p.top_k < logits.len() {
            top_k_indices(logits, p.top_k).into_iter().map(|i| i as u32).collect()
        } else {
            (0..logits.len() as u32).collect()
        };
        let max = cand.iter().map(|&i| logits[i as usize]).fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<f32> = cand.iter().map(|&i| ((logits[i as usize] - max) * inv_t).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= sum);
        if p.min_p > 0.0 {
            let pmax = probs.iter().copied().fold(0.0, f32::max);
            let keep = p.min_p * pmax;
            let (c2, p2): (Vec<u32>, Vec<f32>) =
                cand.iter().zip(&probs).filter(|(_, &q)| q >= keep).map(|(&c, &q)| (c, q)).unzip();
            cand = c2;
            probs = p2;
        }
        if p.top_p < 1.0 {
            let keep = nucleus(&cand, &probs, p.top_p);
            cand = keep.iter().map(|&i| cand[i]).collect();
            probs = keep.iter().map(|&i| probs[i]).collect();
        }
        let total: f32 = probs.iter().sum();
        let mut u = self.rng.next_f32() * total;
        for (&c, &q) in cand.iter().zip(&probs) {
            if u < q {
                return c;
            }
            u -= q;
        }
        *cand.last().expect("at least one candidate")
    }
}

/// Positions (into `cand`/`probs`) of the top-p nucleus: the most likely candidates, most
/// likely first (ties: lower token id first), up to the first whose cumulative probability
/// reaches `top_p` of the total. The 256 most likely are selected first (linear time) and
/// only they are sorted when they already hold that mass, which is the common case; a full
/// sort of the vocabulary otherwise.
fn nucleus(cand: &[u32], probs: &[f32], top_p: f32) -> Vec<usize> {
    let total: f32 = probs.iter().sum();
    let target = top_p * total;
    let cmp = |a: &usize, b: &usize| probs[*b].total_cmp(&probs[*a]).then(cand[*a].cmp(&cand[*b]));
    let mut order: Vec<usize> = (0..cand.len()).collect();
    const FIRST: usize = 256;
    if order.len() > FIRST {
        order.select_nth_unstable_by(FIRST, cmp);
        let head: f32 = order[..FIRST].iter().map(|&i| probs[i]).sum();
        if head >= target {
            order.truncate(FIRST);
        }
    }
    order.sort_unstable_by(cmp);
    let mut acc = 0.0;
    let mut keep = Vec::new();
    for i in order {
        keep.push(i);
        acc += probs[i];
        if acc >= target {
            break;
        }
    }
    keep
}

pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in xs.iter().enumerate() {
        if v > xs[best] {
            best = i;
        }
    }
    best as u32
}

fn log_sum_exp(xs: &[f32]) -> f32 {
    let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let s: f64 = xs.iter().map(|&v| ((v - max) as f64).exp()).sum();
    max + s.ln() as f32
}

/// Indices of the `k` largest values, largest first (ties: lower index first).
pub fn top_k_indices(xs: &[f32], k: usize) -> Vec<usize> {
    let k = k.min(xs.len());
    let mut idx: Vec<usize> = (0..xs.len()).collect();
    let cmp = |a: &usize, b: &usize| xs[*b].total_cmp(&xs[*a]).then(a.cmp(b));
    if k < idx.len() {
        idx.select_nth_unstable_by(k, cmp);
        idx.truncate(k);
    }
    idx.sort_unstable_by(cmp);
    idx
}

/// A seed for requests that give none.
pub fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_recommendations_fill_unset_fields_over_server_defaults() {
        use candle_core::quantized::gguf_file::{Content, Value, VersionedMagic};
        let mut metadata = std::collections::HashMap::new();
        metadata.insert("general.sampling.temp".to_string(), Value::F32(0.6));
        metadata.insert("general.sampling.top_k".to_string(), Value::U32(20));
        metadata.insert("general.sampling.min_p".to_string(), Value::F64(0.0));
        // Out of range: ignored, the server default stays.
        metadata.insert("general.sampling.top_p".to_string(), Value::F32(1.5));
        let content = Content {
            magic: VersionedMagic::GgufV3,
            metadata,
            tensor_infos: Default::default(),
            tensor_data_offset: 0,
        };
        let m = ModelSampling::from_gguf(&content);
        assert_eq!(m, ModelSampling { temperature: Some(0.6), top_k: Some(20), min_p: Some(0.0), ..Default::default() });
        let r = m.resolve();
        let d = SamplingParams::server_default();
        assert_eq!((r.temperature, r.top_k, r.min_p, r.top_p), (0.6, 20, 0.0, d.top_p));
        assert_eq!(serde_json::to_value(m).unwrap(), serde_json::json!({"temperature": 0.6f32, "top_k": 20, "min_p": 0.0}));

        let hf = serde_json::json!({"do_sample": true, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05});
        let m = ModelSampling::from_generation_config(&hf);
        assert_eq!(m.resolve().repetition_penalty, 1.05);
        assert_eq!((m.temperature, m.top_p, m.top_k), (Some(0.7), Some(0.8), Some(20)));
        let greedy = ModelSampling::from_generation_config(&serde_json::json!({"do_sample": false, "temperature": 0.9}));
        assert_eq!(greedy.resolve().temperature, 0.0);
        assert_eq!(ModelSampling::default().resolve().temperature, d.temperature);
        assert!(d.validate(10).is_ok());
    }

    fn full_sort_nucleus(cand: &[u32], probs: &[f32], top_p: f32) -> Vec<usize> {
        let total: f32 = probs.iter().sum();
        let mut order: Vec<usize> = (0..cand.len()).collect();
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(cand[a].cmp(&cand[b])));
        let mut acc = 0.0;
        let mut keep = Vec::new();
        for i in order {
            keep.push(i);
            acc += probs[i];
            if acc >= top_p * total {
                break;
            }
        }
        keep
    }

    #[test]
    fn nucleus_shortcut_equals_full_sort() {
        let mut rng = SplitMix64::new(3);
        for case in 0..40 {
            let n = 2000;
            // Peaked and flat distributions: the shortcut applies to the first, not the second.
            let sharp = 1.0 + (case % 4) as f32 * 4.0;
            let logits: Vec<f32> = (0..n).map(|_| rng.next_f32() * sharp).collect();
            let max = logits.iter().copied().fold(f32::MIN, f32::max);
            let probs: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
            let cand: Vec<u32> = (0..n as u32).collect();
            for top_p in [0.1, 0.5, 0.9, 0.99] {
                assert_eq!(
                    nucleus(&cand, &probs, top_p),
                    full_sort_nucleus(&cand, &probs, top_p),
                    "case {case} p {top_p}"
                );
            }
        }
    }

    #[test]
    fn greedy_seeded_and_penalties() {
        let logits = vec![1.0, 3.0, 2.0, 0.5];
        let mut s = Sampler::new(SamplingParams::greedy(), 1);
        assert_eq!(s.sample(&mut logits.clone(), &[]).0, 1);
        // A bias moves the choice; a repetition penalty on token 1 (in the context) too.
        let mut s = Sampler::new(SamplingParams { logit_bias: vec![(3, 5.0)], ..SamplingParams::greedy() }, 1);
        assert_eq!(s.sample(&mut logits.clone(), &[]).0, 3);
        let mut s = Sampler::new(SamplingParams { repetition_penalty: 2.0, ..SamplingParams::greedy() }, 1);
        assert_eq!(s.sample(&mut logits.clone(), &[1]).0, 2);
        // Same seed, same draws.
        let params = SamplingParams { temperature: 1.0, top_p: 0.9, ..SamplingParams::default() };
        let draws = |seed| {
            let mut s = Sampler::new(params.clone(), seed);
            (0..50).map(|_| s.sample(&mut logits.clone(), &[]).0).collect::<Vec<_>>()
        };
        assert_eq!(draws(7), draws(7));
        assert_ne!(draws(7), draws(8));
        // top_k = 1 is greedy whatever the temperature.
        let mut s = Sampler::new(SamplingParams { temperature: 1.5, top_k: 1, ..SamplingParams::default() }, 9);
        assert!((0..20).all(|_| s.sample(&mut logits.clone(), &[]).0 == 1));
    }
}

//! Architectures without real weights here — Qwen 2 (QKV bias), Qwen 3 (per-head Q/K norms,
//! head size apart from the width), Phi-3 (fused QKV and gate/up) and Mistral (sliding window)
//! — as tiny random-weight models that the tests write in safetensors (f32), checked against
//! candle-transformers' own implementation of each family on the same files (logits within
//! 1e-3 relative on prefill and decode steps); then the same weights written as GGUF under
//! llama.cpp's tensor names, which must load to the same logits. Each check runs on both
//! decoders: the native CPU one and the paged one (the CUDA path's code, on the CPU device).
//! Gemma 3 (`gemma3_text`) safetensors: GeGLU, embedding scaling, the four norms stored as
//! offsets from 1, per-head Q/K norms, query pre-attention scaling, alternating sliding and
//! global layers with their own RoPE bases.
//! Granite: llama with four multipliers, against candle-transformers' `granite` (which
//! leaves them out) on the weights they rewrite to.

use super::common::models_dir;
use super::generation::{prefill_logits, pseudo_random, smollm};
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use ragway_engine::generate::sampling::argmax;
use ragway_engine::generate::{DeviceLlama, GenerativeModel, KvCache, KvSizing, PagedSeq, Scratch, SeqBatch};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const HIDDEN: usize = 64;
const INTER: usize = 96;
const LAYERS: usize = 2;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;

struct Tiny {
    dir: PathBuf,
    config: Value,
    tensors: HashMap<String, Tensor>,
}

/// A random model of `model_type` in a fresh folder: config.json, model.safetensors and
/// SmolLM2's tokenizer.json.
fn tiny(model_type: &str, head_dim: usize, extra: Value) -> Tiny {
    // Tests of one family run in parallel: each model gets its own folder.
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("ragway-tiny-{model_type}-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let vocab = smollm().tokenizer.vocab_size();
    let mut config = json!({
        "model_type": model_type, "hidden_size": HIDDEN, "intermediate_size": INTER, "vocab_size": vocab,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "head_dim": head_dim, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 256,
        "tie_word_embeddings": false, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
        "sliding_window": null, "max_window_layers": LAYERS, "use_sliding_window": false, "attention_bias": false,
    });
    for (k, v) in extra.as_object().unwrap() {
        config[k] = v.clone();
    }
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    smollm().tokenizer.hf().unwrap().save(dir.join("tokenizer.json"), false).unwrap();
    let mut tensors = HashMap::new();
    let mut seed = 100;
    let mut put = |name: String, shape: &[usize], scale: f32, plus_one: bool| {
        seed += 1;
        let mut t = pseudo_random(shape, scale, seed);
        if plus_one {
            t = (t + 1.0).unwrap();
        }
        tensors.insert(name, t);
    };
    // Gemma's norms are stored as offsets from 1 and its output is the tied embedding.
    let gemma = model_type.starts_with("gemma");
    put("model.embed_tokens.weight".into(), &[vocab, HIDDEN], if gemma { 0.2 } else { 1.0 }, false);
    if !gemma {
        put("lm_head.weight".into(), &[vocab, HIDDEN], 0.2, false);
    }
    put("model.norm.weight".into(), &[HIDDEN], 0.2, !gemma);
    let (q, kv) = (HEADS * head_dim, KV_HEADS * head_dim);
    for i in 0..LAYERS {
        let p = format!("model.layers.{i}");
        if model_type == "phi3" {
            put(format!("{p}.self_attn.qkv_proj.weight"), &[q + 2 * kv, HIDDEN], 0.15, false);
            put(format!("{p}.mlp.gate_up_proj.weight"), &[2 * INTER, HIDDEN], 0.15, false);
        } else {
            put(format!("{p}.self_attn.q_proj.weight"), &[q, HIDDEN], 0.15, false);
            put(format!("{p}.self_attn.k_proj.weight"), &[kv, HIDDEN], 0.15, false);
            put(format!("{p}.self_attn.v_proj.weight"), &[kv, HIDDEN], 0.15, false);
            put(format!("{p}.mlp.gate_proj.weight"), &[INTER, HIDDEN], 0.15, false);
            put(format!("{p}.mlp.up_proj.weight"), &[INTER, HIDDEN], 0.15, false);
        }
        if model_type == "qwen2" {
            put(format!("{p}.self_attn.q_proj.bias"), &[q], 0.3, false);
            put(format!("{p}.self_attn.k_proj.bias"), &[kv], 0.3, false);
            put(format!("{p}.self_attn.v_proj.bias"), &[kv], 0.3, false);
        }
        if model_type == "qwen3" || model_type == "gemma3_text" {
            put(format!("{p}.self_attn.q_norm.weight"), &[head_dim], 0.2, !gemma);
            put(format!("{p}.self_attn.k_norm.weight"), &[head_dim], 0.2, !gemma);
        }
        put(format!("{p}.self_attn.o_proj.weight"), &[HIDDEN, q], 0.15, false);
        put(format!("{p}.mlp.down_proj.weight"), &[HIDDEN, INTER], 0.15, false);
        put(format!("{p}.input_layernorm.weight"), &[HIDDEN], 0.2, !gemma);
        put(format!("{p}.post_attention_layernorm.weight"), &[HIDDEN], 0.2, !gemma);
        if gemma {
            put(format!("{p}.pre_feedforward_layernorm.weight"), &[HIDDEN], 0.2, false);
            put(format!("{p}.post_feedforward_layernorm.weight"), &[HIDDEN], 0.2, false);
        }
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    Tiny { dir, config, tensors }
}

impl Drop for Tiny {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The same weights as a GGUF file of architecture `arch` under llama.cpp's tensor names
/// (F32; no Q/K permutation, as these architectures rotate halves — except Granite's, which
/// llama.cpp's converter permutes as llama's), with SmolLM2's tokenizer.
fn write_gguf(t: &Tiny, arch: &str, path: &Path) {
    let real = models_dir().join("SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    let content = gguf_file::Content::read(&mut std::fs::File::open(real).unwrap()).unwrap();
    let c = &t.config;
    let u = |k: &str| gguf_file::Value::U32(c[k].as_u64().unwrap() as u32);
    let mut md: Vec<(String, gguf_file::Value)> = vec![
        ("general.architecture".into(), gguf_file::Value::String(arch.into())),
        (format!("{arch}.block_count"), u("num_hidden_layers")),
        (format!("{arch}.context_length"), u("max_position_embeddings")),
        (format!("{arch}.embedding_length"), u("hidden_size")),
        (format!("{arch}.feed_forward_length"), u("intermediate_size")),
        (format!("{arch}.attention.head_count"), u("num_attention_heads")),
        (format!("{arch}.attention.head_count_kv"), u("num_key_value_heads")),
        (format!("{arch}.attention.key_length"), u("head_dim")),
        (format!("{arch}.attention.value_length"), u("head_dim")),
        (format!("{arch}.rope.freq_base"), gguf_file::Value::F32(c["rope_theta"].as_f64().unwrap() as f32)),
        (format!("{arch}.attention.layer_norm_rms_epsilon"), gguf_file::Value::F32(1e-6)),
    ];
    for (k, v) in &content.metadata {
        if k.starts_with("tokenizer.ggml.") {
            md.push((k.clone(), v.clone()));
        }
    }
    let gemma = arch.starts_with("gemma");
    if gemma {
        for key in ["attn_logit_softcapping", "final_logit_softcapping"] {
            if let Some(v) = c[key].as_f64() {
                md.push((format!("{arch}.{key}"), gguf_file::Value::F32(v as f32)));
            }
        }
        md.push((format!("{arch}.attention.sliding_window"), u("sliding_window")));
    }
    if arch == "granite" {
        for (key, from) in [
            ("embedding_scale", "embedding_multiplier"),
            ("residual_scale", "residual_multiplier"),
            ("attention.scale", "attention_multiplier"),
            ("logit_scale", "logits_scaling"),
        ] {
            md.push((format!("{arch}.{key}"), gguf_file::Value::F32(c[from].as_f64().unwrap() as f32)));
        }
    }
    // llama.cpp's converter: Q and K rows reordered so that rotating adjacent pairs equals
    // transformers' rotation of halves.
    let permute = |w: &Tensor, heads: usize| -> Tensor {
        let (rows, cols) = w.dims2().unwrap();
        w.reshape((heads, 2, rows / heads / 2, cols)).unwrap().transpose(1, 2).unwrap().reshape((rows, cols)).unwrap()
    };
    // Gemma's GGUF norms are the 1 + w that transformers computes.
    let norm_names = [
        ("input_layernorm", "attn_norm"),
        ("post_attention_layernorm", "post_attention_norm"),
        ("pre_feedforward_layernorm", "ffn_norm"),
        ("post_feedforward_layernorm", "post_ffw_norm"),
    ];
    let rename = |name: &str| -> String {
        let name = if gemma {
            norm_names.iter().fold(name.to_string(), |n, (from, to)| n.replace(from, to))
        } else {
            name.to_string()
        };
        let name = name.replace("model.embed_tokens.weight", "token_embd.weight");
        let name = name.replace("model.norm.weight", "output_norm.weight").replace("lm_head.weight", "output.weight");
        let name = name.replace("model.layers.", "blk.");
        [
            ("input_layernorm", "attn_norm"),
            ("post_attention_layernorm", "ffn_norm"),
            ("self_attn.qkv_proj", "attn_qkv"),
            ("self_attn.q_proj", "attn_q"),
            ("self_attn.k_proj", "attn_k"),
            ("self_attn.v_proj", "attn_v"),
            ("self_attn.o_proj", "attn_output"),
            ("self_attn.q_norm", "attn_q_norm"),
            ("self_attn.k_norm", "attn_k_norm"),
            ("mlp.gate_up_proj", "ffn_up"),
            ("mlp.gate_proj", "ffn_gate"),
            ("mlp.up_proj", "ffn_up"),
            ("mlp.down_proj", "ffn_down"),
        ]
        .iter()
        .fold(name, |n, (from, to)| n.replace(from, to))
    };
    let qs: Vec<(String, QTensor)> = t
        .tensors
        .iter()
        .map(|(n, w)| {
            let w = if gemma && n.ends_with("norm.weight") { (w + 1.0).unwrap() } else { w.clone() };
            let w = match arch {
                "granite" if n.ends_with("q_proj.weight") => permute(&w, HEADS),
                "granite" if n.ends_with("k_proj.weight") => permute(&w, KV_HEADS),
                _ => w,
            };
            (rename(n), QTensor::quantize(&w, GgmlDType::F32).unwrap())
        })
        .collect();
    let mdr: Vec<(&str, &gguf_file::Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = qs.iter().map(|(n, q)| (n.as_str(), q)).collect();
    gguf_file::write(&mut std::fs::File::create(path).unwrap(), &mdr, &ts).unwrap();
}

fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    diff / b.iter().map(|v| v.abs()).fold(0f32, f32::max).max(1.0)
}

/// The paged decoder (the CUDA path's code) on the CPU, from the same folder or file.
fn paged(path: &Path, models: &Path) -> GenerativeModel<DeviceLlama> {
    let sizing = KvSizing { budget_tokens: 1024, max_running: 2, max_batch_tokens: 64 };
    GenerativeModel::load_on_device(path.to_str().unwrap(), models, None, &Device::Cpu, sizing).unwrap()
}

/// Prefill then `steps` greedy decode steps on both of ragway's decoders (the native one and
/// the paged one loaded from `path`); `reference(tokens, offset)` is the candle-transformers
/// model's forward (logits of the last position).
fn compare(
    ours: &GenerativeModel,
    path: &Path,
    prompt: &[u32],
    steps: usize,
    mut reference: impl FnMut(&[u32], usize) -> Vec<f32>,
) -> Vec<Vec<f32>> {
    let device = paged(path, path);
    let mut kv = device.model.new_kv();
    let mut cache = KvCache::new(ours.model.config());
    let mut scratch = Scratch::default();
    let mut logits = prefill_logits(ours, prompt, &mut cache, &mut scratch);
    let mut on_device =
        device.model.forward(&mut [PagedSeq { tokens: prompt, kv: &mut kv, want_logits: true }]).unwrap();
    let mut want = reference(prompt, 0);
    let mut all = Vec::new();
    for step in 0..=steps {
        let rel = max_rel_diff(&logits, &want);
        assert!(rel <= 1e-3, "step {step}: max |diff| {rel} of the largest logit");
        let rel = max_rel_diff(&on_device, &want);
        assert!(rel <= 1e-3, "paged decoder, step {step}: max |diff| {rel} of the largest logit");
        let next = argmax(&want);
        assert_eq!(argmax(&logits), next, "step {step}");
        assert_eq!(argmax(&on_device), next, "paged decoder, step {step}");
        all.push(logits.clone());
        if step == steps {
            break;
        }
        let mut b = [SeqBatch { tokens: &[next], cache: &mut cache, want_logits: true }];
        logits = ours.model.forward(&mut b, &mut scratch).unwrap();
        on_device = device.model.forward(&mut [PagedSeq { tokens: &[next], kv: &mut kv, want_logits: true }]).unwrap();
        want = reference(&[next], prompt.len() + step);
    }
    all
}

fn vb(t: &Tiny) -> candle_nn::VarBuilder<'static> {
    // SAFETY: the test's own file, not written while mapped.
    unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(&[t.dir.join("model.safetensors")], DType::F32, &Device::Cpu)
    }
    .unwrap()
}

fn run(m: &mut dyn FnMut(&Tensor, usize) -> candle_core::Result<Tensor>, tokens: &[u32], offset: usize) -> Vec<f32> {
    let input = Tensor::new(tokens, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    m(&input, offset).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// Our GGUF load of the same weights gives the logits of our safetensors load.
fn gguf_twin_agrees(t: &Tiny, arch: &str, prompt: &[u32], want: &[f32]) {
    let path = t.dir.join(format!("tiny-{arch}.gguf"));
    write_gguf(t, arch, &path);
    let g = GenerativeModel::load(path.to_str().unwrap(), &t.dir, None).unwrap();
    assert_eq!(g.model.config().arch.name, arch);
    let got = prefill_logits(&g, prompt, &mut KvCache::new(g.model.config()), &mut Scratch::default());
    let rel = max_rel_diff(&got, want);
    assert!(rel <= 1e-4, "{arch} GGUF: max |diff| {rel} against the safetensors load");
    let d = paged(&path, &t.dir);
    let got =
        d.model.forward(&mut [PagedSeq { tokens: prompt, kv: &mut d.model.new_kv(), want_logits: true }]).unwrap();
    let rel = max_rel_diff(&got, want);
    assert!(rel <= 1e-3, "{arch} GGUF on the paged decoder: max |diff| {rel} against the safetensors load");
}

fn prompt(m: &GenerativeModel) -> Vec<u32> {
    m.tokenizer.encode("The capital of France is Paris, and the capital of Italy is", false).unwrap()
}

#[test]
fn qwen2_matches_candle_transformers() {
    use candle_transformers::models::qwen2::{Config, ModelForCausalLM};
    let t = tiny("qwen2", HIDDEN / HEADS, json!({}));
    let ours = GenerativeModel::load(t.dir.to_str().unwrap(), &t.dir, None).unwrap();
    // candle's Qwen 2 config wants a number here (unused without use_sliding_window).
    let mut c = t.config.clone();
    c["sliding_window"] = json!(256);
    let cfg: Config = serde_json::from_value(c).unwrap();
    let mut reference = ModelForCausalLM::new(&cfg, vb(&t)).unwrap();
    let p = prompt(&ours);
    let logits = compare(&ours, &t.dir, &p, 4, |x, o| run(&mut |i, o| reference.forward(i, o), x, o));
    gguf_twin_agrees(&t, "qwen2", &p, &logits[0]);
}

#[test]
fn qwen3_matches_candle_transformers() {
    use candle_transformers::models::qwen3::{Config, ModelForCausalLM};
    // Head size 32 with 4 heads: Q is twice the width, as in Qwen 3.
    let t = tiny("qwen3", 32, json!({}));
    let ours = GenerativeModel::load(t.dir.to_str().unwrap(), &t.dir, None).unwrap();
    let cfg: Config = serde_json::from_value(t.config.clone()).unwrap();
    let mut reference = ModelForCausalLM::new(&cfg, vb(&t)).unwrap();
    let p = prompt(&ours);
    let logits = compare(&ours, &t.dir, &p, 4, |x, o| run(&mut |i, o| reference.forward(i, o), x, o));
    gguf_twin_agrees(&t, "qwen3", &p, &logits[0]);
}

#[test]
fn phi3_matches_candle_transformers() {
    use candle_transformers::models::phi3::{Config, Model};
    let t = tiny("phi3", HIDDEN / HEADS, json!({}));
    let ours = GenerativeModel::load(t.dir.to_str().unwrap(), &t.dir, None).unwrap();
    let cfg: Config = serde_json::from_value(t.config.clone()).unwrap();
    let mut reference = Model::new(&cfg, vb(&t)).unwrap();
    let p = prompt(&ours);
    let logits = compare(&ours, &t.dir, &p, 4, |x, o| run(&mut |i, o| reference.forward(i, o), x, o));
    gguf_twin_agrees(&t, "phi3", &p, &logits[0]);
}

/// A window of 6 positions on a 13-token prompt: prefill logits against candle-transformers'
/// `mistral` (whose mask lets a position see `sliding_window + 1` positions, so it gets 5),
/// and against the same model without a window, which must differ.
#[test]
fn mistral_sliding_window_matches_candle_transformers() {
    use candle_transformers::models::mistral::{Config, Model};
    let t = tiny("mistral", HIDDEN / HEADS, json!({"sliding_window": 6}));
    let ours = GenerativeModel::load(t.dir.to_str().unwrap(), &t.dir, None).unwrap();
    assert_eq!(ours.model.config().arch.sliding_window, Some(6));
    let p = prompt(&ours);
    assert!(p.len() > 6);
    let got = prefill_logits(&ours, &p, &mut KvCache::new(ours.model.config()), &mut Scratch::default());
    let mut c = t.config.clone();
    c["sliding_window"] = json!(5);
    let cfg: Config = serde_json::from_value(c).unwrap();
    let mut reference = Model::new(&cfg, vb(&t)).unwrap();
    let want = run(&mut |i, o| reference.forward(i, o), &p, 0);
    let rel = max_rel_diff(&got, &want);
    assert!(rel <= 1e-3, "max |diff| {rel}");
    let d = paged(&t.dir, &t.dir);
    let on_device =
        d.model.forward(&mut [PagedSeq { tokens: &p, kv: &mut d.model.new_kv(), want_logits: true }]).unwrap();
    let rel = max_rel_diff(&on_device, &want);
    assert!(rel <= 1e-3, "paged decoder: max |diff| {rel}");
    let mut c = t.config.clone();
    c["sliding_window"] = json!(null);
    let mut unwindowed = Model::new(&serde_json::from_value(c).unwrap(), vb(&t)).unwrap();
    let full = run(&mut |i, o| unwindowed.forward(i, o), &p, 0);
    assert!(max_rel_diff(&full, &want) > 1e-2, "the window changes nothing: the test would not see it");
}

/// `query_pre_attn_scalar` equals the head size (as in Gemma 3 270M–12B): candle-transformers
/// scales by the head size whatever the config says; ragway follows transformers
/// (`query_pre_attn_scalar ** -0.5`), which the unit test of the config checks.
fn gemma3_config(window: usize) -> Value {
    json!({
        "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 16, "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10_000.0, "sliding_window": window, "sliding_window_pattern": 2,
        "final_logit_softcapping": null, "attn_logit_softcapping": null, "tie_word_embeddings": true,
    })
}

/// Gemma 3 safetensors with a window longer than the test: every layer kind and norm, prefill
/// and decode, on both decoders, against candle-transformers' `gemma3`.
#[test]
fn gemma3_safetensors_match_candle_transformers() {
    use candle_transformers::models::gemma3::{Config, Model};
    let t = tiny("gemma3_text", 16, gemma3_config(64));
    let ours = GenerativeModel::load(t.dir.to_str().unwrap(), &t.dir, None).unwrap();
    let cfg = ours.model.config();
    assert_eq!((cfg.layer_window(0), cfg.layer_window(1)), (Some(64), None));
    assert_eq!((cfg.layer_rope(0), cfg.layer_rope(1)), ((10_000.0, 1.0), (1_000_000.0, 1.0)));
    let reference_cfg: Config = serde_json::from_value(t.config.clone()).unwrap();
    let mut reference = Model::new(false, &reference_cfg, vb(&t)).unwrap();
    let p = prompt(&ours);
    compare(&ours, &t.dir, &p, 4, |x, o| one_by_one(&mut reference, x, o));
}

/// candle-transformers' `gemma3` (0.11) appends a non-contiguous V to its cache for more
/// than one token at a time, which candle refuses: it is fed one token at a time (the
/// logits of the last are those of the whole prefill).
fn one_by_one(m: &mut candle_transformers::models::gemma3::Model, tokens: &[u32], offset: usize) -> Vec<f32> {
    let mut last = Vec::new();
    for (i, &t) in tokens.iter().enumerate() {
        last = run(&mut |x, o| m.forward(x, o), &[t], offset + i);
    }
    last
}

/// A window of 6 on a 13-token prompt: prefill logits of both decoders against
/// candle-transformers fed one token at a time (its rotating cache then holds the current
/// position and the 5 before: the same window), and against the same model without a
/// window, which must differ.
#[test]
fn gemma3_sliding_window_matches_candle_transformers() {
    use candle_transformers::models::gemma3::{Config, Model};
    let t = tiny("gemma3_text", 16, gemma3_config(6));
    let ours = GenerativeModel::load(t.dir.to_str().unwrap(), &t.dir, None).unwrap();
    let p = prompt(&ours);
    assert!(p.len() > 6);
    let got = prefill_logits(&ours, &p, &mut KvCache::new(ours.model.config()), &mut Scratch::default());
    let d = paged(&t.dir, &t.dir);
    let on_device =
        d.model.forward(&mut [PagedSeq { tokens: &p, kv: &mut d.model.new_kv(), want_logits: true }]).unwrap();
    let mut reference =
        Model::new(false, &serde_json::from_value::<Config>(t.config.clone()).unwrap(), vb(&t)).unwrap();
    let want = one_by_one(&mut reference, &p, 0);
    assert!(max_rel_diff(&got, &want) <= 1e-3, "native: max |diff| {}", max_rel_diff(&got, &want));
    assert!(max_rel_diff(&on_device, &want) <= 1e-3, "paged: max |diff| {}", max_rel_diff(&on_device, &want));
    let mut c = t.config.clone();
    c["sliding_window"] = json!(100);
    let mut unwindowed = Model::new(false, &serde_json::from_value::<Config>(c).unwrap(), vb(&t)).unwrap();
    let full = one_by_one(&mut unwindowed, &p, 0);
    assert!(max_rel_diff(&full, &want) > 1e-2, "the window changes nothing: the test would not see it");
}

/// Gemma 2 safetensors and GGUF: soft-capped attention and output logits (small caps here, so
/// that they matter), the four norms, alternating layers, on both decoders, against
/// candle-transformers' `gemma2` (whose window is not per layer: the test's is longer than
/// the sequence), and against the same model without caps, which must differ.
#[test]
fn gemma2_matches_candle_transformers() {
    use candle_transformers::models::gemma2::{Config, Model};
    let extra = json!({
        "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 16, "sliding_window": 64,
        "attn_logit_softcapping": 1.5, "final_logit_softcapping": 4.0, "tie_word_embeddings": true,
    });
    let t = tiny("gemma2", 16, extra);
    let ours = GenerativeModel::load(t.dir.to_str().unwrap(), &t.dir, None).unwrap();
    let cfg = ours.model.config();
    assert_eq!((cfg.arch.attn_softcap, cfg.arch.final_softcap), (Some(1.5), Some(4.0)));
    assert_eq!((cfg.layer_window(0), cfg.layer_window(1)), (Some(64), None));
    let mut reference =
        Model::new(false, &serde_json::from_value::<Config>(t.config.clone()).unwrap(), vb(&t)).unwrap();
    let p = prompt(&ours);
    let mut one_by_one = |tokens: &[u32], offset: usize| {
        let mut last = Vec::new();
        for (i, &tk) in tokens.iter().enumerate() {
            last = run(&mut |x, o| reference.forward(x, o), &[tk], offset + i);
        }
        last
    };
    let logits = compare(&ours, &t.dir, &p, 4, &mut one_by_one);
    assert!(logits[0].iter().all(|l| l.abs() <= 4.0), "the output cap holds");
    gguf_twin_agrees(&t, "gemma2", &p, &logits[0]);
    let mut c = t.config.clone();
    c["attn_logit_softcapping"] = json!(null);
    let mut uncapped = Model::new(false, &serde_json::from_value::<Config>(c).unwrap(), vb(&t)).unwrap();
    let mut last = Vec::new();
    for (i, &tk) in p.iter().enumerate() {
        last = run(&mut |x, o| uncapped.forward(x, o), &[tk], i);
    }
    assert!(max_rel_diff(&last, &logits[0]) > 1e-2, "the attention cap changes nothing: the test would not see it");
}

/// Granite: llama with four multipliers (embedding, residual, attention, logits), which
/// candle-transformers' `granite` leaves out. The reference is that model on the weights the
/// multipliers rewrite to — embeddings × e/r (the residual stream is then r times Granite's,
/// which the RMS norms do not see), queries × a·√head_dim — with its logits divided by the
/// logit scale; then the same weights as GGUF under llama.cpp's `granite.*` keys.
#[test]
fn granite_multipliers_match_candle_transformers_on_the_weights_they_rewrite_to() {
    use candle_transformers::models::granite::{Cache, Granite, GraniteConfig};
    let (e, r, a, l) = (12.0f64, 0.22, 0.0078125, 8.0);
    let hd = HIDDEN / HEADS;
    let t = tiny(
        "granite",
        hd,
        json!({"embedding_multiplier": e, "residual_multiplier": r, "attention_multiplier": a, "logits_scaling": l}),
    );
    let ours = GenerativeModel::load(t.dir.to_str().unwrap(), &t.dir, None).unwrap();
    let arch = &ours.model.config().arch;
    assert_eq!((arch.name.as_str(), arch.residual_scale, arch.logit_scale), ("granite", Some(0.22), Some(8.0)));
    // Outside the model's folder, whose every *.safetensors file is part of the model.
    let twin_dir = PathBuf::from(format!("{}-rewritten", t.dir.display()));
    std::fs::create_dir_all(&twin_dir).unwrap();
    let twin = twin_dir.join("model.safetensors");
    let mut w = t.tensors.clone();
    for (name, v) in w.iter_mut() {
        if name == "model.embed_tokens.weight" {
            *v = (&*v * (e / r)).unwrap();
        } else if name.ends_with("q_proj.weight") {
            *v = (&*v * (a * (hd as f64).sqrt())).unwrap();
        }
    }
    candle_core::safetensors::save(&w, &twin).unwrap();
    // SAFETY: the test's own file, not written while mapped.
    let vb = unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&[&twin], DType::F32, &Device::Cpu) }.unwrap();
    let cfg: GraniteConfig = serde_json::from_value(t.config.clone()).unwrap();
    let cfg = cfg.into_config(false);
    let reference = Granite::load(vb, &cfg).unwrap();
    let _ = std::fs::remove_dir_all(&twin_dir);
    let mut cache = Cache::new(true, DType::F32, &cfg, &Device::Cpu).unwrap();
    let p = prompt(&ours);
    let logits = compare(&ours, &t.dir, &p, 4, |x, o| {
        run(&mut |i, o| reference.forward(i, o, &mut cache), x, o).iter().map(|v| v / l as f32).collect()
    });
    gguf_twin_agrees(&t, "granite", &p, &logits[0]);
    // The multipliers matter: the same weights read as plain llama answer otherwise.
    let mut plain = t.config.clone();
    plain["model_type"] = json!("llama");
    std::fs::write(t.dir.join("config.json"), plain.to_string()).unwrap();
    let llama = GenerativeModel::load(t.dir.to_str().unwrap(), &t.dir, None).unwrap();
    let other = prefill_logits(&llama, &p, &mut KvCache::new(llama.model.config()), &mut Scratch::default());
    assert!(max_rel_diff(&other, &logits[0]) > 0.05);
}

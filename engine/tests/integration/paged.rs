//! The paged decoder — the code the CUDA path runs, here on candle's CPU device — against the
//! native CPU decoder and llama.cpp, with the real SmolLM2 and Gemma 3 GGUF files: logits,
//! greedy tokens, batching, chunked prefill, sliding windows over dropped blocks, and the
//! scheduler (preemption, `n` sharing a prompt's blocks) on a paged cache.

use super::common::{centered, cosine, models_dir};
use super::gemma3::{gemma3, gemma3_path};
use super::generate_worker::{assert_tokens_equal_up_to_a_near_tie, logprob_margin};
use super::generation::{data, ids, prefill_logits, read_npy, smollm};
use candle_core::Device;
use ragway_engine::generate::sampling::argmax;
use ragway_engine::generate::{
    DecoderKind, DeviceLlama, GenEvent, GenerateConfig, GenerateWorker, GenerationRequest, GenerativeModel, KvCache,
    KvSizing, PagedKv, PagedSeq, SamplingParams, Scratch, SeqBatch,
};
use ragway_engine::models::DEFAULT_GENERATION_MODEL_ID;
use serde_json::Value;
use std::sync::OnceLock;

const SIZING: KvSizing = KvSizing { budget_tokens: 8192, max_running: 8, max_batch_tokens: 512 };

fn paged_smollm() -> &'static GenerativeModel<DeviceLlama> {
    static M: OnceLock<GenerativeModel<DeviceLlama>> = OnceLock::new();
    M.get_or_init(|| {
        let dir = models_dir().join("SmolLM2-135M-Instruct");
        GenerativeModel::load_on_device(dir.to_str().unwrap(), &models_dir(), None, &Device::Cpu, SIZING)
            .expect("load SmolLM2 on the paged decoder")
    })
}

fn paged_gemma3() -> &'static GenerativeModel<DeviceLlama> {
    static M: OnceLock<GenerativeModel<DeviceLlama>> = OnceLock::new();
    M.get_or_init(|| {
        GenerativeModel::load_on_device(gemma3_path().to_str().unwrap(), &models_dir(), None, &Device::Cpu, SIZING)
            .expect("load Gemma 3 on the paged decoder")
    })
}

fn step(m: &DeviceLlama, tokens: &[u32], kv: &mut PagedKv) -> Vec<f32> {
    m.forward(&mut [PagedSeq { tokens, kv, want_logits: true }]).unwrap()
}

fn top2_margin(v: &[f32]) -> f32 {
    let mut s: Vec<f32> = v.to_vec();
    s.sort_unstable_by(|a, b| b.total_cmp(a));
    s[0] - s[1]
}

fn smollm_prompts() -> Vec<Value> {
    let f: Value = serde_json::from_str(&std::fs::read_to_string(data("smollm2_greedy.json")).unwrap()).unwrap();
    f["prompts"].as_array().unwrap().clone()
}

/// Paged and native decoders agree with llama.cpp and with each other: prompt logits (cosine
/// after centering, same top token) and 16 greedy tokens, which may part only where the native
/// decoder's top two candidates were within `NEAR_TIE` of each other.
///
/// Both quantize activations to 8 bits before the quantized dot products, with different
/// blocks and rounding (the native decoder one scale per row chunk, candle's kernels ggml's
/// Q8 blocks), so each is ~0.999 from llama.cpp and they are as far from each other:
/// measured 0.9986-0.9994 (SmolLM2) and 0.9978-0.9995 (Gemma 3) between them. Against
/// llama.cpp the paged decoder measured 0.9989-0.9993 (SmolLM2) and 0.9980-0.9997 (Gemma 3);
/// Gemma's `code` prompt is 0.9983 for the native decoder too, and the same computed in f32,
/// so llama.cpp's own activation rounding is the rest: the bound there is 0.997. Two such
/// approximations are as far from each other as from llama.cpp (since the native decoder
/// reads Q6_K exactly, `code` measures 0.99777 between them): the bound between them is
/// 0.997 as well.
fn matches_native(
    native: &GenerativeModel,
    paged: &GenerativeModel<DeviceLlama>,
    prompts: &[Value],
    logits_dir: &str,
    label: &str,
) {
    const NEAR_TIE: f32 = 0.5;
    for p in prompts {
        let name = p["name"].as_str().unwrap();
        let prompt = ids(&p["prompt_ids"]);
        let mut scratch = Scratch::default();
        let mut cache = KvCache::new(native.model.config());
        let mut want = prefill_logits(native, &prompt, &mut cache, &mut scratch);
        let mut kv = paged.model.new_kv();
        let mut got = step(&paged.model, &prompt, &mut kv);
        let cos = cosine(&centered(&got), &centered(&want));
        let npy = data(&format!("{logits_dir}/{name}.npy"));
        let reference = npy.is_file().then(|| read_npy(&npy));
        let cos_ref = reference.as_ref().map(|r| cosine(&centered(&got), &centered(r)));
        eprintln!("{label} {name}: first-position cosine {cos:.6} against native, {cos_ref:.6?} against llama.cpp");
        assert!(cos >= 0.997, "{label} {name}: cosine {cos}");
        assert_eq!(argmax(&got), argmax(&want), "{label} {name}: top token");
        if let (Some(c), Some(r)) = (cos_ref, &reference) {
            assert!(c >= 0.997, "{label} {name}: cosine {c} against llama.cpp");
            assert_eq!(argmax(&got), argmax(r), "{label} {name}: top token against llama.cpp");
        }
        for i in 0..16 {
            let (g, w) = (argmax(&got), argmax(&want));
            if g != w {
                let margin = top2_margin(&want);
                assert!(margin < NEAR_TIE, "{label} {name}: token {i} differs ({g} vs {w}) at margin {margin}");
                eprintln!("{label} {name}: parts at token {i}, a near-tie ({margin:.3})");
                break;
            }
            let mut batch = [SeqBatch { tokens: &[w], cache: &mut cache, want_logits: true }];
            want = native.model.forward(&mut batch, &mut scratch).unwrap();
            got = step(&paged.model, &[g], &mut kv);
        }
    }
}

#[test]
fn paged_decoder_matches_native_and_llama_cpp_on_smollm2() {
    matches_native(smollm(), paged_smollm(), &smollm_prompts(), "smollm2_logits", "SmolLM2");
}

#[test]
fn paged_decoder_matches_native_and_llama_cpp_on_gemma3() {
    let f: Value = serde_json::from_str(&std::fs::read_to_string(data("gemma3_270m.json")).unwrap()).unwrap();
    matches_native(gemma3(), paged_gemma3(), f["prompts"].as_array().unwrap(), "gemma3_logits", "Gemma 3");
}

/// Gemma 3's sliding layers see 512 positions: a prompt past the window, prefilled in chunks,
/// then decoded, reads only kept blocks and agrees with the native decoder, while the sliding
/// layers hold no more than the window.
#[test]
fn paged_sliding_window_drops_blocks_and_matches_native() {
    let (native, paged) = (gemma3(), paged_gemma3());
    let window = native.model.config().arch.sliding_window.expect("Gemma 3 slides");
    let text = "The quick brown fox jumps over the lazy dog while counting numbers one by one. ".repeat(60);
    let mut prompt = native.tokenizer.encode(&text, true).unwrap();
    prompt.truncate(window + 80);
    assert!(prompt.len() > window);
    let mut scratch = Scratch::default();
    let mut cache = KvCache::new(native.model.config());
    let mut kv = paged.model.new_kv();
    let (mut want, mut got) = (Vec::new(), Vec::new());
    for chunk in prompt.chunks(200) {
        let mut batch = [SeqBatch { tokens: chunk, cache: &mut cache, want_logits: true }];
        want = native.model.forward(&mut batch, &mut scratch).unwrap();
        got = step(&paged.model, chunk, &mut kv);
        eprintln!("{} tokens: cosine {:.6}", kv.len(), cosine(&centered(&got), &centered(&want)));
    }
    for _ in 0..4 {
        // The bound of the fixture prompts (see `matches_native`): a window that saw too much
        // or too little moves the logits of a 270M model far more than rounding does.
        let cos = cosine(&centered(&got), &centered(&want));
        assert!(cos >= 0.998, "cosine {cos} at {} tokens", kv.len());
        let t = argmax(&want);
        let mut batch = [SeqBatch { tokens: &[t], cache: &mut cache, want_logits: true }];
        want = native.model.forward(&mut batch, &mut scratch).unwrap();
        got = step(&paged.model, &[t], &mut kv);
    }
    let cfg = paged.model.config();
    for layer in 0..cfg.n_layers {
        let held = kv.table(layer).held() * ragway_engine::generate::paged::BLOCK;
        match cfg.layer_window(layer) {
            Some(w) => assert!(held <= w + 2 * ragway_engine::generate::paged::BLOCK, "layer {layer} holds {held}"),
            None => assert!(held >= kv.len(), "layer {layer} holds {held} of {}", kv.len()),
        }
    }
}

/// Sequences in one pass — prompts prefilled together, a prompt joining sequences that are
/// decoding — give the logits each gives alone.
#[test]
fn paged_batched_equals_sequential() {
    let m = &paged_smollm().model;
    let prompts: Vec<Vec<u32>> = smollm_prompts().iter().take(3).map(|p| ids(&p["prompt_ids"])).collect();
    // Alone: prefill, then 6 greedy steps; record every step's logits.
    let alone: Vec<Vec<Vec<f32>>> = prompts
        .iter()
        .map(|p| {
            let mut kv = m.new_kv();
            let mut out = vec![step(m, p, &mut kv)];
            for _ in 0..6 {
                let t = argmax(out.last().unwrap());
                out.push(step(m, &[t], &mut kv));
            }
            out
        })
        .collect();
    let vocab = m.config().vocab;
    let close = |a: &[f32], b: &[f32], what: &str| {
        let cos = cosine(&centered(a), &centered(b));
        assert!(cos > 0.99999, "{what}: cosine {cos}");
        assert_eq!(argmax(a), argmax(b), "{what}");
    };
    let mut kvs: Vec<PagedKv> = (0..3).map(|_| m.new_kv()).collect();
    let mut tokens: Vec<Vec<u32>> = vec![prompts[0].clone(), prompts[1].clone(), Vec::new()];
    let mut stepno = [0usize; 3];
    // Pass 1: prompts 0 and 1 together. Then: 0 and 1 decode while 2's prompt comes in
    // between them in batch order; then all three decode.
    for pass in 0..7 {
        if pass == 1 {
            tokens[2] = prompts[2].clone();
        }
        let active: Vec<usize> = (0..3).filter(|&i| !tokens[i].is_empty()).collect();
        let logits = {
            let mut it = kvs.iter_mut();
            let mut refs: Vec<Option<&mut PagedKv>> = (0..3).map(|_| it.next()).collect();
            let mut batch: Vec<PagedSeq<'_>> = Vec::new();
            for &i in &active {
                batch.push(PagedSeq { tokens: &tokens[i], kv: refs[i].take().unwrap(), want_logits: true });
            }
            m.forward(&mut batch).unwrap()
        };
        for (r, &i) in active.iter().enumerate() {
            let row = &logits[r * vocab..(r + 1) * vocab];
            if stepno[i] <= 6 {
                close(row, &alone[i][stepno[i]], &format!("sequence {i} step {}", stepno[i]));
            }
            stepno[i] += 1;
            tokens[i] = vec![argmax(row)];
        }
    }
    assert!(stepno.iter().all(|&s| s >= 6), "{stepno:?}");
}

/// A prompt fed in chunks of 7 gives the logits of the whole prompt.
#[test]
fn paged_chunked_prefill_equals_whole() {
    let m = &paged_smollm().model;
    let prompt: Vec<u32> = smollm_prompts().iter().map(|p| ids(&p["prompt_ids"])).max_by_key(|p| p.len()).unwrap();
    assert!(prompt.len() > 20, "{}", prompt.len());
    let whole = step(m, &prompt, &mut m.new_kv());
    let mut kv = m.new_kv();
    let mut last = Vec::new();
    for c in prompt.chunks(7) {
        last = step(m, c, &mut kv);
    }
    let cos = cosine(&centered(&whole), &centered(&last));
    assert!(cos > 0.99999, "cosine {cos}");
    assert_eq!(argmax(&whole), argmax(&last));
}

/// Cache blocks come back when sequences are dropped; a forked sequence shares its prompt's
/// blocks and, after its own first token, still agrees with its parent's continuation.
#[test]
fn paged_forks_share_blocks_and_sequences_return_them() {
    // Its own model: other tests use the shared one's pool meanwhile.
    let dir = models_dir().join("SmolLM2-135M-Instruct");
    let own =
        GenerativeModel::load_on_device(dir.to_str().unwrap(), &models_dir(), None, &Device::Cpu, SIZING).unwrap();
    let m = &own.model;
    let before = m.blocks().0;
    assert_eq!(before, 0, "the pool starts empty");
    let prompt = ids(&smollm_prompts()[0]["prompt_ids"]);
    let mut a = m.new_kv();
    let logits = step(m, &prompt, &mut a);
    let used = m.blocks().0 - before;
    assert_eq!(used, m.config().n_layers * prompt.len().div_ceil(16));
    let mut b = a.fork();
    assert_eq!(m.blocks().0 - before, used, "a fork allocates nothing");
    let t = argmax(&logits);
    let la = step(m, &[t], &mut a);
    let lb = step(m, &[t], &mut b);
    assert_eq!(la, lb, "both continue from the same cache");
    drop(a);
    drop(b);
    assert_eq!(m.blocks().0, before, "dropped sequences return every block");
}

fn paged_config(kv_cache_mib: usize) -> GenerateConfig {
    let mut cfg = GenerateConfig::new(DEFAULT_GENERATION_MODEL_ID, DEFAULT_GENERATION_MODEL_ID, models_dir());
    cfg.decoder = Some(DecoderKind::Paged);
    cfg.kv_cache_mib = kv_cache_mib;
    cfg
}

/// `n` greedy sequences of one request, each with the logprob margin between its top two
/// candidates at every step.
fn greedy_tokens(
    h: &ragway_engine::generate::GenerateHandle,
    text: &str,
    n: usize,
    max: usize,
) -> Vec<(Vec<u32>, Vec<f32>)> {
    let greedy_with_margins = SamplingParams { logprobs: Some(2), ..SamplingParams::greedy() };
    let mut req = GenerationRequest::new(h.tokenizer().encode(text, true).unwrap(), max, greedy_with_margins);
    req.n = n;
    let mut stream = h.submit(req).unwrap();
    let mut out = vec![(Vec::new(), Vec::new()); n];
    let mut done = 0;
    while let Some(ev) = stream.blocking_next() {
        match ev {
            GenEvent::Token { index, token, logprob, .. } => {
                out[index].0.push(token);
                out[index].1.push(logprob_margin(logprob));
            }
            GenEvent::Done { .. } => {
                done += 1;
                if done == n {
                    break;
                }
            }
            GenEvent::Error { message } => panic!("engine error: {message}"),
            _ => {}
        }
    }
    out
}

/// The scheduler on the paged decoder: concurrent requests in a cache too small for all of
/// them (preemption returns blocks, recomputation resumes), and `n` = 3 sharing one prefill,
/// give the tokens each request gives alone on an uncontended paged worker.
#[test]
fn scheduler_on_the_paged_cache_preempts_and_shares_prompts() {
    let roomy = GenerateWorker::spawn(paged_config(64)).expect("paged worker");
    let tight = GenerateWorker::spawn(paged_config(2)).expect("tight paged worker");
    let texts = ["The capital of France is", "Water boils at", "List of prime numbers: 2, 3,"];
    let alone: Vec<(Vec<u32>, Vec<f32>)> = texts.iter().map(|t| greedy_tokens(&roomy, t, 1, 40).remove(0)).collect();
    let together: Vec<(Vec<u32>, Vec<f32>)> = std::thread::scope(|s| {
        let hs: Vec<_> = texts.iter().map(|t| s.spawn(|| greedy_tokens(&tight, t, 1, 40).remove(0))).collect();
        hs.into_iter().map(|j| j.join().unwrap()).collect()
    });
    // Recomputed prefills batch differently, and the matmul kernels candle picks for a shape
    // sum in another order (measured on an AVX2 machine: "Water boils at" parted at token 20),
    // so the runs are equal up to a near-tie, as for the native decoder's preemption test.
    for (got, want) in together.iter().zip(&alone) {
        assert_tokens_equal_up_to_a_near_tie((&got.0, &got.1), (&want.0, &want.1));
    }
    assert!(tight.metrics().preemptions.load(std::sync::atomic::Ordering::Relaxed) > 0, "the cache never filled");
    // The three decode as one batch of three rows: equal to the lone run up to a near-tie.
    for s in greedy_tokens(&roomy, texts[0], 3, 8) {
        assert_tokens_equal_up_to_a_near_tie((&s.0, &s.1), (&alone[0].0[..8], &alone[0].1[..8]));
    }
}

//! Gemma 3 270M (base, GGUF Q4_K_M, from `scripts/setup-models.sh --with-gemma3`) against
//! llama.cpp's outputs in `tests/data/gemma3_270m.json` and `gemma3_logits/*.npy`: the
//! `gemma3` architecture, K-quants and a SentencePiece tokenizer rebuilt from GGUF metadata.

use super::common::{centered, cosine, models_dir};
use super::generation::{batched_equals_sequential, data, greedy_matches_llama_cpp, ids, prefill_logits, read_npy};
use candle_core::quantized::gguf_file::Content;
use ragway_engine::generate::sampling::argmax;
use ragway_engine::generate::{
    GenEvent, GenerateConfig, GenerateWorker, GenerationRequest, GenerativeModel, KvCache, SamplingParams, Scratch,
    SeqBatch, TextTokenizer,
};
use serde_json::Value;
use std::path::PathBuf;
use std::sync::OnceLock;

pub fn gemma3_path() -> PathBuf {
    let p = models_dir().join("gemma-3-270m/gemma-3-270m-q4_k_m.gguf");
    assert!(p.is_file(), "{} is missing: run scripts/setup-models.sh --with-gemma3", p.display());
    p
}

pub fn fixture() -> Value {
    serde_json::from_str(&std::fs::read_to_string(data("gemma3_270m.json")).unwrap()).unwrap()
}

fn gguf_tokenizer() -> TextTokenizer {
    let mut f = std::fs::File::open(gemma3_path()).unwrap();
    let content = Content::read(&mut f).unwrap();
    TextTokenizer::from_gguf(&content).unwrap()
}

#[test]
fn sentencepiece_tokenizer_from_gguf_matches_llama_cpp() {
    let tk = gguf_tokenizer();
    let f = fixture();
    let cases = f["tokenizer_strings"].as_array().unwrap();
    assert!(cases.len() >= 25);
    let mut mismatches = Vec::new();
    for c in cases {
        let text = c["text"].as_str().unwrap();
        for (key, bos) in [("ids_add_bos", true), ("ids_no_bos", false)] {
            let got = tk.encode(text, bos).unwrap();
            if got != ids(&c[key]) {
                mismatches.push(format!("{text:?} ({key}): {got:?} vs {:?}", ids(&c[key])));
            }
        }
        // Decoding gives the text back (SentencePiece is lossless but for what byte fallback
        // cannot carry: nothing here).
        let back = tk.decode(&ids(&c["ids_no_bos"])).unwrap();
        if back != text {
            mismatches.push(format!("decode {text:?} -> {back:?}"));
        }
    }
    assert!(mismatches.is_empty(), "{} differ: {mismatches:#?}", mismatches.len());
    assert_eq!((tk.bos_id, tk.eos_id, tk.add_bos), (Some(2), Some(1), true));
    assert!(tk.stop_ids.contains(&1));
    assert!(tk.stop_ids.contains(&tk.token_to_id("<end_of_turn>").unwrap()));
}

/// The compact SentencePiece vocabulary that serving uses and the same vocabulary rebuilt as
/// a `tokenizers` BPE agree: ids of every paragraph of the project's docs and sources and of
/// text in a dozen scripts with special tokens written in it, and the text of every id alone.
#[test]
fn compact_sentencepiece_equals_the_tokenizers_bpe() {
    let mut f = std::fs::File::open(gemma3_path()).unwrap();
    let content = Content::read(&mut f).unwrap();
    let compact = TextTokenizer::from_gguf(&content).unwrap();
    assert!(compact.hf().is_none(), "a SentencePiece GGUF is served by the compact vocabulary");
    let bpe = TextTokenizer::sentencepiece_as_bpe(&content).unwrap();
    let mut texts: Vec<String> = [
        include_str!("../../../README.md"),
        include_str!("../../../docs/benchmarks.md"),
        include_str!("../../src/generate/spm.rs"),
        include_str!("../../src/generate/model.rs"),
    ]
    .iter()
    .flat_map(|doc| std::iter::once(doc.to_string()).chain(doc.split("\n\n").map(str::to_string)))
    .collect();
    texts.extend(
        [
            "Ünïcödé façade — naïve café, “quotes” and ‘single’ ones… ½ ≤ ∞",
            "日本語のテキストと中文文本，한국어 텍스트。",
            "Русский текст, ελληνικά, עברית, العربية, हिन्दी, ไทย",
            "emoji 👩‍💻🚀🇫🇷 and tabs\tand\r\nwindows lines   and    runs of spaces",
            "<start_of_turn>user\nWhat is 2 + 2?<end_of_turn>\n<start_of_turn>model\n",
            "<bos><eos><pad><unk><mask>[multimodal]<start_of_image>",
            "  leading and trailing  ",
            " ",
            "\n\n\n",
            "def f(x):\n    return {\"a\": [1, 2, 3]}  # comment\n",
            "0123456789 3.14159 1e-10 0xDEADBEEF",
        ]
        .map(String::from),
    );
    for c in fixture()["tokenizer_strings"].as_array().unwrap() {
        texts.push(c["text"].as_str().unwrap().to_string());
    }
    let (mut compared, mut differ) = (0usize, Vec::new());
    for t in &texts {
        let a = compact.encode(t, false).unwrap();
        let b = bpe.encode_fast(t.as_str(), false).unwrap().get_ids().to_vec();
        compared += b.len();
        if a != b {
            differ.push(format!("{:?}: {} vs {} ids", &t[..t.len().min(60)], a.len(), b.len()));
        }
        let back = compact.decode(&a).unwrap();
        assert_eq!(back, bpe.decode(&b, true).unwrap(), "decode of {t:?}");
    }
    assert!(differ.is_empty(), "{} of {} texts tokenize differently: {differ:#?}", differ.len(), texts.len());
    assert!(compared > 50_000, "only {compared} tokens compared");
    for id in 0..compact.vocab_size() as u32 {
        for skip in [true, false] {
            let a = if skip { compact.decode(&[id]) } else { compact.decode_with_special(&[id]) }.unwrap();
            assert_eq!(a, bpe.decode(&[id], skip).unwrap(), "id {id}, skip_special {skip}");
        }
        assert_eq!(compact.id_to_token(id), bpe.id_to_token(id), "id {id}");
    }
    assert_eq!(compact.vocab_size(), bpe.get_vocab_size(true));
}

pub fn gemma3() -> &'static GenerativeModel {
    static M: OnceLock<GenerativeModel> = OnceLock::new();
    M.get_or_init(|| {
        GenerativeModel::load(gemma3_path().to_str().unwrap(), &models_dir(), None).expect("load Gemma 3 270M")
    })
}

#[test]
fn gemma3_prompt_ids_and_first_position_logits_match_llama_cpp() {
    let m = gemma3();
    assert_eq!(m.model.config().arch.name, "gemma3");
    // Measured on AVX-512: 0.9983 (code), 0.9988 (primes), 0.9993-0.9996 (capital, story,
    // long), identically with f32 weights and activations, so not from ragway's 8-bit
    // activations. On an AVX2 EPYC: code 0.9977 with the AVX2 kernels and 0.9982 with the
    // portable loop (the same products summed in another order), 0.9971-0.9982 in four more
    // variants, among them llama.cpp's Q8_K activations for the K-quant matrices and its f16
    // rounding of queries and attention weights: none came closer.
    first_position_logits_match_llama_cpp(m, fixture()["prompts"].as_array().unwrap(), "gemma3_logits");
}

/// For each fixture prompt: the prompt's ids equal llama.cpp's, and the first generated
/// position's logits (from `logits_dir/<name>.npy`) agree after centering, with the same top
/// token: the median cosine over the prompts at least 0.999 and each at least 0.997. One
/// prompt's cosine moves by up to 0.001 when the same products are summed in another order
/// (the AVX2 kernels against the portable loop): a change in the last bits flips some 8-bit
/// activation roundings, which Gemma's large activations carry to the logits. llama.cpp's own
/// logits differ between machines too (by up to 0.64 on the long prompt, AVX2 against the
/// AVX-512 machine that made the fixture). A wrong kernel or layer gives far less (below 0.99).
pub fn first_position_logits_match_llama_cpp(m: &GenerativeModel, prompts: &[Value], logits_dir: &str) {
    let mut worst = Vec::new();
    for p in prompts {
        let name = p["name"].as_str().unwrap();
        let prompt = ids(&p["prompt_ids"]);
        assert_eq!(m.tokenizer.encode(p["prompt"].as_str().unwrap(), true).unwrap(), prompt, "{name}");
        let reference = read_npy(&data(&format!("{logits_dir}/{name}.npy")));
        let mut cache = KvCache::new(m.model.config());
        let got = prefill_logits(m, &prompt, &mut cache, &mut Scratch::default());
        assert_eq!(got.len(), reference.len());
        let cos = cosine(&centered(&got), &centered(&reference));
        let shift = (got.iter().sum::<f32>() - reference.iter().sum::<f32>()) / got.len() as f32;
        let mean = got.iter().zip(&reference).map(|(a, b)| (a - b - shift).abs()).sum::<f32>() / got.len() as f32;
        let top = p["top5_first_position"][0]["id"].as_u64().unwrap() as u32;
        eprintln!(
            "{logits_dir} {name} ({} prompt tokens): cosine {cos:.6}, mean |diff| {mean:.4}, top {} vs {top}",
            prompt.len(),
            argmax(&got)
        );
        worst.push((name.to_string(), cos, argmax(&got) == argmax(&reference)));
    }
    assert!(!worst.is_empty(), "no prompts");
    let mut cosines: Vec<f64> = worst.iter().map(|w| w.1).collect();
    cosines.sort_by(f64::total_cmp);
    let median = cosines[cosines.len() / 2];
    eprintln!("{logits_dir}: median cosine {median:.6}");
    assert!(median >= 0.999, "{logits_dir}: median cosine {median}");
    for (name, cos, same_top) in worst {
        assert!(cos >= 0.997, "{logits_dir} {name}: cosine {cos}");
        assert!(same_top, "{logits_dir} {name}: top token differs");
    }
}

/// Teacher-forced argmax at every step and free-running greedy for 16 tokens, except at
/// near-ties (margins reported), as for SmolLM2.
#[test]
fn gemma3_greedy_decoding_matches_llama_cpp() {
    greedy_matches_llama_cpp(gemma3(), fixture()["prompts"].as_array().unwrap());
}

#[test]
fn gemma3_batched_decoding_equals_sequential() {
    let prompts: Vec<Vec<u32>> =
        fixture()["prompts"].as_array().unwrap().iter().take(4).map(|p| ids(&p["prompt_ids"])).collect();
    batched_equals_sequential(gemma3(), &prompts);
}

/// K-quants are packed (rewritten into the kernels' 32-value blocks) and Q5_0 read as it is,
/// not copied to f32 or widened: the weights held stay within 5% of the file (measured:
/// 1.001x; 1.08x while Q5_0 was widened to Q8_0, more with any f32 fallback).
#[test]
fn gemma3_weights_stay_packed() {
    let m = gemma3();
    let file = std::fs::metadata(gemma3_path()).unwrap().len() as f64;
    let held = m.model.weight_bytes() as f64;
    eprintln!("weights held {:.1} MiB for a {:.1} MiB file ({:.3}x)", held / 1048576.0, file / 1048576.0, held / file);
    assert!(held <= 1.05 * file, "{held} bytes of weights for a {file}-byte file");
}

/// Past the 512-token window: the sliding layers' prefill path (one pass, and chunks that
/// start mid-sequence) and decode path (one token at a time) see the same positions, so all
/// three give the same logits.
#[test]
fn gemma3_sliding_window_paths_agree() {
    let m = gemma3();
    let text = fixture()["prompts"].as_array().unwrap().iter().find(|p| p["name"] == "long").unwrap()["prompt"]
        .as_str()
        .unwrap()
        .to_string();
    let mut ids = m.tokenizer.encode(&text.repeat(3), true).unwrap();
    ids.truncate(600);
    assert_eq!(ids.len(), 600);
    let mut scratch = Scratch::default();
    let whole = prefill_logits(m, &ids, &mut KvCache::new(m.model.config()), &mut scratch);
    // Chunks of 128: later chunks attend across the window edge from the prefill path.
    let mut cache = KvCache::new(m.model.config());
    let mut chunked = Vec::new();
    for (i, c) in ids.chunks(128).enumerate() {
        let last = (i + 1) * 128 >= ids.len();
        let mut b = [SeqBatch { tokens: c, cache: &mut cache, want_logits: last }];
        chunked = m.model.forward(&mut b, &mut scratch).unwrap();
    }
    // The last 10 tokens one at a time: the decode path's window.
    let mut cache = KvCache::new(m.model.config());
    prefill_logits(m, &ids[..590], &mut cache, &mut scratch);
    let mut stepped = Vec::new();
    for t in &ids[590..] {
        let mut b = [SeqBatch { tokens: std::slice::from_ref(t), cache: &mut cache, want_logits: true }];
        stepped = m.model.forward(&mut b, &mut scratch).unwrap();
    }
    // Sliding layers (15 of 18) kept only their window: at most 512 + 15 positions each.
    let cfg = m.model.config();
    let held = cache.held_positions();
    eprintln!("positions held after 600 tokens: {held} (all layers: {})", 600 * cfg.n_layers);
    assert!(held <= 3 * 600 + 15 * (512 + 15), "{held} positions held");
    assert!(held <= cfg.kv_tokens(600) * cfg.n_layers);
    assert!(cfg.kv_tokens(600) < 600 && cfg.kv_tokens(100) == 100);
    let longest = cfg.max_len_within(cfg.kv_tokens(20_000));
    assert!(
        longest >= 20_000
            && cfg.kv_tokens(longest) == cfg.kv_tokens(20_000)
            && cfg.kv_tokens(longest + 1) > cfg.kv_tokens(20_000)
    );
    for (name, other) in [("chunked", &chunked), ("stepped", &stepped)] {
        let max = whole.iter().zip(other.iter()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let mean = whole.iter().zip(other.iter()).map(|(a, b)| (a - b).abs()).sum::<f32>() / whole.len() as f32;
        let cos = cosine(&centered(&whole), &centered(other));
        eprintln!("{name}: cosine {cos:.7}, mean |diff| {mean:.4}, max {max:.4}");
        // As for SmolLM2's chunked prefill: 8-bit activations make row groupings differ by a
        // rounding step here and there, never by a different set of positions.
        assert!(cos > 0.999 && mean < 0.25 && max < 1.5, "{name}: cosine {cos}, mean |diff| {mean}, max {max}");
        assert_eq!(argmax(&whole), argmax(other), "{name}");
    }
}

/// Resident memory of a process that has just loaded the model (a child process running
/// this test alone, so no other test's model is counted; a load allocates no KV cache).
/// The issue asks for the file's size + 15%; measured 1.31x: 240 MiB of weights (1.00x),
/// and ~74 MiB for the tokenizer, Gemma's 262,144 SentencePiece pieces rebuilt as a BPE
/// with 514,847 merges (the `tokenizers` crate's maps). 1.51x before the load handed its
/// freed heap back. The bound here, 1.4x, keeps what was won; the tokenizer is what is
/// left between it and 1.15x.
#[test]
fn gemma3_resident_memory_after_load() {
    const CHILD: &str = "RAGWAY_RSS_CHILD";
    const NAME: &str = "gemma3::gemma3_resident_memory_after_load";
    let rss = || -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let kb = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap();
        kb.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap() * 1024
    };
    match std::env::var(CHILD).as_deref() {
        Ok("load") => {
            let before = rss();
            let m = GenerativeModel::load(gemma3_path().to_str().unwrap(), &models_dir(), None).unwrap();
            println!("rss_before {before}\nrss_after {}", rss());
            drop(m);
            return;
        }
        Ok("serve") => {
            // A generation worker as `ragway serve` runs one (its handle and worker each hold
            // the tokenizer), after one request: 64 generated tokens of KV cache.
            let before = rss();
            let mut cfg = GenerateConfig::new("gemma3", gemma3_path().to_str().unwrap(), models_dir());
            cfg.max_running = 1;
            let h = GenerateWorker::spawn(cfg).unwrap();
            let prompt = h.tokenizer().encode("The capital of France is", true).unwrap();
            let mut req = GenerationRequest::new(prompt, 64, SamplingParams::greedy());
            req.ignore_eos = true;
            let mut stream = h.submit(req).unwrap();
            while let Some(ev) = stream.blocking_next() {
                if let GenEvent::Error { message } = ev {
                    panic!("{message}");
                }
            }
            println!("rss_before {before}\nrss_after {}", rss());
            return;
        }
        _ => {}
    }
    let measure = |mode: &str| -> (f64, f64) {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", NAME, "--nocapture", "--test-threads", "1"])
            .env(CHILD, mode)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
        let field = |k: &str| -> f64 {
            // The harness prints "test NAME ... " on the line the child's output starts.
            let value = text.lines().find_map(|l| l.split_once(k).map(|(_, v)| v.trim()));
            value.unwrap_or_else(|| panic!("{k} missing: {text}")).parse().unwrap()
        };
        (field("rss_before "), field("rss_after "))
    };
    let file = std::fs::metadata(gemma3_path()).unwrap().len() as f64;
    let mib = |b: f64| b / 1048576.0;
    let (before, loaded) = measure("load");
    let (_, serving) = measure("serve");
    // KV cache of 69 tokens: 18 layers x K and V x 1 head x 256 x f16.
    let kv = 69.0 * 18.0 * 2.0 * 256.0 * 2.0;
    eprintln!(
        "resident {:.1} MiB after load ({:.1} before), {:.1} MiB serving, for a {:.1} MiB file: {:.3}x, {:.3}x",
        mib(loaded),
        mib(before),
        mib(serving),
        mib(file),
        loaded / file,
        serving / file
    );
    // The bound: the file + KV cache + 15%.
    assert!(loaded <= 1.15 * file, "{loaded} bytes resident after load for a {file}-byte file");
    assert!(serving <= 1.15 * (file + kv), "{serving} bytes resident serving for a {file}-byte file");
}

//! Q5_K and Q5_1 on a real model: Gemma 3 270M with its Q4_K matrices requantized to Q5_K
//! and its Q5_0 matrices to Q5_1 by candle's reference quantizers (no file downloadable here
//! carries those types), against llama.cpp's outputs on that very file
//! (`tests/data/gemma3_q5.json`, `gemma3_q5_logits/`, made by
//! `benches/scripts/llamacpp_fixture.py`). The file is rebuilt by the test and must hash to
//! the fixture's sha256, so llama.cpp and ragway read the same bytes.

use super::common::{cosine, models_dir};
use super::gemma3::gemma3_path;
use super::generation::{data, greedy_matches_llama_cpp, ids, prefill_logits, read_npy};
use candle_core::quantized::gguf_file::{self, Content};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;
use ragway_engine::generate::sampling::argmax;
use ragway_engine::generate::{GenerativeModel, KvCache, Scratch};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// What each tensor type of the Q4_K_M file becomes; the rest is copied as it is.
fn requantized_type(t: GgmlDType) -> GgmlDType {
    match t {
        GgmlDType::Q4K => GgmlDType::Q5K,
        GgmlDType::Q5_0 => GgmlDType::Q5_1,
        other => other,
    }
}

fn fixture() -> Value {
    serde_json::from_str(&std::fs::read_to_string(data("gemma3_q5.json")).unwrap()).unwrap()
}

fn sha256_of(path: &Path) -> String {
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes the requantized file: metadata in key order, tensors in the source file's order,
/// so the bytes depend only on the source file and candle's quantizers.
pub fn write_requantized(src: &Path, dst: &Path) {
    let mut f = std::fs::File::open(src).unwrap();
    let content = Content::read(&mut f).unwrap();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort_by_key(|n| content.tensor_infos[*n].offset);
    let tensors: Vec<(String, QTensor)> = names
        .iter()
        .map(|&name| {
            let q = content.tensor(&mut f, name, &Device::Cpu).unwrap();
            let to = requantized_type(q.dtype());
            let q =
                if to == q.dtype() { q } else { QTensor::quantize(&q.dequantize(&Device::Cpu).unwrap(), to).unwrap() };
            (name.clone(), q)
        })
        .collect();
    let mut metadata: Vec<(&str, &gguf_file::Value)> = content.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    metadata.sort_by_key(|(k, _)| *k);
    let tmp = dst.with_extension("partial");
    let mut w = BufWriter::new(std::fs::File::create(&tmp).unwrap());
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, q)| (n.as_str(), q)).collect();
    gguf_file::write(&mut w, &metadata, &refs).unwrap();
    w.flush().unwrap();
    drop(w);
    std::fs::rename(&tmp, dst).unwrap();
}

/// The requantized file under the test target's scratch folder, rebuilt when missing or when
/// its hash is not the fixture's.
pub fn requantized_path() -> PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let path = dir.join("gemma-3-270m-q5.gguf");
        let want = fixture()["sha256"].as_str().unwrap().to_string();
        if !path.is_file() || sha256_of(&path) != want {
            let t = std::time::Instant::now();
            write_requantized(&gemma3_path(), &path);
            eprintln!("requantized {} in {:.1} s", path.display(), t.elapsed().as_secs_f32());
        }
        let got = sha256_of(&path);
        assert_eq!(
            got,
            want,
            "{} is not the file llama.cpp's outputs were recorded on (did candle's quantizers change?)",
            path.display()
        );
        path
    })
    .clone()
}

fn gemma3_q5() -> &'static GenerativeModel {
    static M: OnceLock<GenerativeModel> = OnceLock::new();
    M.get_or_init(|| {
        GenerativeModel::load(requantized_path().to_str().unwrap(), &models_dir(), None)
            .expect("load the requantized Gemma 3")
    })
}

fn centered(v: &[f32]) -> Vec<f32> {
    let m = v.iter().sum::<f32>() / v.len() as f32;
    v.iter().map(|x| x - m).collect()
}

/// The file holds Q5_K and Q5_1 matrices (beside the Q6_K, Q8_0 and F32 tensors it kept),
/// and they stay packed: Q5_K becomes Q5_1 (6 bits per weight for 5.5), so the weights held
/// stay within the 15% of the file.
#[test]
fn requantized_gemma3_holds_q5_k_and_q5_1_and_stays_packed() {
    let path = requantized_path();
    let mut f = std::fs::File::open(&path).unwrap();
    let content = Content::read(&mut f).unwrap();
    let mut types: Vec<String> = content.tensor_infos.values().map(|t| format!("{:?}", t.ggml_dtype)).collect();
    types.sort();
    types.dedup();
    assert_eq!(types, ["F32", "Q5K", "Q5_1", "Q6K", "Q8_0"], "tensor types");
    let m = gemma3_q5();
    let file = std::fs::metadata(&path).unwrap().len() as f64;
    let held = m.model.weight_bytes() as f64;
    eprintln!("weights held {:.1} MiB for a {:.1} MiB file ({:.3}x)", held / 1048576.0, file / 1048576.0, held / file);
    assert!(held <= 1.15 * file, "{held} bytes of weights for a {file}-byte file");
}

/// First-position logits against llama.cpp's on the same file: cosine after centering (the
/// bound of the Q4_K_M file's test) and the same top token.
#[test]
fn requantized_gemma3_logits_match_llama_cpp() {
    let m = gemma3_q5();
    let mut worst = Vec::new();
    for p in fixture()["prompts"].as_array().unwrap() {
        let name = p["name"].as_str().unwrap();
        let prompt = ids(&p["prompt_ids"]);
        assert_eq!(m.tokenizer.encode(p["prompt"].as_str().unwrap(), true).unwrap(), prompt, "{name}");
        let reference = read_npy(&data(&format!("gemma3_q5_logits/{name}.npy")));
        let got = prefill_logits(m, &prompt, &mut KvCache::new(m.model.config()), &mut Scratch::default());
        assert_eq!(got.len(), reference.len());
        let cos = cosine(&centered(&got), &centered(&reference));
        eprintln!(
            "{name} ({} prompt tokens): cosine {cos:.6}, top {} vs {}",
            prompt.len(),
            argmax(&got),
            argmax(&reference)
        );
        worst.push((name.to_string(), cos, argmax(&got) == argmax(&reference)));
    }
    assert!(!worst.is_empty());
    for (name, cos, same_top) in worst {
        assert!(cos >= 0.998, "{name}: cosine {cos}");
        assert!(same_top, "{name}: top token differs");
    }
}

/// Teacher-forced and free-running greedy tokens against llama.cpp's, as for the Q4_K_M file.
#[test]
fn requantized_gemma3_greedy_decoding_matches_llama_cpp() {
    greedy_matches_llama_cpp(gemma3_q5(), fixture()["prompts"].as_array().unwrap());
}

//! Block types no file downloadable here carries, on a real model: Gemma 3 270M Q4_K_M
//! requantized by candle's reference quantizers, against llama.cpp's outputs on that very
//! file (`tests/data/gemma3_<variant>.json`, `gemma3_<variant>_logits/`, made by
//! `benches/scripts/llamacpp_fixture.py`). Each file is rebuilt by the test and must hash to
//! its fixture's sha256, so llama.cpp and ragway read the same bytes.
//!
//! - `q5`: Q4_K → Q5_K, Q5_0 → Q5_1 (the rest as downloaded: Q6_K, Q8_0, F32).
//! - `q23`, as a Q2_K/Q3_K_M file mixes them: attention outputs and the Q6_K MLP down
//!   projections → Q3_K, the Q4_K down projections → Q2_K, Q5_0 → Q4_0 (width 640 is not a
//!   multiple of a K-quant's 256, hence Q4_0 there, as llama.cpp falls back too).

use super::common::models_dir;
use super::gemma3::{first_position_logits_match_llama_cpp, gemma3_path};
use super::generation::{data, greedy_matches_llama_cpp};
use candle_core::quantized::gguf_file::{self, Content};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;
use ragway_engine::generate::GenerativeModel;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

#[derive(Clone, Copy)]
struct Variant {
    name: &'static str,
    /// What a tensor of the Q4_K_M file (name, type) becomes.
    retype: fn(&str, GgmlDType) -> GgmlDType,
    /// The tensor types the file ends up with.
    types: &'static [&'static str],
}

const Q5: Variant = Variant {
    name: "q5",
    retype: |_, t| match t {
        GgmlDType::Q4K => GgmlDType::Q5K,
        GgmlDType::Q5_0 => GgmlDType::Q5_1,
        other => other,
    },
    types: &["F32", "Q5K", "Q5_1", "Q6K", "Q8_0"],
};

const Q23: Variant = Variant {
    name: "q23",
    retype: |name, t| match t {
        GgmlDType::Q4K if name.ends_with("ffn_down.weight") => GgmlDType::Q2K,
        GgmlDType::Q4K | GgmlDType::Q6K => GgmlDType::Q3K,
        GgmlDType::Q5_0 => GgmlDType::Q4_0,
        other => other,
    },
    types: &["F32", "Q2K", "Q3K", "Q4_0", "Q8_0"],
};

fn fixture(v: Variant) -> Value {
    serde_json::from_str(&std::fs::read_to_string(data(&format!("gemma3_{}.json", v.name))).unwrap()).unwrap()
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
fn write_requantized(src: &Path, dst: &Path, retype: fn(&str, GgmlDType) -> GgmlDType) {
    let mut f = std::fs::File::open(src).unwrap();
    let content = Content::read(&mut f).unwrap();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort_by_key(|n| content.tensor_infos[*n].offset);
    let tensors: Vec<(String, QTensor)> = names
        .iter()
        .map(|&name| {
            let q = content.tensor(&mut f, name, &Device::Cpu).unwrap();
            let to = retype(name, q.dtype());
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
fn requantized_path(v: Variant) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("gemma-3-270m-{}.gguf", v.name));
    let want = fixture(v)["sha256"].as_str().unwrap().to_string();
    if !path.is_file() || sha256_of(&path) != want {
        let t = std::time::Instant::now();
        write_requantized(&gemma3_path(), &path, v.retype);
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
}

/// The variant's file and model, built once per test binary.
fn model(v: Variant) -> &'static (PathBuf, GenerativeModel) {
    static Q5_MODEL: OnceLock<(PathBuf, GenerativeModel)> = OnceLock::new();
    static Q23_MODEL: OnceLock<(PathBuf, GenerativeModel)> = OnceLock::new();
    let cell = if v.name == Q5.name { &Q5_MODEL } else { &Q23_MODEL };
    cell.get_or_init(|| {
        let path = requantized_path(v);
        let m = GenerativeModel::load(path.to_str().unwrap(), &models_dir(), None)
            .unwrap_or_else(|e| panic!("load the {} Gemma 3: {e}", v.name));
        (path, m)
    })
}

/// The file holds the variant's types, and they stay packed, not copied to f32: the weights
/// within the 15% of the file — the Q5 file's measured 0.991x, the Q2_K/Q3_K file's
/// 1.003x (Q3_K and Q2_K read at 4 bits a weight for 3.4 and 2.6; its Q8_0 embedding is
/// most of the file).
fn holds_its_types_and_stays_packed(v: Variant, bound: f64) {
    let (path, m) = model(v);
    let mut f = std::fs::File::open(path).unwrap();
    let content = Content::read(&mut f).unwrap();
    let mut types: Vec<String> = content.tensor_infos.values().map(|t| format!("{:?}", t.ggml_dtype)).collect();
    types.sort();
    types.dedup();
    assert_eq!(types, v.types, "tensor types");
    let file = std::fs::metadata(path).unwrap().len() as f64;
    let held = m.model.weight_bytes() as f64;
    eprintln!(
        "{}: weights held {:.1} MiB for a {:.1} MiB file ({:.3}x)",
        v.name,
        held / 1048576.0,
        file / 1048576.0,
        held / file
    );
    assert!(held <= bound * file, "{held} bytes of weights for a {file}-byte file");
}

#[test]
fn q5_k_and_q5_1_gemma3_holds_its_types_and_stays_packed() {
    holds_its_types_and_stays_packed(Q5, 1.15);
}

/// First-position logits against llama.cpp's on the same file, as for the Q4_K_M file.
#[test]
fn q5_k_and_q5_1_gemma3_logits_match_llama_cpp() {
    first_position_logits_match_llama_cpp(&model(Q5).1, fixture(Q5)["prompts"].as_array().unwrap(), "gemma3_q5_logits");
}

/// Teacher-forced and free-running greedy tokens against llama.cpp's, as for the Q4_K_M file.
#[test]
fn q5_k_and_q5_1_gemma3_greedy_decoding_matches_llama_cpp() {
    greedy_matches_llama_cpp(&model(Q5).1, fixture(Q5)["prompts"].as_array().unwrap());
}

#[test]
fn q2_k_q3_k_and_q4_0_gemma3_holds_its_types_and_stays_packed() {
    holds_its_types_and_stays_packed(Q23, 1.15);
}

#[test]
fn q2_k_q3_k_and_q4_0_gemma3_logits_match_llama_cpp() {
    first_position_logits_match_llama_cpp(
        &model(Q23).1,
        fixture(Q23)["prompts"].as_array().unwrap(),
        "gemma3_q23_logits",
    );
}

#[test]
fn q2_k_q3_k_and_q4_0_gemma3_greedy_decoding_matches_llama_cpp() {
    greedy_matches_llama_cpp(&model(Q23).1, fixture(Q23)["prompts"].as_array().unwrap());
}

//! Criterion benches of Gemma 3's SentencePiece vocabulary (262,144 pieces, from the GGUF
//! that `scripts/setup-models.sh --with-gemma3` fetches): ragway's compact tokenizer, which
//! serving uses, against the same vocabulary rebuilt as a `tokenizers` BPE, in the same run —
//! building each from the file's metadata, and encoding 64 passages (~1,000 characters
//! each). Run with `cargo bench -p ragway-benches --bench tokenize`.

use candle_core::quantized::gguf_file::Content;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ragway_benches::{load_jsonl_texts, workspace_root};
use ragway_engine::generate::TextTokenizer;

fn tokenize(c: &mut Criterion) {
    let models = std::env::var_os("RAGWAY_MODELS_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("models"));
    let path = models.join("gemma-3-270m/gemma-3-270m-q4_k_m.gguf");
    let mut f = std::fs::File::open(&path).expect("run scripts/setup-models.sh --with-gemma3 first");
    let content = Content::read(&mut f).expect("a GGUF file");
    let passages = load_jsonl_texts(&workspace_root().join("benches/data/st_corpus_1000.jsonl")).unwrap();
    let texts: Vec<&str> = passages.iter().take(64).map(String::as_str).collect();
    let bytes: usize = texts.iter().map(|t| t.len()).sum();

    let mut group = c.benchmark_group("tokenizer_build");
    group.sample_size(10);
    group.bench_function("compact", |b| b.iter(|| TextTokenizer::from_gguf(&content).unwrap()));
    group.bench_function("tokenizers_bpe", |b| b.iter(|| TextTokenizer::sentencepiece_as_bpe(&content).unwrap()));
    group.finish();

    let compact = TextTokenizer::from_gguf(&content).unwrap();
    let bpe = TextTokenizer::sentencepiece_as_bpe(&content).unwrap();
    let mut group = c.benchmark_group("tokenize_passages_x64");
    group.throughput(Throughput::Bytes(bytes as u64));
    group.bench_function("compact", |b| {
        b.iter(|| texts.iter().map(|t| compact.encode(t, false).unwrap().len()).sum::<usize>())
    });
    group.bench_function("tokenizers_bpe", |b| {
        b.iter(|| texts.iter().map(|t| bpe.encode_fast(*t, false).unwrap().len()).sum::<usize>())
    });
    group.finish();
}

criterion_group!(benches, tokenize);
criterion_main!(benches);

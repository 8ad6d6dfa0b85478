//! Criterion benches of the embedder: a batch of passages (~176 tokens) and a batch of
//! short queries, reported as texts/s. The side-by-side comparison with
//! sentence-transformers is the `embed-bench` driver (`src/bin/embed_bench.rs`).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ragway_benches::{load_jsonl_texts, short_queries, workspace_root};
use ragway_engine::embed::{Embedder, EmbedderOptions};

fn embed(c: &mut Criterion) {
    let models = std::env::var_os("RAGWAY_MODELS_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("models"));
    let embedder = Embedder::load(&models.join("all-MiniLM-L6-v2"), EmbedderOptions::default())
        .expect("run scripts/setup-models.sh first");
    let passages = load_jsonl_texts(&workspace_root().join("benches/data/st_corpus_1000.jsonl")).unwrap();
    let queries = short_queries(&passages);
    let mut group = c.benchmark_group("embed");
    group.sample_size(10);
    // (name, texts) shape table.
    let shapes: [(&str, Vec<&str>); 2] = [
        ("passages_x64", passages.iter().take(64).map(String::as_str).collect()),
        ("queries_x256", queries.iter().take(256).map(String::as_str).collect()),
    ];
    for (name, texts) in &shapes {
        group.throughput(Throughput::Elements(texts.len() as u64));
        group.bench_function(*name, |b| b.iter(|| embedder.embed(texts).unwrap()));
    }
    group.finish();
}

criterion_group!(benches, embed);
criterion_main!(benches);

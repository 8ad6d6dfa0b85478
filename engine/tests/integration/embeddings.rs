//! all-MiniLM-L6-v2 against sentence-transformers' own outputs (tests/data/embeddings_minilm.json,
//! copied from the shared fixtures: 26 texts incl. empty, non-ASCII, emoji and >256 pieces).

use crate::common::{cosine, max_abs_diff, minilm};
use ragway_engine::embed::{EmbedInput, Embedder, EmbedderOptions, Pooling};
use serde_json::Value;

struct Item {
    name: String,
    text: String,
    token_ids: Vec<u32>,
    untruncated: usize,
    truncated: bool,
    embedding: Vec<f32>,
}

fn fixture() -> Vec<Item> {
    let raw = include_str!("../data/embeddings_minilm.json");
    let v: Value = serde_json::from_str(raw).unwrap();
    v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|it| Item {
            name: it["name"].as_str().unwrap().to_string(),
            text: it["text"].as_str().unwrap().to_string(),
            token_ids: it["token_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect(),
            untruncated: it["num_tokens_untruncated"].as_u64().unwrap() as usize,
            truncated: it["truncated"].as_bool().unwrap(),
            embedding: it["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect(),
        })
        .collect()
}

#[test]
fn reads_sentence_transformers_config() {
    let e = minilm();
    assert_eq!(e.dim(), 384);
    assert_eq!(e.max_seq_length(), 256);
    assert_eq!(e.sentence_config().pooling, Pooling::Mean);
    assert!(e.sentence_config().normalize);
}

#[test]
fn token_ids_match_sentence_transformers() {
    let e = minilm();
    let items = fixture();
    assert_eq!(items.len(), 26);
    for it in &items {
        let t = e.tokenize(&EmbedInput::Text(it.text.clone())).unwrap();
        assert_eq!(t.ids, it.token_ids, "token ids of {}", it.name);
        assert_eq!(t.truncated(), it.truncated, "truncation flag of {}", it.name);
        assert_eq!(t.untruncated_len, it.untruncated, "untruncated length of {}", it.name);
    }
}

fn check_all(out: &[ragway_engine::embed::Embedding], items: &[Item]) {
    for (got, it) in out.iter().zip(items) {
        let cos = cosine(&got.vector, &it.embedding);
        let diff = max_abs_diff(&got.vector, &it.embedding);
        assert!(cos >= 0.9999 && diff <= 1e-4, "{}: cosine {cos}, max abs diff {diff}", it.name);
        assert_eq!(got.num_tokens, it.token_ids.len(), "{}", it.name);
        assert_eq!(got.truncated, it.truncated, "{}", it.name);
    }
}

#[test]
fn embeddings_match_sentence_transformers_batched() {
    let items = fixture();
    let texts: Vec<&str> = items.iter().map(|i| i.text.as_str()).collect();
    let out = minilm().embed(&texts).unwrap();
    check_all(&out, &items);
    // The two long texts share their first 254 pieces: truncation makes them identical.
    let a = items.iter().position(|i| i.untruncated == 489).unwrap();
    let b = items.iter().position(|i| i.untruncated == 493).unwrap();
    assert_eq!(out[a].vector, out[b].vector);
}

#[test]
fn embeddings_match_sentence_transformers_one_by_one() {
    let items = fixture();
    let out: Vec<_> = items.iter().map(|it| minilm().embed(&[it.text.as_str()]).unwrap().remove(0)).collect();
    check_all(&out, &items);
}

#[test]
fn token_id_inputs_equal_text_inputs() {
    let e = minilm();
    let text = "Hybrid retrieval fuses BM25 with dense vectors.";
    let raw = e.tokenizer().encode(text, false).unwrap().get_ids().to_vec();
    let from_ids = e.embed_tokenized(&[e.tokenize(&EmbedInput::Tokens(raw)).unwrap()]).unwrap();
    let from_text = e.embed(&[text]).unwrap();
    assert_eq!(from_ids[0].vector, from_text[0].vector);
}

#[test]
fn batch_composition_does_not_change_embeddings() {
    let e = minilm();
    let target = "Batching must not change what a text means.";
    let alone = e.embed(&[target]).unwrap().remove(0).vector;
    let long = "word ".repeat(300);
    let neighbours: Vec<String> =
        (0..40).map(|i| format!("neighbour sentence number {i} {}", "x ".repeat(i))).collect();
    let mut batch: Vec<&str> = neighbours.iter().map(String::as_str).collect();
    batch.insert(17, target);
    batch.push(&long);
    let in_batch = e.embed(&batch).unwrap().remove(17).vector;
    let diff = max_abs_diff(&alone, &in_batch);
    assert!(diff <= 1e-5, "max abs diff {diff}");
    // Small token budgets split the same inputs into many batches: same results.
    let small = Embedder::load(
        &crate::common::minilm_dir(),
        EmbedderOptions { max_batch_tokens: 64, max_batch_size: 3, ..Default::default() },
    )
    .unwrap();
    let split = small.embed(&batch).unwrap();
    let full = e.embed(&batch).unwrap();
    for (a, b) in split.iter().zip(&full) {
        assert!(max_abs_diff(&a.vector, &b.vector) <= 1e-5);
    }
}

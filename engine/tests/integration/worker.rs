//! The model thread behind its async handle: ordering, cross-request batching, errors.

use crate::common::{max_abs_diff, minilm, models_dir};
use ragway_engine::embed::worker::{EmbedWorker, EmbedWorkerConfig};
use ragway_engine::embed::{EmbedInput, EmbedderOptions};
use ragway_engine::EngineError;

fn config(queue: usize) -> EmbedWorkerConfig {
    EmbedWorkerConfig {
        model_id: "all-MiniLM-L6-v2".into(),
        source: "sentence-transformers/all-MiniLM-L6-v2".into(),
        models_dir: models_dir(),
        options: EmbedderOptions::default(),
        queue_capacity: queue,
        max_inputs_per_request: 64,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_get_their_own_results_in_order() {
    let handle = EmbedWorker::spawn(config(64)).unwrap();
    let texts: Vec<Vec<String>> =
        (0..12).map(|r| (0..(r % 4 + 1)).map(|i| format!("request {r} input {i} about rust")).collect()).collect();
    let tasks: Vec<_> = texts
        .iter()
        .cloned()
        .map(|t| {
            let h = handle.clone();
            tokio::spawn(async move { h.embed(t.into_iter().map(EmbedInput::Text).collect()).await })
        })
        .collect();
    for (t, task) in texts.iter().zip(tasks) {
        let got = task.await.unwrap().unwrap();
        assert_eq!(got.len(), t.len());
        for (g, text) in got.iter().zip(t) {
            let want = minilm().embed(&[text.as_str()]).unwrap().remove(0).vector;
            assert!(max_abs_diff(&g.vector, &want) <= 1e-5, "{text}");
        }
    }
}

#[tokio::test]
async fn bad_input_is_a_user_error() {
    let handle = EmbedWorker::spawn(config(4)).unwrap();
    let e = handle.embed(vec![]).await.unwrap_err();
    assert!(matches!(e, EngineError::EmptyInput) && e.is_user_error());
    let e = handle.embed(vec!["ok".into(), "".into()]).await.unwrap_err();
    assert!(matches!(e, EngineError::EmptyText { index: 1 }), "{e}");
    let e = handle.embed(vec![EmbedInput::Tokens(vec![101, 999_999])]).await.unwrap_err();
    assert!(matches!(e, EngineError::InvalidTokenId { token_id: 999_999, .. }), "{e}");
    let many: Vec<EmbedInput> = (0..65).map(|i| EmbedInput::Text(format!("t{i}"))).collect();
    assert!(matches!(handle.embed(many).await.unwrap_err(), EngineError::TooManyInputs { got: 65, max: 64 }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_is_refused_at_once() {
    let handle = EmbedWorker::spawn(config(1)).unwrap();
    let big: Vec<EmbedInput> = (0..64).map(|i| EmbedInput::Text(format!("{i} {}", "long text ".repeat(100)))).collect();
    let tokenized = handle.embedder().tokenize_checked(&big).unwrap();
    // Keep the worker busy, fill the one queue slot, then one more must be refused.
    let mut pending = Vec::new();
    let mut refused = 0;
    for _ in 0..8 {
        let h = handle.clone();
        let t = tokenized.clone();
        pending.push(tokio::spawn(async move { h.embed_tokenized(t).await }));
    }
    for p in pending {
        match p.await.unwrap() {
            Ok(v) => assert_eq!(v.len(), 64),
            Err(EngineError::QueueFull { capacity: 1, .. }) => refused += 1,
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert!(refused > 0, "a queue of 1 took 8 concurrent requests");
}

#[test]
fn load_failure_is_reported_at_spawn() {
    let mut c = config(4);
    c.source = std::env::temp_dir().join("ragway-no-such-model-dir").to_string_lossy().into_owned();
    let empty = tempfile::tempdir().unwrap();
    c.models_dir = empty.path().to_path_buf();
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let err = EmbedWorker::spawn(c).err().expect("missing model must fail");
    assert!(matches!(err, EngineError::ModelNotFound { .. }), "{err}");
}

//! The runner's bookkeeping with a rule-based system under test (no models): judge-based
//! context metrics when a dataset names no gold documents, SQuAD 2.0 no-answer scoring,
//! unparseable verdicts counted and kept out of the means, and resuming past a torn line.
//! The real-model paths are covered by the gateway's end-to-end tests.

use anyhow::Result;
use ragway_eval::backend::{Answerer, Chat, Passage, RagOutput, Retriever, SearchOptions, System, TextEmbedder};
use ragway_eval::runner::{self, EvalKind, Progress, RunContext, RunSpec};
use ragway_index::SearchMode;
use ragway_prompts::{Message, Registry};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Answers from a fixed table; the passages are two sentences, one holding the answer.
struct TableAnswerer;

impl Answerer for TableAnswerer {
    fn answer(&self, question: &str) -> Result<RagOutput> {
        let (answer, dont_know) = match question {
            "Where is Paris?" => ("Paris is in France.", false),
            "Who wrote Hamlet?" => ("Hamlet was written by Marlowe.", false),
            _ => ("", true),
        };
        Ok(RagOutput {
            answer: answer.into(),
            dont_know,
            abstained: dont_know,
            contexts: vec![
                Passage { doc_id: "d1".into(), text: "Bread is made of flour.".into(), cited: false },
                Passage { doc_id: "d2".into(), text: "Paris is in France. Hamlet was written by Shakespeare.".into(), cited: true },
            ],
            grounding_score: None,
            flagged: None,
            template: "table".into(),
            prompt_tokens: 0,
            completion_tokens: 0,
        })
    }
    fn describe(&self) -> Value {
        json!("table")
    }
}

/// A judge by substring: "No" (supported) when the answer's words all occur in the
/// knowledge; "Maybe" (unparseable) for answers mentioning Marlowe.
struct SubstringJudge(AtomicUsize);

impl Chat for SubstringJudge {
    fn complete(&self, messages: &[Message], _: usize) -> Result<String> {
        self.0.fetch_add(1, Ordering::Relaxed);
        let user = &messages.last().unwrap().content;
        // The template's user message: "Knowledge: ...\nQuestion: ...\nAnswer: ...\n...".
        let between = |a: &str, b: &str| {
            let start = user.find(a).unwrap() + a.len();
            let end = user[start..].find(b).map_or(user.len(), |e| start + e);
            user[start..end].trim().to_lowercase()
        };
        let (knowledge, answer) = (between("Knowledge:", "\nQuestion:"), between("Answer:", "\n"));
        if answer.contains("marlowe") {
            return Ok("Maybe".into());
        }
        let supported = answer.trim_end_matches('.').split_whitespace().all(|w| knowledge.contains(w));
        Ok(if supported { "No" } else { "Yes" }.into())
    }
    fn describe(&self) -> Value {
        json!("substring")
    }
}

struct Words;

impl TextEmbedder for Words {
    fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        Ok(texts.iter().map(|t| vec![t.len() as f32, 1.0]).collect())
    }
}

struct Rules {
    chat: Arc<SubstringJudge>,
    registry: Arc<Registry>,
}

impl System for Rules {
    fn collection_for(&self, _: &Path, _: &Progress) -> Result<String> {
        Ok("rules".into())
    }
    fn retriever(&self, _: &str, _: SearchOptions) -> Result<Arc<dyn Retriever>> {
        anyhow::bail!("no retrieval here")
    }
    fn answerer(&self, _: &str, _: SearchMode, _: usize, _: Option<String>, _: Option<String>) -> Result<Arc<dyn Answerer>> {
        Ok(Arc::new(TableAnswerer))
    }
    fn chat(&self) -> Result<Arc<dyn Chat>> {
        Ok(self.chat.clone())
    }
    fn embedder(&self) -> Result<Arc<dyn TextEmbedder>> {
        Ok(Arc::new(Words))
    }
    fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }
    fn describe(&self) -> Value {
        json!("rules")
    }
}

#[test]
fn judge_based_context_metrics_no_answer_scoring_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("qa.jsonl");
    std::fs::write(
        &ds,
        "{\"id\":\"paris\",\"question\":\"Where is Paris?\",\"answers\":[\"France\"]}\n\
         {\"id\":\"hamlet\",\"question\":\"Who wrote Hamlet?\",\"answers\":[\"Shakespeare\"]}\n\
         {\"id\":\"none\",\"question\":\"What is the moon made of?\",\"answers\":[]}\n",
    )
    .unwrap();
    let system = Rules { chat: Arc::new(SubstringJudge(AtomicUsize::new(0))), registry: Arc::new(Registry::open(&[], None).unwrap()) };
    let mut spec = RunSpec::new(EvalKind::Rag, ds.clone());
    spec.collection = Some("rules".into());
    spec.concurrency = 2;
    let out = dir.path().join("run");
    let progress = Progress::default();
    let s = runner::run(&spec, RunContext { system: &system, progress: &progress }, &out).unwrap();
    let recs: Vec<Value> = std::fs::read_to_string(out.join("samples.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(recs.iter().map(|r| r["id"].as_str().unwrap()).collect::<Vec<_>>(), vec!["paris", "hamlet", "none"]);
    let m = |id: &str| recs.iter().find(|r| r["id"] == id).unwrap()["metrics"].clone();

    // Paris: the gold answer is supported by d2 only → context precision 1/2 at rank 2.
    assert_eq!(m("paris")["context_precision"], 0.5);
    assert_eq!(m("paris")["context_recall"], 1.0);
    assert_eq!(m("paris")["faithfulness"], 1.0);
    // "Paris is in France." vs "France": normalized tokens {paris, is, in, france} vs {france}.
    assert!((m("paris")["f1"].as_f64().unwrap() - 0.4).abs() < 1e-12);
    assert_eq!(m("paris")["has_ans_f1"], m("paris")["f1"]);
    // Hamlet: its one statement draws an unparseable verdict: no faithfulness, counted.
    assert!(m("hamlet").get("faithfulness").is_none());
    assert_eq!(recs[1]["judge"]["unparseable"], 1);
    // The unanswerable question, abstained: the empty prediction scores 1 (SQuAD 2.0).
    assert_eq!(m("none")["exact_match"], 1.0);
    assert_eq!(m("none")["no_ans_exact_match"], 1.0);
    assert_eq!(m("none")["answer_relevancy"], 0.0);
    assert!(m("none").get("context_recall").is_none(), "no gold answer to judge with");

    assert_eq!(s["n"], 3);
    assert_eq!(s["faithfulness"], 1.0);
    assert_eq!(s["n_by_metric"]["faithfulness"], 1);
    assert_eq!(s["judge"]["unparseable"], 1);
    let calls = s["judge"]["calls"].as_u64().unwrap();
    assert_eq!(calls as usize, system.chat.0.load(Ordering::Relaxed));
    assert!((s["exact_match"].as_f64().unwrap() - 1.0 / 3.0).abs() < 1e-12);

    // A crash mid-append leaves a torn line: the rerun keeps the whole records, reruns the
    // rest, and ends with the same summary.
    let text = std::fs::read_to_string(out.join("samples.jsonl")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    std::fs::write(out.join("samples.jsonl"), format!("{}\n{}", lines[0], &lines[1][..lines[1].len() / 2])).unwrap();
    let before = system.chat.0.load(Ordering::Relaxed);
    let progress = Progress::default();
    let again = runner::run(&spec, RunContext { system: &system, progress: &progress }, &out).unwrap();
    assert_eq!(again["run"]["cached"], 1);
    assert!(system.chat.0.load(Ordering::Relaxed) > before);
    for k in ["exact_match", "f1", "faithfulness", "context_precision", "context_recall"] {
        assert_eq!(again[k], s[k], "{k}");
    }
    assert_eq!(std::fs::read_to_string(out.join("samples.jsonl")).unwrap().lines().count(), 3);
}

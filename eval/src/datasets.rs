//! Dataset loaders. Every malformed line is reported with its file and line number.
//!
//! - Retrieval: BEIR (`corpus.jsonl`, `queries.jsonl`, `qrels/<split>.tsv`); the corpus is
//!   streamed (it goes to the ingestion pipeline as a file), queries and qrels are read.
//! - QA / RAG: JSONL with `question` and gold `answers` (or `answer`), optional `id`,
//!   `context` and relevant `doc_ids`; SQuAD v1.1 / v2.0 JSON; HaluEval QA JSONL
//!   (`knowledge`, `question`, `right_answer`, `hallucinated_answer`).

use crate::retrieval::{load_qrels, Qrels};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path}: {count} malformed line(s): {}", lines.iter().map(|(l, m)| format!("line {l}: {m}")).collect::<Vec<_>>().join("; "))]
    Malformed { path: String, count: usize, lines: Vec<(usize, String)> },
    #[error("{0}")]
    Invalid(String),
}

type Result<T> = std::result::Result<T, DatasetError>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DatasetError + '_ {
    move |source| DatasetError::Io { path: path.display().to_string(), source }
}

/// Reads JSON lines, giving each object to `parse`; gathers the failures with line numbers
/// (the first 20 are listed) and fails if there were any.
pub fn read_jsonl<T>(path: &Path, mut parse: impl FnMut(Value) -> std::result::Result<T, String>) -> Result<Vec<T>> {
    let file = std::fs::File::open(path).map_err(io(path))?;
    let mut out = Vec::new();
    let mut bad: Vec<(usize, String)> = Vec::new();
    let mut count = 0;
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(io(path))?;
        if line.trim().is_empty() {
            continue;
        }
        let parsed = serde_json::from_str::<Value>(&line).map_err(|e| format!("invalid JSON: {e}")).and_then(|v| {
            if v.is_object() {
                parse(v)
            } else {
                Err("expected a JSON object".to_string())
            }
        });
        match parsed {
            Ok(t) => out.push(t),
            Err(m) => {
                count += 1;
                if bad.len() < 20 {
                    bad.push((i + 1, m));
                }
            }
        }
    }
    if count > 0 {
        return Err(DatasetError::Malformed { path: path.display().to_string(), count, lines: bad });
    }
    Ok(out)
}

fn string_field(v: &Value, key: &str) -> std::result::Result<String, String> {
    match &v[key] {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Null => Err(format!("missing `{key}`")),
        _ => Err(format!("`{key}` must be a string")),
    }
}

fn opt_string(v: &Value, key: &str) -> Option<String> {
    match &v[key] {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[derive(Debug, Clone)]
pub struct Query {
    pub id: String,
    pub text: String,
}

/// A BEIR dataset: the queries of one split that have judgements, and the corpus file.
#[derive(Debug)]
pub struct Beir {
    pub corpus: PathBuf,
    pub queries: Vec<Query>,
    pub qrels: Qrels,
    pub split: String,
}

/// A BEIR split names a file `qrels/<split>.tsv`: a plain name, never a path.
pub fn valid_split(split: &str) -> bool {
    !split.is_empty()
        && split.len() <= 64
        && split.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

pub fn load_beir(dir: &Path, split: &str) -> Result<Beir> {
    if !valid_split(split) {
        return Err(DatasetError::Invalid(format!(
            "split `{}` must be 1 to 64 letters, digits, `-` or `_` (it names qrels/<split>.tsv)",
            split.escape_debug()
        )));
    }
    let corpus = dir.join("corpus.jsonl");
    if !corpus.is_file() {
        return Err(DatasetError::Invalid(format!(
            "{} is not a BEIR dataset folder: {} is missing",
            dir.display(),
            corpus.display()
        )));
    }
    let qrels_path = dir.join("qrels").join(format!("{split}.tsv"));
    let qrels = load_qrels(&qrels_path).map_err(io(&qrels_path))?;
    let queries_path = dir.join("queries.jsonl");
    let all = read_jsonl(&queries_path, |v| Ok(Query { id: string_field(&v, "_id")?, text: string_field(&v, "text")? }))?;
    let mut queries: Vec<Query> = all.into_iter().filter(|q| qrels.contains_key(&q.id)).collect();
    queries.sort_by(|a, b| natural(&a.id, &b.id));
    let missing = qrels.keys().filter(|q| !queries.iter().any(|x| &x.id == *q)).count();
    if missing > 0 {
        tracing::warn!(missing, "judged queries missing from queries.jsonl");
    }
    Ok(Beir { corpus, queries, qrels, split: split.to_string() })
}

/// Orders ids numerically when both are numbers, else as strings.
fn natural(a: &str, b: &str) -> std::cmp::Ordering {
    match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(x), Ok(y)) => x.cmp(&y),
        _ => a.cmp(b),
    }
}

/// One QA item.
#[derive(Debug, Clone, Default)]
pub struct QaItem {
    pub id: String,
    pub question: String,
    /// Gold answers; empty for an unanswerable (SQuAD 2.0) question.
    pub answers: Vec<String>,
    /// Documents that hold the answer (for ID-based context precision / recall).
    pub doc_ids: Vec<String>,
    /// HaluEval: the knowledge and the hallucinated answer.
    pub knowledge: Option<String>,
    pub hallucinated_answer: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QaFormat {
    Jsonl,
    Squad,
    HaluEval,
}

/// A QA dataset and the corpus its contexts make (documents `{_id, title, text}`).
#[derive(Debug)]
pub struct Qa {
    pub format: QaFormat,
    pub items: Vec<QaItem>,
    pub corpus: Vec<Value>,
    /// True when some questions are unanswerable (SQuAD 2.0 scoring applies).
    pub has_unanswerable: bool,
}

impl Qa {
    /// Writes the corpus as BEIR JSONL (what the ingestion pipeline reads).
    pub fn write_corpus(&self, path: &Path) -> std::io::Result<()> {
        let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
        for d in &self.corpus {
            writeln!(f, "{d}")?;
        }
        f.flush()
    }
}

/// Reads a QA dataset, telling SQuAD JSON, HaluEval QA and plain QA JSONL apart.
pub fn load_qa(path: &Path) -> Result<Qa> {
    let mut head = String::new();
    {
        let f = std::fs::File::open(path).map_err(io(path))?;
        std::io::BufReader::new(f).read_line(&mut head).map_err(io(path))?;
    }
    let first: Option<Value> = serde_json::from_str(head.trim()).ok();
    if first.as_ref().is_some_and(|v| v.get("data").is_some()) || (first.is_none() && head.trim_start().starts_with('{') && is_squad(path)) {
        return load_squad(path);
    }
    if first.as_ref().is_some_and(|v| v.get("right_answer").is_some()) {
        return load_halueval(path);
    }
    load_qa_jsonl(path)
}

fn is_squad(path: &Path) -> bool {
    std::fs::read_to_string(path).ok().and_then(|t| serde_json::from_str::<Value>(&t).ok()).is_some_and(|v| v.get("data").is_some())
}

fn load_halueval(path: &Path) -> Result<Qa> {
    let mut i = 0usize;
    let raw = read_jsonl(path, |v| {
        let item = QaItem {
            id: format!("halu-{i}"),
            question: string_field(&v, "question")?,
            answers: vec![string_field(&v, "right_answer")?],
            doc_ids: vec![format!("halu-{i}")],
            knowledge: Some(string_field(&v, "knowledge")?),
            hallucinated_answer: Some(string_field(&v, "hallucinated_answer")?),
        };
        i += 1;
        Ok(item)
    })?;
    let corpus = raw
        .iter()
        .map(|it| json!({"_id": it.id, "title": "", "text": it.knowledge.clone().unwrap_or_default()}))
        .collect();
    Ok(Qa { format: QaFormat::HaluEval, items: raw, corpus, has_unanswerable: false })
}

fn load_qa_jsonl(path: &Path) -> Result<Qa> {
    let mut i = 0usize;
    let mut contexts: HashMap<String, String> = HashMap::new();
    let mut corpus = Vec::new();
    let items = read_jsonl(path, |v| {
        i += 1;
        let question = string_field(&v, "question")?;
        let answers: Vec<String> = match (&v["answers"], &v["answer"]) {
            (Value::Array(a), _) => a
                .iter()
                .map(|x| match x {
                    Value::String(s) => Ok(s.clone()),
                    Value::Object(o) => o.get("text").and_then(Value::as_str).map(str::to_string).ok_or_else(|| "`answers` objects need `text`".to_string()),
                    _ => Err("`answers` must hold strings".to_string()),
                })
                .collect::<std::result::Result<_, _>>()?,
            (Value::String(s), _) => vec![s.clone()],
            (Value::Null, Value::String(s)) => vec![s.clone()],
            (Value::Null, Value::Null) => return Err("missing `answers` (a list of gold answers; [] for unanswerable)".into()),
            _ => return Err("`answers` must be a list of strings".into()),
        };
        let mut doc_ids: Vec<String> = match v.get("doc_ids").or_else(|| v.get("relevant_doc_ids")) {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a.iter().map(|x| x.as_str().map(str::to_string).unwrap_or_else(|| x.to_string())).collect(),
            Some(_) => return Err("`doc_ids` must be a list".into()),
        };
        if let Some(ctx) = opt_string(&v, "context") {
            let next = format!("ctx-{}", contexts.len());
            let id = contexts.entry(ctx.clone()).or_insert_with(|| {
                corpus.push(json!({"_id": next, "title": opt_string(&v, "title").unwrap_or_default(), "text": ctx}));
                next.clone()
            });
            if doc_ids.is_empty() {
                doc_ids.push(id.clone());
            }
        }
        Ok(QaItem { id: opt_string(&v, "id").unwrap_or_else(|| format!("q{i}")), question, answers, doc_ids, ..Default::default() })
    })?;
    let has_unanswerable = items.iter().any(|q| q.answers.is_empty());
    Ok(Qa { format: QaFormat::Jsonl, items, corpus, has_unanswerable })
}

fn load_squad(path: &Path) -> Result<Qa> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| DatasetError::Malformed {
        path: path.display().to_string(),
        count: 1,
        lines: vec![(e.line(), format!("invalid JSON: {e}"))],
    })?;
    let bad = |m: String| DatasetError::Invalid(format!("{}: {m}", path.display()));
    let data = v["data"].as_array().ok_or_else(|| bad("`data` must be a list of articles".into()))?;
    let (mut items, mut corpus) = (Vec::new(), Vec::new());
    for (a, article) in data.iter().enumerate() {
        let title = article["title"].as_str().unwrap_or_default();
        let paragraphs = article["paragraphs"].as_array().ok_or_else(|| bad(format!("data[{a}].paragraphs must be a list")))?;
        for (p, para) in paragraphs.iter().enumerate() {
            let context = para["context"].as_str().ok_or_else(|| bad(format!("data[{a}].paragraphs[{p}].context must be a string")))?;
            let doc = format!("{a}-{p}");
            corpus.push(json!({"_id": doc, "title": title, "text": context}));
            for (q, qa) in para["qas"].as_array().map(Vec::as_slice).unwrap_or_default().iter().enumerate() {
                let at = || format!("data[{a}].paragraphs[{p}].qas[{q}]");
                let question = qa["question"].as_str().ok_or_else(|| bad(format!("{}.question must be a string", at())))?;
                let impossible = qa["is_impossible"].as_bool().unwrap_or(false);
                let answers: Vec<String> = if impossible {
                    Vec::new()
                } else {
                    qa["answers"].as_array().map(Vec::as_slice).unwrap_or_default().iter().filter_map(|x| x["text"].as_str().map(str::to_string)).collect()
                };
                items.push(QaItem {
                    id: opt_string(qa, "id").unwrap_or_else(at),
                    question: question.to_string(),
                    answers,
                    doc_ids: if impossible { Vec::new() } else { vec![doc.clone()] },
                    ..Default::default()
                });
            }
        }
    }
    let has_unanswerable = items.iter().any(|q| q.answers.is_empty());
    Ok(Qa { format: QaFormat::Squad, items, corpus, has_unanswerable })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Audit finding 10: a split of `../...` or an absolute path read a file outside the
    /// dataset (and the ingest root), and its content came back through the parse error.
    #[test]
    fn a_split_is_a_name_and_file_content_never_appears_in_errors() {
        let dir = tempfile::tempdir().unwrap();
        let ds = dir.path().join("ds");
        std::fs::create_dir_all(ds.join("qrels")).unwrap();
        std::fs::write(ds.join("corpus.jsonl"), "{\"_id\":\"d1\",\"text\":\"t\"}\n").unwrap();
        std::fs::write(ds.join("queries.jsonl"), "{\"_id\":\"q1\",\"text\":\"q\"}\n").unwrap();
        std::fs::write(dir.path().join("secret.tsv"), "q\td\tscore\nroot\tx\tTOP-SECRET-VALUE\n").unwrap();
        for split in ["../../secret", "../secret", "/etc/passwd", "a/b", "", "x\0y"] {
            let e = load_beir(&ds, split).err().unwrap_or_else(|| panic!("split {split:?} was accepted")).to_string();
            assert!(e.contains("letters, digits"), "{split:?}: {e}");
            assert!(!e.contains("TOP-SECRET"), "{e}");
        }
        std::fs::write(ds.join("qrels").join("test.tsv"), "q\td\tscore\nq1\td1\tTOP-SECRET-VALUE\n").unwrap();
        let e = load_beir(&ds, "test").err().unwrap().to_string();
        assert!(e.contains("not an integer") && !e.contains("TOP-SECRET"), "{e}");
    }

    #[test]
    fn malformed_lines_are_reported_with_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("qa.jsonl");
        std::fs::write(&p, "{\"question\":\"q1\",\"answers\":[\"a\"]}\n\nnot json\n{\"question\":\"q3\"}\n[1]\n").unwrap();
        let e = load_qa(&p).unwrap_err().to_string();
        assert!(e.contains("3 malformed"), "{e}");
        assert!(e.contains("line 3: invalid JSON"), "{e}");
        assert!(e.contains("line 4: missing `answers`"), "{e}");
        assert!(e.contains("line 5: expected a JSON object"), "{e}");
    }

    #[test]
    fn qa_jsonl_contexts_become_documents() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("qa.jsonl");
        std::fs::write(
            &p,
            "{\"id\":\"x\",\"question\":\"Who?\",\"answer\":\"Ann\",\"context\":\"Ann did it.\"}\n\
             {\"question\":\"Where?\",\"answers\":[\"Rome\",{\"text\":\"Roma\"}],\"context\":\"Ann did it.\"}\n\
             {\"question\":\"Why?\",\"answers\":[],\"doc_ids\":[\"d9\"]}\n",
        )
        .unwrap();
        let qa = load_qa(&p).unwrap();
        assert_eq!(qa.format, QaFormat::Jsonl);
        assert_eq!(qa.corpus.len(), 1);
        assert_eq!(qa.items[0].id, "x");
        assert_eq!(qa.items[1].answers, vec!["Rome", "Roma"]);
        assert_eq!(qa.items[1].doc_ids, vec!["ctx-0"]);
        assert_eq!(qa.items[2].doc_ids, vec!["d9"]);
        assert!(qa.has_unanswerable);
    }

    #[test]
    fn squad_v2_json() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dev-v2.0.json");
        let v = json!({"version": "v2.0", "data": [{"title": "T", "paragraphs": [{"context": "Paris is in France.", "qas": [
            {"id": "a1", "question": "Where is Paris?", "answers": [{"text": "France", "answer_start": 12}], "is_impossible": false},
            {"id": "a2", "question": "Where is Rome?", "answers": [], "plausible_answers": [{"text": "France"}], "is_impossible": true}
        ]}]}]});
        std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
        let qa = load_qa(&p).unwrap();
        assert_eq!(qa.format, QaFormat::Squad);
        assert_eq!(qa.items.len(), 2);
        assert_eq!(qa.items[0].doc_ids, vec!["0-0"]);
        assert!(qa.items[1].answers.is_empty());
        assert!(qa.has_unanswerable);
        assert_eq!(qa.corpus[0]["title"], "T");
    }

    #[test]
    fn halueval_items_and_corpus() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dev.jsonl");
        std::fs::write(&p, "{\"knowledge\":\"K0\",\"question\":\"Q0\",\"right_answer\":\"R0\",\"hallucinated_answer\":\"H0\"}\n{\"knowledge\":\"K1\",\"question\":\"Q1\",\"right_answer\":\"R1\"}\n").unwrap();
        let e = load_qa(&p).unwrap_err().to_string();
        assert!(e.contains("line 2: missing `hallucinated_answer`"), "{e}");
        std::fs::write(&p, "{\"knowledge\":\"K0\",\"question\":\"Q0\",\"right_answer\":\"R0\",\"hallucinated_answer\":\"H0\"}\n").unwrap();
        let qa = load_qa(&p).unwrap();
        assert_eq!(qa.format, QaFormat::HaluEval);
        assert_eq!(qa.items[0].doc_ids, vec!["halu-0"]);
        assert_eq!(qa.corpus[0]["text"], "K0");
    }

    #[test]
    fn beir_keeps_judged_queries_in_id_order() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("qrels")).unwrap();
        std::fs::write(dir.path().join("corpus.jsonl"), "{\"_id\":\"d1\",\"text\":\"x\"}\n").unwrap();
        std::fs::write(dir.path().join("queries.jsonl"), "{\"_id\":\"10\",\"text\":\"b\"}\n{\"_id\":\"2\",\"text\":\"a\"}\n{\"_id\":\"3\",\"text\":\"c\"}\n").unwrap();
        std::fs::write(dir.path().join("qrels/train.tsv"), "query-id\tcorpus-id\tscore\n10\td1\t1\n2\td1\t1\n").unwrap();
        let b = load_beir(dir.path(), "train").unwrap();
        assert_eq!(b.queries.iter().map(|q| q.id.as_str()).collect::<Vec<_>>(), vec!["2", "10"]);
        assert!(load_beir(dir.path(), "test").is_err());
    }
}

//! Retrieval metrics exactly as trec_eval / pytrec_eval compute them (and BEIR reports):
//!
//! - A run is ranked by score, descending; ties by document id, descending (trec_eval
//!   sorts on `(score, docno)` both descending).
//! - A document is relevant when its grade is ≥ 1 (trec_eval's default relevance level).
//! - nDCG@k (`ndcg_cut_k`): gain = the raw grade, discount `1 / log2(rank + 1)`; the ideal DCG
//!   ranks *all* judged documents of the query by grade and cuts at k.
//! - MAP@k (`map_cut_k`): the sum of precision at each relevant rank ≤ k, divided by *all*
//!   relevant documents of the query (not min(k, R)).
//! - recall@k (`recall_k`): relevant in the top k over all relevant.
//! - precision@k (`P_k`): relevant in the top k over k (even when fewer were retrieved).
//! - MRR@k: 1 / rank of the first relevant document within the top k (BEIR's `mrr@k`).
//! - hit@k: 1 when any relevant document is in the top k.
//!
//! Queries without results: [`EmptyQueries::Beir`] evaluates only queries that returned
//! something (pytrec_eval evaluates the queries of the run; BEIR averages what it returns);
//! [`EmptyQueries::TrecC`] counts every judged query, a missing one scoring 0 (`trec_eval -c`).

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// Query id → document id → relevance grade.
pub type Qrels = HashMap<String, HashMap<String, i64>>;
/// Query id → (document id, score).
pub type Run = HashMap<String, Vec<(String, f64)>>;

/// The cut-offs reported (BEIR's defaults without 1000).
pub const CUTOFFS: [usize; 5] = [1, 3, 5, 10, 100];

/// How queries that retrieved nothing are averaged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum EmptyQueries {
    /// Left out of the means, as BEIR (pytrec_eval) does.
    #[default]
    Beir,
    /// Counted with every metric 0, as `trec_eval -c` does.
    TrecC,
}

impl EmptyQueries {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "beir" => Some(Self::Beir),
            "trec-c" | "trec_c" => Some(Self::TrecC),
            _ => None,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Self::Beir => "queries without results are left out of the means (BEIR / pytrec_eval)",
            Self::TrecC => "queries without results count as 0 (trec_eval -c)",
        }
    }
}

/// Ranks one query's results the way trec_eval does.
pub fn trec_order(results: &[(String, f64)]) -> Vec<&(String, f64)> {
    let mut sorted: Vec<&(String, f64)> = results.iter().collect();
    sorted.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| b.0.cmp(&a.0)));
    sorted
}

fn relevant(judged: &HashMap<String, i64>, doc: &str) -> bool {
    judged.get(doc).is_some_and(|g| *g >= 1)
}

pub fn ndcg_at(judged: &HashMap<String, i64>, results: &[(String, f64)], k: usize) -> f64 {
    let ranked = trec_order(results);
    let dcg: f64 = ranked
        .iter()
        .take(k)
        .enumerate()
        .map(|(i, (doc, _))| {
            let g = judged.get(doc).copied().unwrap_or(0).max(0) as f64;
            g / ((i + 2) as f64).log2()
        })
        .sum();
    let mut grades: Vec<i64> = judged.values().copied().filter(|g| *g > 0).collect();
    grades.sort_unstable_by(|a, b| b.cmp(a));
    let idcg: f64 = grades.iter().take(k).enumerate().map(|(i, g)| *g as f64 / ((i + 2) as f64).log2()).sum();
    if idcg > 0.0 {
        dcg / idcg
    } else {
        0.0
    }
}

pub fn recall_at(judged: &HashMap<String, i64>, results: &[(String, f64)], k: usize) -> f64 {
    let total = judged.values().filter(|g| **g >= 1).count();
    if total == 0 {
        return 0.0;
    }
    let found = trec_order(results).iter().take(k).filter(|(doc, _)| relevant(judged, doc)).count();
    found as f64 / total as f64
}

pub fn precision_at(judged: &HashMap<String, i64>, results: &[(String, f64)], k: usize) -> f64 {
    let found = trec_order(results).iter().take(k).filter(|(doc, _)| relevant(judged, doc)).count();
    found as f64 / k as f64
}

pub fn map_at(judged: &HashMap<String, i64>, results: &[(String, f64)], k: usize) -> f64 {
    let total = judged.values().filter(|g| **g >= 1).count();
    if total == 0 {
        return 0.0;
    }
    let mut found = 0usize;
    let mut sum = 0.0;
    for (i, (doc, _)) in trec_order(results).iter().take(k).enumerate() {
        if relevant(judged, doc) {
            found += 1;
            sum += found as f64 / (i + 1) as f64;
        }
    }
    sum / total as f64
}

pub fn mrr_at(judged: &HashMap<String, i64>, results: &[(String, f64)], k: usize) -> f64 {
    trec_order(results)
        .iter()
        .take(k)
        .position(|(doc, _)| relevant(judged, doc))
        .map_or(0.0, |i| 1.0 / (i + 1) as f64)
}

pub fn hit_at(judged: &HashMap<String, i64>, results: &[(String, f64)], k: usize) -> f64 {
    if trec_order(results).iter().take(k).any(|(doc, _)| relevant(judged, doc)) {
        1.0
    } else {
        0.0
    }
}

/// Every metric at every cut-off for one query, keyed like `ndcg@10`.
pub fn query_metrics(judged: &HashMap<String, i64>, results: &[(String, f64)], cutoffs: &[usize]) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    for &k in cutoffs {
        m.insert(format!("ndcg@{k}"), ndcg_at(judged, results, k));
        m.insert(format!("map@{k}"), map_at(judged, results, k));
        m.insert(format!("recall@{k}"), recall_at(judged, results, k));
        m.insert(format!("precision@{k}"), precision_at(judged, results, k));
        m.insert(format!("mrr@{k}"), mrr_at(judged, results, k));
        m.insert(format!("hit@{k}"), hit_at(judged, results, k));
    }
    m
}

/// The per-query metrics a query contributes to the means, by the empty-query rule; `None`
/// when it is left out.
pub fn query_contribution(
    judged: &HashMap<String, i64>,
    results: Option<&[(String, f64)]>,
    cutoffs: &[usize],
    empty: EmptyQueries,
) -> Option<BTreeMap<String, f64>> {
    match (results, empty) {
        (Some(r), _) if !r.is_empty() => Some(query_metrics(judged, r, cutoffs)),
        (_, EmptyQueries::Beir) => None,
        (_, EmptyQueries::TrecC) => Some(query_metrics(judged, &[], cutoffs)),
    }
}

/// Mean of every metric over the judged queries, and the number of queries averaged.
pub fn mean_metrics(qrels: &Qrels, run: &Run, cutoffs: &[usize], empty: EmptyQueries) -> (BTreeMap<String, f64>, usize) {
    let mut sums: BTreeMap<String, f64> = BTreeMap::new();
    let mut count = 0;
    for (q, judged) in qrels {
        if let Some(m) = query_contribution(judged, run.get(q).map(Vec::as_slice), cutoffs, empty) {
            for (k, v) in m {
                *sums.entry(k).or_default() += v;
            }
            count += 1;
        }
    }
    if count > 0 {
        for v in sums.values_mut() {
            *v /= count as f64;
        }
    }
    (sums, count)
}

/// Mean nDCG@k and recall@k over the evaluated queries, and their count.
pub fn mean_ndcg_recall(qrels: &Qrels, run: &Run, ndcg_k: usize, recall_k: usize) -> (f64, f64, usize) {
    let (mut n, mut r, mut count) = (0.0, 0.0, 0);
    for (q, judged) in qrels {
        if let Some(results) = run.get(q).filter(|r| !r.is_empty()) {
            n += ndcg_at(judged, results, ndcg_k);
            r += recall_at(judged, results, recall_k);
            count += 1;
        }
    }
    if count == 0 {
        return (0.0, 0.0, 0);
    }
    (n / count as f64, r / count as f64, count)
}

/// Reads BEIR `qrels/<split>.tsv` (`query-id corpus-id score`, optional header line);
/// malformed lines are errors naming the line.
pub fn load_qrels(path: &std::path::Path) -> std::io::Result<Qrels> {
    let text = std::fs::read_to_string(path)?;
    let mut qrels = Qrels::new();
    let bad = |line: usize, msg: String| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}:{line}: {msg}", path.display()))
    };
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let cols: Vec<&str> = line.split('\t').collect();
        // TREC qrels have four columns (`qid iter docno rel`), BEIR three.
        let (q, d, g) = match cols.len() {
            3 => (cols[0], cols[1], cols[2]),
            4 => (cols[0], cols[2], cols[3]),
            n => return Err(bad(i + 1, format!("expected 3 tab-separated columns (query-id, corpus-id, score), found {n}"))),
        };
        let grade = match g.trim().parse::<i64>() {
            Ok(g) => g,
            Err(_) if i == 0 => continue, // the header
            // The value is not echoed: a qrels path may come from a request, and the message
            // must not carry a file's content back.
            Err(e) => return Err(bad(i + 1, format!("the score column is not an integer ({e})"))),
        };
        qrels.entry(q.to_string()).or_default().insert(d.to_string(), grade);
    }
    Ok(qrels)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn judged(pairs: &[(&str, i64)]) -> HashMap<String, i64> {
        pairs.iter().map(|(d, g)| (d.to_string(), *g)).collect()
    }

    fn run(pairs: &[(&str, f64)]) -> Vec<(String, f64)> {
        pairs.iter().map(|(d, s)| (d.to_string(), *s)).collect()
    }

    #[test]
    fn ndcg_by_hand() {
        // Relevant: a (2), b (1). Ranking: x, a, b.
        let j = judged(&[("a", 2), ("b", 1), ("z", 0)]);
        let r = run(&[("x", 3.0), ("a", 2.0), ("b", 1.0)]);
        let dcg = 2.0 / 3f64.log2() + 1.0 / 4f64.log2();
        let idcg = 2.0 / 2f64.log2() + 1.0 / 3f64.log2();
        assert!((ndcg_at(&j, &r, 10) - dcg / idcg).abs() < 1e-12);
        // At k=1 the ideal still counts the best judged document.
        assert_eq!(ndcg_at(&j, &r, 1), 0.0);
        assert!((recall_at(&j, &r, 2) - 0.5).abs() < 1e-12);
        assert_eq!(recall_at(&j, &r, 3), 1.0);
    }

    #[test]
    fn map_precision_mrr_hit_by_hand() {
        // Relevant: a, b, c (c never retrieved). Ranking: x, a, y, b.
        let j = judged(&[("a", 1), ("b", 2), ("c", 1), ("y", 0)]);
        let r = run(&[("x", 4.0), ("a", 3.0), ("y", 2.0), ("b", 1.0)]);
        // Precision at the relevant ranks: 1/2 and 2/4; divided by all 3 relevant.
        assert!((map_at(&j, &r, 10) - (0.5 + 0.5) / 3.0).abs() < 1e-12);
        assert!((map_at(&j, &r, 3) - 0.5 / 3.0).abs() < 1e-12);
        assert_eq!(map_at(&j, &r, 1), 0.0);
        // P@k divides by k even past the end of the ranking.
        assert!((precision_at(&j, &r, 2) - 0.5).abs() < 1e-12);
        assert!((precision_at(&j, &r, 10) - 0.2).abs() < 1e-12);
        assert_eq!(mrr_at(&j, &r, 1), 0.0);
        assert_eq!(mrr_at(&j, &r, 10), 0.5);
        assert_eq!(hit_at(&j, &r, 1), 0.0);
        assert_eq!(hit_at(&j, &r, 2), 1.0);
    }

    #[test]
    fn ties_break_on_document_id_descending() {
        let j = judged(&[("a", 1)]);
        // Equal scores: trec_eval ranks "b" before "a".
        let r = run(&[("a", 1.0), ("b", 1.0)]);
        assert!((ndcg_at(&j, &r, 10) - 1.0 / 3f64.log2()).abs() < 1e-12);
        assert_eq!(recall_at(&j, &r, 1), 0.0);
        assert_eq!(mrr_at(&j, &r, 10), 0.5);
    }

    #[test]
    fn empty_queries_beir_versus_trec_c() {
        let mut q = Qrels::new();
        q.insert("1".into(), judged(&[("a", 1)]));
        q.insert("2".into(), judged(&[("b", 1)]));
        let mut r = Run::new();
        r.insert("1".into(), run(&[("a", 1.0)]));
        r.insert("2".into(), Vec::new());
        assert_eq!(mean_ndcg_recall(&q, &r, 10, 100), (1.0, 1.0, 1));
        let (beir, n) = mean_metrics(&q, &r, &[10], EmptyQueries::Beir);
        assert_eq!((beir["ndcg@10"], n), (1.0, 1));
        let (trec, n) = mean_metrics(&q, &r, &[10], EmptyQueries::TrecC);
        assert_eq!((trec["ndcg@10"], trec["recall@10"], n), (0.5, 0.5, 2));
    }

    #[test]
    fn qrels_errors_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("q.tsv");
        std::fs::write(&p, "query-id\tcorpus-id\tscore\n1\ta\t1\n2\tb\tx\n").unwrap();
        let e = load_qrels(&p).unwrap_err().to_string();
        assert!(e.contains(":3:") && e.contains("score column"), "{e}");
        std::fs::write(&p, "1\ta\t1\n2 b\n").unwrap();
        assert!(load_qrels(&p).unwrap_err().to_string().contains(":2:"));
    }
}

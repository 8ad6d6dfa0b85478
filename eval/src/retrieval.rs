//! Retrieval metrics exactly as trec_eval / pytrec_eval compute them (and BEIR reports):
//!
//! - A run is ranked by score, descending; ties by document id, descending (trec_eval
//!   sorts on `(score, docno)` both descending).
//! - nDCG@k: gain = the raw relevance grade, discount `1 / log2(rank + 1)`; the ideal DCG
//!   ranks *all* judged documents of the query by grade and cuts at k.
//! - recall@k: relevant documents (grade ≥ 1) in the top k over all relevant documents.
//! - Means are over the queries that have both judgements and a run entry (pytrec_eval
//!   evaluates only those; BEIR averages what pytrec_eval returns).

use std::collections::HashMap;

/// Query id → document id → relevance grade.
pub type Qrels = HashMap<String, HashMap<String, i64>>;
/// Query id → (document id, score).
pub type Run = HashMap<String, Vec<(String, f64)>>;

/// Ranks one query's results the way trec_eval does.
pub fn trec_order(results: &[(String, f64)]) -> Vec<&(String, f64)> {
    let mut sorted: Vec<&(String, f64)> = results.iter().collect();
    sorted.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| b.0.cmp(&a.0)));
    sorted
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
    let relevant = judged.values().filter(|g| **g >= 1).count();
    if relevant == 0 {
        return 0.0;
    }
    let found = trec_order(results).iter().take(k).filter(|(doc, _)| judged.get(doc).is_some_and(|g| *g >= 1)).count();
    found as f64 / relevant as f64
}

/// Mean nDCG@k and recall@k over the evaluated queries, and their count.
pub fn mean_ndcg_recall(qrels: &Qrels, run: &Run, ndcg_k: usize, recall_k: usize) -> (f64, f64, usize) {
    let (mut n, mut r, mut count) = (0.0, 0.0, 0);
    for (q, judged) in qrels {
        if let Some(results) = run.get(q) {
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

/// Reads BEIR `qrels/<split>.tsv` (`query-id corpus-id score`, header line).
pub fn load_qrels(path: &std::path::Path) -> std::io::Result<Qrels> {
    let text = std::fs::read_to_string(path)?;
    let mut qrels = Qrels::new();
    for (i, line) in text.lines().enumerate() {
        let cols: Vec<&str> = line.split('\t').collect();
        if cols.len() < 3 || (i == 0 && cols[2].parse::<i64>().is_err()) {
            continue;
        }
        let grade = cols[2].trim().parse::<i64>().map_err(|e| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}:{}: {e}", path.display(), i + 1))
        })?;
        qrels.entry(cols[0].to_string()).or_default().insert(cols[1].to_string(), grade);
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
    fn ties_break_on_document_id_descending() {
        let j = judged(&[("a", 1)]);
        // Equal scores: trec_eval ranks "b" before "a".
        let r = run(&[("a", 1.0), ("b", 1.0)]);
        assert!((ndcg_at(&j, &r, 10) - 1.0 / 3f64.log2()).abs() < 1e-12);
        assert_eq!(recall_at(&j, &r, 1), 0.0);
    }

    #[test]
    fn means_skip_queries_without_a_run() {
        let mut q = Qrels::new();
        q.insert("1".into(), judged(&[("a", 1)]));
        q.insert("2".into(), judged(&[("b", 1)]));
        let mut r = Run::new();
        r.insert("1".into(), run(&[("a", 1.0)]));
        assert_eq!(mean_ndcg_recall(&q, &r, 10, 100), (1.0, 1.0, 1));
    }
}

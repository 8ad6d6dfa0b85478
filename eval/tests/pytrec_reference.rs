//! ragway's retrieval metrics against pytrec_eval on the same qrels and run
//! (`tests/data/pytrec_reference.json`, written once by `make_pytrec_reference.py`).

use ragway_eval::retrieval::{mean_metrics, query_metrics, EmptyQueries, Qrels, Run, CUTOFFS};
use serde_json::Value;
use std::collections::HashMap;

fn load() -> (Qrels, Run, Value) {
    let v: Value = serde_json::from_str(include_str!("data/pytrec_reference.json")).unwrap();
    let qrels: Qrels = serde_json::from_value(v["qrels"].clone()).unwrap();
    let run: Run = v["run"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(q, docs)| (q.clone(), docs.as_object().unwrap().iter().map(|(d, s)| (d.clone(), s.as_f64().unwrap())).collect()))
        .collect();
    (qrels, run, v["pytrec_eval"].clone())
}

#[test]
fn per_query_metrics_match_pytrec_eval() {
    let (qrels, run, reference) = load();
    let mut checked = 0;
    for (q, expected) in reference.as_object().unwrap() {
        let ours = query_metrics(&qrels[q], &run[q], &CUTOFFS);
        for k in CUTOFFS {
            for (mine, theirs) in [("ndcg", "ndcg_cut"), ("map", "map_cut"), ("recall", "recall"), ("precision", "P")] {
                let a = ours[&format!("{mine}@{k}")];
                let b = expected[format!("{theirs}_{k}")].as_f64().unwrap();
                assert!((a - b).abs() < 1e-9, "{q} {mine}@{k}: ragway {a} vs pytrec_eval {b}");
                checked += 1;
            }
        }
        // recip_rank has no cut: it is MRR@k for any k past the first relevant document.
        let a = ours["mrr@100"];
        let b = expected["recip_rank"].as_f64().unwrap();
        assert!((a - b).abs() < 1e-9, "{q} mrr: {a} vs {b}");
    }
    assert_eq!(checked, 11 * 20);
}

#[test]
fn means_follow_beir_and_trec_c() {
    let (qrels, run, reference) = load();
    let evaluated: HashMap<&String, &Value> = reference.as_object().unwrap().iter().collect();
    // BEIR: the mean over the queries pytrec_eval returns (the judged query never retrieved
    // is left out).
    let beir = evaluated.values().map(|m| m["ndcg_cut_10"].as_f64().unwrap()).sum::<f64>() / evaluated.len() as f64;
    let (ours, n) = mean_metrics(&qrels, &run, &CUTOFFS, EmptyQueries::Beir);
    assert_eq!(n, evaluated.len());
    assert!((ours["ndcg@10"] - beir).abs() < 1e-12);
    // trec_eval -c: every judged query, the missing one at 0.
    let (ours, n) = mean_metrics(&qrels, &run, &CUTOFFS, EmptyQueries::TrecC);
    assert_eq!(n, qrels.len());
    assert!((ours["ndcg@10"] - beir * evaluated.len() as f64 / qrels.len() as f64).abs() < 1e-12);
}

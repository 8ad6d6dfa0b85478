//! `ragway eval` end to end with the real binary, real MiniLM + SmolLM2 and a real index:
//! retrieval on a 50-query SciFact train slice (`tests/data/scifact_slice`), RAG and
//! HaluEval on the first eight HaluEval QA dev items, resuming, CI gates, comparison, a
//! remote run against a live server, and runs over REST and GraphQL.

use crate::common::{assert_openai_error, client, models_dir, Server};
use ragway_eval::retrieval::{load_qrels, query_metrics, CUTOFFS};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn data(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(p)
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ragway-eval-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Runs `ragway eval ...`; its exit code, stdout and stderr.
fn eval(args: &[&str], data_dir: &Path) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ragway"))
        .arg("eval")
        .args(args)
        .arg("--models-dir")
        .arg(models_dir())
        .arg("--data-dir")
        .arg(data_dir)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run ragway eval");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let code = out.status.code().unwrap_or(-1);
    if code != 0 && code != 3 {
        panic!("ragway eval {args:?} exited {code}\n{stdout}\n{stderr}");
    }
    (code, stdout, stderr)
}

fn summary(dir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("summary.json")).unwrap()).unwrap()
}

fn samples(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("samples.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn retrieval_runs_resume_gate_and_compare() {
    let root = tmp("retrieval");
    let dd = root.join("data");
    let slice = data("scifact_slice");
    let (a, b) = (root.join("runs/hybrid"), root.join("runs/keyword"));
    let sa = a.to_str().unwrap();
    let ds = slice.to_str().unwrap();

    // A first run stopped after 20 queries (as if interrupted), then the whole run resumes.
    let (code, _, _) = eval(&["retrieval", "--dataset", ds, "--split", "train", "--out", sa, "--limit", "20"], &dd);
    assert_eq!(code, 0);
    assert_eq!(samples(&a).len(), 20);
    // The run saved the graph it ingested, so the next run maps it instead of building
    // another from the log.
    let saved: Vec<_> = std::fs::read_dir(dd.join("collections"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|c| c.join("dense.hnsw").is_file() && c.join("table.snap").is_file())
        .collect();
    assert_eq!(saved.len(), 1, "no saved graph under {}", dd.display());
    let (code, stdout, stderr) = eval(&["retrieval", "--dataset", ds, "--split", "train", "--out", sa], &dd);
    assert_eq!(code, 0);
    // stderr is not a terminal here: progress comes as lines (each phase, then every 10 s).
    assert!(stderr.contains("loading the dataset") && stderr.contains("summarizing"), "{stderr}");
    assert!(stdout.contains("ndcg@10"), "{stdout}");
    let s = summary(&a);
    assert_eq!(s["run"]["cached"], 20, "{}", s["run"]);
    assert_eq!(s["n"], 50);
    assert_eq!(s["run"]["errors"], 0);
    // The collection was ingested on the first run and reused by the second.
    assert!(s["run"]["config"]["setup"]["collection"].as_str().unwrap().starts_with("eval-"));
    let ndcg = s["ndcg@10"].as_f64().unwrap();
    let ci = s["ci95"]["ndcg@10"].as_array().unwrap();
    assert!(ndcg > 0.6 && ndcg <= 1.0, "nDCG@10 {ndcg}");
    assert!(ci[0].as_f64().unwrap() <= ndcg && ndcg <= ci[1].as_f64().unwrap());
    for k in ["map@10", "recall@100", "precision@10", "mrr@10", "hit@10", "ndcg@100"] {
        assert!(s[k].is_number(), "{k} missing");
    }
    // Every per-sample record recomputes from its own ranked list and the qrels, and the
    // summary is their mean.
    let qrels = load_qrels(&slice.join("qrels/train.tsv")).unwrap();
    let recs = samples(&a);
    assert_eq!(recs.len(), 50);
    let mut mean = 0.0;
    for r in &recs {
        let run: Vec<(String, f64)> = r["retrieved"].as_array().unwrap().iter().map(|h| (h["doc_id"].as_str().unwrap().to_string(), h["score"].as_f64().unwrap())).collect();
        assert!(!run.is_empty() && run.len() <= 100);
        let m = query_metrics(&qrels[r["id"].as_str().unwrap()], &run, &CUTOFFS);
        assert!((m["ndcg@10"] - r["metrics"]["ndcg@10"].as_f64().unwrap()).abs() < 1e-12);
        mean += m["ndcg@10"];
    }
    assert!((mean / 50.0 - ndcg).abs() < 1e-9);
    let html = std::fs::read_to_string(a.join("report.html")).unwrap();
    assert!(html.contains("<svg") && html.contains("recall@k") && html.contains("Worst"), "report lacks charts");

    // The same run again is all cached and gives the same figures.
    eval(&["retrieval", "--dataset", ds, "--split", "train", "--out", sa], &dd);
    let again = summary(&a);
    assert_eq!(again["run"]["cached"], 50);
    assert_eq!(again["ndcg@10"], s["ndcg@10"]);
    assert_eq!(again["ci95"], s["ci95"]);

    // A gate that cannot be met exits with code 3; one that is met exits 0.
    let (code, _, _) = eval(&["retrieval", "--dataset", ds, "--split", "train", "--mode", "keyword", "--out", b.to_str().unwrap(), "--fail-under", "ndcg@10=0.999"], &dd);
    assert_eq!(code, 3);
    let (code, _, _) = eval(&["retrieval", "--dataset", ds, "--split", "train", "--mode", "keyword", "--out", b.to_str().unwrap(), "--fail-under", "ndcg@10=0.1,recall@100=0.1"], &dd);
    assert_eq!(code, 0);
    assert_eq!(summary(&b)["run"]["config"]["mode"], "keyword");

    let o = Command::new(env!("CARGO_BIN_EXE_ragway")).args(["eval", "compare", b.to_str().unwrap(), sa]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("paired samples"), "{stdout}");
    let cmp: Value = serde_json::from_slice(&std::fs::read(a.join("compare/compare.json")).unwrap()).unwrap();
    assert_eq!(cmp["paired_samples"], 50);
    let row = cmp["metrics"].as_array().unwrap().iter().find(|m| m["metric"] == "ndcg@10").unwrap();
    let kw = summary(&b)["ndcg@10"].as_f64().unwrap();
    assert!((row["delta"].as_f64().unwrap() - (ndcg - kw)).abs() < 1e-12);
    let p = row["p_value"].as_f64().unwrap();
    assert!(p > 0.0 && p <= 1.0);
    assert!(std::fs::read_to_string(a.join("compare/compare.html")).unwrap().contains("<table>"));

    // Another fusion, then another depth: each a different configuration (nothing cached
    // is reused), recorded by the run, and used by its searches (the scores move).
    // Each query's top score, by query id (the file keeps earlier runs' records before).
    let top = |recs: &[Value]| -> BTreeMap<String, f64> {
        recs.iter().map(|r| (r["id"].as_str().unwrap().to_string(), r["retrieved"][0]["score"].as_f64().unwrap())).collect()
    };
    let moved = |a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>| a.iter().filter(|(id, x)| (b[*id] - **x).abs() > 1e-6).count();
    let mut before = top(&recs);
    for (extra, key, value) in [
        (&["--fusion", "convex"][..], "fusion", json!({"method": "convex"})),
        (&["--fusion", "convex", "--candidates", "200"][..], "candidates", json!(200)),
    ] {
        let mut args = vec!["retrieval", "--dataset", ds, "--split", "train", "--out", sa];
        args.extend(extra);
        let (code, _, stderr) = eval(&args, &dd);
        assert_eq!(code, 0, "{stderr}");
        let d = summary(&a);
        assert_eq!(d["run"]["cached"], 0, "{}", d["run"]);
        let recorded = &d["run"]["config"][key];
        assert!(if key == "fusion" { recorded["method"] == value["method"] } else { *recorded == value }, "{}", d["run"]);
        let all = samples(&a);
        let after = top(&all[all.len() - 50..]);
        assert_eq!(after.len(), 50);
        assert!(moved(&before, &after) > 0, "{key}: {before:?} {after:?}");
        before = after;
    }
    let o = Command::new(env!("CARGO_BIN_EXE_ragway"))
        .args(["eval", "retrieval", "--dataset", ds, "--out", sa, "--fusion", "borda"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "a usage error");
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a fusion"));
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn rag_and_halueval_runs_with_the_local_judge() {
    let root = tmp("rag");
    let dd = root.join("data");
    let ds = data("halueval_dev_first8.jsonl");
    let out = root.join("rag");
    let (code, _, _) = eval(&["rag", "--dataset", ds.to_str().unwrap(), "--out", out.to_str().unwrap(), "--top-k", "3"], &dd);
    assert_eq!(code, 0);
    let s = summary(&out);
    assert_eq!(s["n"], 8);
    for k in ["exact_match", "f1", "context_precision", "context_recall", "answer_relevancy", "grounding"] {
        let v = s[k].as_f64().unwrap_or_else(|| panic!("{k} missing: {s}"));
        assert!((0.0..=1.0).contains(&v), "{k} = {v}");
    }
    // The gold document is each item's own knowledge: ID-based context recall is high.
    assert!(s["context_recall"].as_f64().unwrap() >= 0.75, "{s}");
    // The judge ran for faithfulness; whatever it could not parse is counted, not dropped.
    let calls = s["judge"]["calls"].as_u64().unwrap();
    assert!(calls >= 7, "{s}");
    let recs = samples(&out);
    // A sample lacks faithfulness only when it abstained or every verdict was unparseable.
    for r in &recs {
        if r["metrics"].get("faithfulness").is_none() {
            let statements = r["outputs"]["statements"].as_array().unwrap();
            assert!(
                r["metrics"]["dont_know"] == 1.0 || statements.iter().all(|st| st["verdict"] == "unparseable"),
                "{r}"
            );
        } else {
            let f = r["metrics"]["faithfulness"].as_f64().unwrap();
            let st = r["outputs"]["statements"].as_array().unwrap();
            let parsed: Vec<&Value> = st.iter().filter(|x| x["verdict"] != "unparseable").collect();
            let supported = parsed.iter().filter(|x| x["verdict"] == "no").count();
            assert!((f - supported as f64 / parsed.len() as f64).abs() < 1e-12, "{r}");
        }
    }
    let oberoi = recs.iter().find(|r| r["inputs"]["question"].as_str().unwrap().contains("Oberoi")).unwrap();
    assert!(oberoi["outputs"]["answer"].as_str().unwrap().contains("Delhi"), "{oberoi}");
    assert!(oberoi["metrics"]["f1"].as_f64().unwrap() > 0.0);
    assert_eq!(oberoi["retrieved"][0]["doc_id"], oberoi["id"]);

    let hal = root.join("halueval");
    let (code, _, _) = eval(&["halueval", "--dataset", ds.to_str().unwrap(), "--out", hal.to_str().unwrap(), "--seed", "3"], &dd);
    assert_eq!(code, 0);
    let h = summary(&hal);
    assert_eq!(h["judge"]["calls"], 8);
    let recs = samples(&hal);
    let (mut correct, mut parsed) = (0, 0);
    for r in &recs {
        let truth = r["outputs"]["truth"].as_str().unwrap();
        assert_eq!(truth == "yes", r["inputs"]["shown"] == "hallucinated");
        match r["outputs"]["verdict"].as_str().unwrap() {
            "unparseable" => assert!(r["metrics"].get("accuracy").is_none()),
            v => {
                parsed += 1;
                correct += usize::from(v == truth);
            }
        }
    }
    assert_eq!(h["n_by_metric"]["unparseable"], 8);
    if parsed > 0 {
        assert!((h["accuracy"].as_f64().unwrap() - correct as f64 / parsed as f64).abs() < 1e-12);
    }
    assert!((h["accuracy_all"].as_f64().unwrap() - correct as f64 / 8.0).abs() < 1e-12);
    // The seeded draw shows both kinds of answer.
    assert!(recs.iter().any(|r| r["inputs"]["shown"] == "right") && recs.iter().any(|r| r["inputs"]["shown"] == "hallucinated"));
    let html = std::fs::read_to_string(hal.join("report.html")).unwrap();
    assert!(html.contains("truth \\ verdict"));
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn remote_rag_run_against_a_live_server() {
    let s = crate::rag::corpus();
    let root = tmp("remote");
    let out = root.join("remote");
    let ds = data("halueval_dev_first8.jsonl");
    let (code, _, _) = eval(
        &["rag", "--url", &s.url, "--collection", "rag-e2e", "--dataset", ds.to_str().unwrap(), "--limit", "3", "--out", out.to_str().unwrap()],
        &root.join("data"),
    );
    assert_eq!(code, 0);
    let sum = summary(&out);
    assert_eq!(sum["n"], 3);
    assert_eq!(sum["run"]["config"]["system"]["backend"], s.url.as_str());
    assert!(sum["answer_relevancy"].as_f64().unwrap() > 0.0, "{sum}");
    assert!(sum["judge"]["calls"].as_u64().unwrap() > 0);
    let recs = samples(&out);
    assert_eq!(recs[0]["retrieved"][0]["doc_id"], "halu-0", "{}", recs[0]);
    // A remote run without a collection is refused with the reason.
    let o = Command::new(env!("CARGO_BIN_EXE_ragway"))
        .args(["eval", "rag", "--url", &s.url, "--dataset", ds.to_str().unwrap(), "--out"])
        .arg(root.join("x"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("needs --collection"));
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn runs_over_rest_and_graphql() {
    let s = Server::start(&["--ingest-root", data("").to_str().unwrap()]);
    s.wait_ready();
    let (st, b) = s.post("/v1/evals", &json!({"kind": "retrieval", "dataset": "scifact_slice", "split": "train", "limit": 10, "name": "slice10", "mode": "dense"}));
    assert_eq!(st, 202, "{b}");
    assert_eq!(b["id"], "slice10");
    assert_eq!(b["status"], "running");
    // A second start under a running id conflicts.
    let (st, b2) = s.post("/v1/evals", &json!({"kind": "retrieval", "dataset": "scifact_slice", "split": "train", "name": "slice10"}));
    if st != 202 {
        assert_openai_error(st, &b2, 409);
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    let done = loop {
        let (st, v) = s.get("/v1/evals/slice10");
        assert_eq!(st, 200, "{v}");
        assert!(v["progress"]["total"].is_number());
        if v["status"] != "running" {
            break v;
        }
        assert!(Instant::now() < deadline, "run did not finish: {v}");
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(done["status"], "succeeded", "{done}");
    let n = done["summary"]["n"].as_u64().unwrap();
    assert!(n == 10 || n == 50, "{done}");
    assert!(done["summary"]["ndcg@10"].as_f64().unwrap() > 0.3);
    let r = client().get(format!("{}/v1/evals/slice10/report", s.url)).send().unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    assert!(r.text().unwrap().contains("<svg"));
    let (st, list) = s.get("/v1/evals");
    assert_eq!(st, 200);
    assert!(list["data"].as_array().unwrap().iter().any(|r| r["id"] == "slice10"));

    // Bad requests: OpenAI's error shape, nothing started.
    for (body, param) in [
        (json!({"kind": "nope", "dataset": "scifact_slice"}), "kind"),
        (json!({"kind": "retrieval", "dataset": "../etc"}), "dataset"),
        (json!({"kind": "retrieval", "dataset": "missing-folder"}), "dataset"),
        (json!({"kind": "retrieval", "dataset": "scifact_slice", "name": "a b"}), "name"),
        (json!({"kind": "retrieval", "dataset": "scifact_slice", "concurrency": 0}), "concurrency"),
        (json!({"kind": "retrieval", "dataset": "scifact_slice", "fusion": {"method": "rrf", "rrf_k": -1}}), "fusion.rrf_k"),
        (json!({"kind": "retrieval", "dataset": "scifact_slice", "candidates": 0}), "candidates"),
    ] {
        let (st, b) = s.post("/v1/evals", &body);
        let e = assert_openai_error(st, &b, 400);
        assert_eq!(e["param"], param, "{b}");
    }
    let (st, b) = s.post("/v1/evals", &json!({"kind": "retrieval", "dataset": "scifact_slice", "bogus": 1}));
    assert_openai_error(st, &b, 400);
    let (st, b) = s.get("/v1/evals/nope");
    let e = assert_openai_error(st, &b, 404);
    assert_eq!(e["code"], "run_not_found");

    // GraphQL: list, read, start (and its errors with extensions.code).
    let gql = |q: &str| -> Value {
        client().post(format!("{}/graphql", s.url)).json(&json!({"query": q})).send().unwrap().json().unwrap()
    };
    let v = gql("{ evalRuns evalRun(id: \"slice10\") }");
    assert!(v["errors"].is_null(), "{v}");
    assert_eq!(v["data"]["evalRun"]["status"], "succeeded");
    assert!(v["data"]["evalRuns"].as_array().unwrap().iter().any(|r| r["id"] == "slice10"));
    let v = gql("mutation { startEvalRun(input: {kind: \"halueval\", dataset: \"halueval_dev_first8.jsonl\", limit: 2, name: \"hal2\"}) }");
    assert!(v["errors"].is_null(), "{v}");
    assert_eq!(v["data"]["startEvalRun"]["id"], "hal2");
    let v = gql("mutation { startEvalRun(input: {kind: \"bad\", dataset: \"x\"}) }");
    assert_eq!(v["errors"][0]["extensions"]["code"], "invalid_request_error", "{v}");
    let v = gql("{ evalRun(id: \"nope\") }");
    assert_eq!(v["errors"][0]["extensions"]["code"], "run_not_found", "{v}");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, v) = s.get("/v1/evals/hal2");
        if v["status"] != "running" {
            assert_eq!(v["status"], "succeeded", "{v}");
            assert_eq!(v["summary"]["judge"]["calls"], 2);
            break;
        }
        assert!(Instant::now() < deadline, "{v}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

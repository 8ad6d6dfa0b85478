//! The collection, document, search, ingestion and snapshot endpoints over real HTTP.

use crate::common::{assert_openai_error, client, shared, Server};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn wait_job(s: &Server, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let (status, job) = s.get(&format!("/v1/jobs/{id}"));
        assert_eq!(status, 200, "{job}");
        if job["state"] == "done" || job["state"] == "failed" {
            return job;
        }
        assert!(Instant::now() < deadline, "job never finished: {job}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Uploads JSONL to a collection's ingest endpoint; answers the finished job and the 202
/// body that started it.
fn ingest_jsonl(s: &Server, collection: &str, body: String) -> (Value, Value) {
    let r = client()
        .post(format!("{}/v1/collections/{collection}/ingest", s.url))
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let started: Value = r.json().unwrap();
    let job = wait_job(s, started["job_id"].as_str().unwrap());
    (job, started)
}

#[test]
fn collections_documents_and_search() {
    let s = shared();
    let (status, info) =
        s.post("/v1/collections", &json!({"name": "api-docs", "hnsw": {"m": 12}, "chunking": {"max_tokens": 128}}));
    assert_eq!(status, 201, "{info}");
    assert_eq!(info["settings"]["model"], "all-MiniLM-L6-v2");
    assert_eq!(info["settings"]["dimension"], 384);
    assert_eq!(info["settings"]["hnsw"]["m"], 12);
    assert_eq!(info["state"], "ready");
    let (status, body) = s.post("/v1/collections", &json!({"name": "api-docs"}));
    assert_eq!(assert_openai_error(status, &body, 409)["code"], "collection_exists");
    let (status, body) = s.post("/v1/collections", &json!({"name": "bad name!"}));
    assert_eq!(assert_openai_error(status, &body, 400)["param"], "name");
    let (status, body) = s.post("/v1/collections", &json!({"name": "x", "hnsw": {"mm": 3}}));
    assert_openai_error(status, &body, 400);
    // Every insert would size its heaps by it: bounded, not an allocation that aborts.
    let huge = json!({"name": "x", "hnsw": {"m": 16, "ef_construction": 1u64 << 60, "ef": 64}});
    let (status, body) = s.post("/v1/collections", &huge);
    assert_eq!(assert_openai_error(status, &body, 400)["param"], "hnsw.ef_construction");

    let docs = json!({"documents": [
        {"id": "cats", "text": "The domestic cat is a small carnivorous mammal that purrs and hunts mice.", "metadata": {"year": 2001, "tags": ["animal"]}},
        {"id": "rocket", "text": "Liquid-fuel rockets burn kerosene and liquid oxygen to reach orbit.", "title": "Rockets", "metadata": {"year": 2010}},
        {"id": "path/with/slash", "text": "Sourdough bread rises slowly thanks to wild yeast.", "metadata": {"year": 2020}}
    ]});
    let (status, r) = s.post("/v1/collections/api-docs/documents", &docs);
    assert_eq!(status, 200, "{r}");
    assert_eq!((r["upserted"].as_u64(), r["chunks"].as_u64()), (Some(3), Some(3)));
    let (_, r) = s.post("/v1/collections/api-docs/documents", &docs);
    assert_eq!(r["unchanged"], 3, "the same documents again change nothing");

    let (status, r) =
        s.post("/v1/collections/api-docs/search", &json!({"query": "a feline pet", "top_k": 2, "mode": "dense"}));
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["results"][0]["document_id"], "cats");
    assert_eq!(r["results"][0]["chunk_id"], "cats#0");
    assert_eq!(r["results"][0]["dense"]["rank"], 1);
    let (_, r) = s.post("/v1/collections/api-docs/search", &json!({"query": "kerosene"}));
    assert_eq!(r["mode"], "hybrid");
    assert_eq!(r["results"][0]["document_id"], "rocket");
    assert_eq!(r["results"][0]["title"], "Rockets");
    assert_eq!(r["results"][0]["keyword"]["rank"], 1);
    let (_, r) = s.post(
        "/v1/collections/api-docs/search",
        &json!({"query": "kerosene", "filter": {"key": "year", "gte": 2015}, "fusion": {"method": "convex", "dense_weight": 0.5, "keyword_weight": 0.5}}),
    );
    let results = r["results"].as_array().unwrap();
    assert_eq!(results.len(), 1, "{r}");
    assert_eq!(results[0]["document_id"], "path/with/slash");
    let (status, r) =
        s.post("/v1/collections/api-docs/search", &json!({"query": "kerosene", "fusion": {"method": "dbsf"}}));
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["results"][0]["document_id"], "rocket", "{r}");

    // Bad search input: OpenAI-shaped 400s that name the parameter.
    let (status, body) =
        s.post("/v1/collections/api-docs/search", &json!({"query": "x", "filter": {"key": "year", "gte": "soon"}}));
    assert_eq!(assert_openai_error(status, &body, 400)["param"], "filter.gte");
    let (status, body) = s.post("/v1/collections/api-docs/search", &json!({"query": "x", "top_k": 0}));
    assert_eq!(assert_openai_error(status, &body, 400)["param"], "top_k");
    let (status, body) = s.post("/v1/collections/api-docs/search", &json!({"query": "x", "mode": "fuzzy"}));
    assert_openai_error(status, &body, 400);
    // Fusion constants: finite and bounded (1e39 reaches the server as an f32 infinity).
    for (fusion, param) in [
        (json!({"method": "rrf", "rrf_k": -1}), "fusion.rrf_k"),
        (json!({"dense_weight": 1e39}), "fusion.dense_weight"),
        (json!({"method": "dbsf", "keyword_weight": -0.5}), "fusion.keyword_weight"),
    ] {
        let (status, body) = s.post("/v1/collections/api-docs/search", &json!({"query": "x", "fusion": fusion}));
        assert_eq!(assert_openai_error(status, &body, 400)["param"], param, "{body}");
    }
    let (status, body) = s.post("/v1/collections/api-docs/search", &json!({"query": "  "}));
    assert_eq!(assert_openai_error(status, &body, 400)["param"], "query");
    let (status, body) = s.post("/v1/collections/nope/search", &json!({"query": "x"}));
    assert_eq!(assert_openai_error(status, &body, 404)["code"], "collection_not_found");
    let (status, body) = s.post("/v1/collections/api-docs/documents", &json!({"documents": [{"id": "", "text": "x"}]}));
    assert_eq!(assert_openai_error(status, &body, 400)["param"], "documents[0].id");
    let (status, body) = s
        .post("/v1/collections/api-docs/documents", &json!({"documents": [{"id": "a", "text": "x", "metadata": [1]}]}));
    assert_eq!(assert_openai_error(status, &body, 400)["param"], "documents[0].metadata");

    let (status, d) = s.get("/v1/collections/api-docs/documents/path/with/slash");
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["metadata"]["year"], 2020);
    assert_eq!(d["chunks"][0]["chunk_id"], "path/with/slash#0");
    let (status, body) = s.get("/v1/collections/api-docs/documents/missing");
    assert_eq!(assert_openai_error(status, &body, 404)["code"], "document_not_found");
    let (status, r) = s.delete("/v1/collections/api-docs/documents/cats");
    assert_eq!((status, r["deleted"].as_u64()), (200, Some(1)));
    let (status, r) =
        s.post("/v1/collections/api-docs/documents/delete", &json!({"filter": {"key": "year", "lt": 2015}}));
    assert_eq!((status, r["deleted"].as_u64()), (200, Some(1)), "{r}");
    let (_, info) = s.get("/v1/collections/api-docs");
    assert_eq!(
        (info["documents"].as_u64(), info["chunks"].as_u64(), info["keyword_chunks"].as_u64()),
        (Some(1), Some(1), Some(1))
    );
    assert!(info["disk_bytes"].as_u64().unwrap() > 0 && info["memory_bytes"].as_u64().unwrap() > 0);

    // Snapshot, restore under a new name, delete.
    let (status, r) = s.post("/v1/collections/api-docs/snapshot", &json!({"path": "api-docs-1"}));
    assert_eq!(status, 201, "{r}");
    let (status, body) = s.post("/v1/collections/api-docs/snapshot", &json!({"path": "../../etc"}));
    assert_eq!(assert_openai_error(status, &body, 400)["param"], "path");
    let (status, r) = s.post("/v1/collections/api-copy/restore", &json!({"path": "api-docs-1"}));
    assert_eq!(status, 201, "{r}");
    assert_eq!(r["documents"], 1);
    let (_, list) = s.get("/v1/collections");
    let names: Vec<&str> =
        list["data"].as_array().unwrap().iter().map(|c| c["settings"]["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"api-docs") && names.contains(&"api-copy"), "{names:?}");
    let (status, r) = s.delete("/v1/collections/api-copy");
    assert_eq!((status, r["deleted"].as_bool()), (200, Some(true)));
    let (status, body) = s.get("/v1/collections/api-copy");
    assert_openai_error(status, &body, 404);
}

#[test]
fn jsonl_upload_runs_a_job_with_progress_and_line_numbers() {
    let s = shared();
    assert_eq!(s.post("/v1/collections", &json!({"name": "api-ingest"})).0, 201);
    let mut body = String::new();
    for i in 0..30 {
        if i == 4 {
            body.push_str("{\"id\": 5, \"text\": \n");
        } else {
            body.push_str(&json!({"_id": format!("doc{i}"), "title": format!("Title {i}"), "text": format!("Body text number {i} about rivers and lakes."), "metadata": {}}).to_string());
            body.push('\n');
        }
    }
    let (job, started) = ingest_jsonl(s, "api-ingest", body);
    assert_eq!(job["state"], "done", "{job}");
    assert_eq!(job["progress"]["documents_written"], 29);
    assert_eq!(job["progress"]["documents_failed"], 1);
    assert_eq!(job["errors"][0]["line"], 5);
    assert_eq!(job["progress"]["fraction"], 1.0);
    let (_, r) = s.post(
        "/v1/collections/api-ingest/search",
        &json!({"query": "Body text number 17", "mode": "keyword", "top_k": 1}),
    );
    assert_eq!(r["results"][0]["document_id"], "doc17");
    let (_, jobs) = s.get("/v1/jobs");
    assert!(jobs["data"].as_array().unwrap().iter().any(|j| j["id"] == started["job_id"]));
    let (status, body) = s.get("/v1/jobs/job-nope");
    assert_openai_error(status, &body, 404);
    // Server-side paths are refused unless the server names an ingest root.
    let (status, body) = s.post("/v1/collections/api-ingest/ingest", &json!({"path": "corpus.jsonl"}));
    assert_eq!(assert_openai_error(status, &body, 403)["code"], "forbidden");
    let r = client()
        .post(format!("{}/v1/collections/api-ingest/ingest", s.url))
        .header("content-type", "application/x-ndjson")
        .body("")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
}

#[test]
fn server_side_paths_under_the_ingest_root() {
    let root = std::env::temp_dir().join(format!("ragway-ingest-root-{}", std::process::id()));
    std::fs::create_dir_all(root.join("notes")).unwrap();
    std::fs::write(root.join("notes/one.md"), "# First note\n\nOtters hold hands while sleeping.").unwrap();
    std::fs::write(root.join("notes/two.txt"), "Octopuses have three hearts.").unwrap();
    let s = Server::start(&["--ingest-root", root.to_str().unwrap()]);
    s.wait_ready();
    assert_eq!(s.post("/v1/collections", &json!({"name": "notes"})).0, 201);
    let (status, r) = s.post("/v1/collections/notes/ingest", &json!({"path": "notes"}));
    assert_eq!(status, 202, "{r}");
    let job = wait_job(&s, r["job_id"].as_str().unwrap());
    assert_eq!(job["progress"]["documents_written"], 2, "{job}");
    let (status, d) = s.get("/v1/collections/notes/documents/one.md");
    assert_eq!((status, d["title"].as_str()), (200, Some("First note")));
    let (status, body) = s.post("/v1/collections/notes/ingest", &json!({"path": "../outside"}));
    assert_eq!(assert_openai_error(status, &body, 400)["param"], "path");
    let _ = std::fs::remove_dir_all(root);
}

#[test]
fn ingest_cli_then_serve_the_same_data_dir() {
    let data = std::env::temp_dir().join(format!("ragway-cli-ingest-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../index/tests/data/scifact_sample.jsonl");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ragway"))
        .args(["ingest", "--collection", "sci", "--input"])
        .arg(&corpus)
        .arg("--models-dir")
        .arg(crate::common::models_dir())
        .arg("--data-dir")
        .arg(&data)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("run ragway ingest");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(report["state"], "done");
    assert_eq!(report["progress"]["documents_written"], 40);
    // The server opens what the CLI wrote.
    let s = Server::start_in(&data, &[]);
    s.wait_ready();
    let (_, info) = s.get("/v1/collections/sci");
    assert_eq!(info["documents"], 40, "{info}");
    let (_, r) = s
        .post("/v1/collections/sci/search", &json!({"query": "white matter diffusion in preterm infants", "top_k": 1}));
    assert_eq!(r["results"][0]["document_id"], "4983");
    drop(s);
    let _ = std::fs::remove_dir_all(&data);
}

/// Collections without a model: documents, searches and JSONL ingestion bring their own
/// vectors, over REST and GraphQL; bad vectors are 400s that name the document.
#[test]
fn own_vectors_over_rest_and_graphql() {
    let s = shared();
    let (status, body) = s.post("/v1/collections", &json!({"name": "byo", "model": null}));
    assert_eq!(assert_openai_error(status, &body, 400)["param"], "dimension");
    let (status, body) = s.post("/v1/collections", &json!({"name": "byo", "dimension": 3}));
    assert_eq!(assert_openai_error(status, &body, 400)["param"], "dimension");
    let (status, info) = s.post("/v1/collections", &json!({"name": "byo", "model": null, "dimension": 3}));
    assert_eq!(status, 201, "{info}");
    assert!(info["settings"]["model"].is_null(), "{info}");
    assert_eq!(info["settings"]["dimension"], 3);

    let docs = json!({"documents": [
        {"id": "x", "text": "Points along the first axis, such as glaciers.", "vector": [1.0, 0.1, 0.0]},
        {"id": "yz", "chunks": [
            {"text": "The second axis holds deserts.", "vector": [0.0, 1.0, 0.1]},
            {"text": "The third axis holds oceans.", "vector": [0.1, 0.0, 1.0]}
        ], "metadata": {"pair": true}}
    ]});
    let (status, r) = s.post("/v1/collections/byo/documents", &docs);
    assert_eq!(status, 200, "{r}");
    assert_eq!((r["upserted"].as_u64(), r["chunks"].as_u64()), (Some(2), Some(3)));
    let (_, r) = s.post("/v1/collections/byo/search", &json!({"vector": [0.0, 0.1, 0.9], "mode": "dense", "top_k": 1}));
    assert_eq!(r["results"][0]["chunk_id"], "yz#1", "{r}");
    let (_, r) = s.post("/v1/collections/byo/search", &json!({"query": "glaciers", "mode": "keyword"}));
    assert_eq!(r["results"][0]["document_id"], "x", "{r}");
    let (_, r) =
        s.post("/v1/collections/byo/search", &json!({"query": "deserts", "vector": [0.0, 1.0, 0.0], "top_k": 2}));
    assert_eq!(r["results"][0]["chunk_id"], "yz#0", "{r}");

    // Bad vectors and missing ones: 400s naming the document; nothing is written.
    let (status, body) = s.post(
        "/v1/collections/byo/documents",
        &json!({"documents": [{"id": "short", "text": "t", "vector": [1.0, 2.0]}]}),
    );
    let e = assert_openai_error(status, &body, 400);
    assert_eq!(e["param"], "vector");
    assert!(e["message"].as_str().unwrap().contains("`short`"), "{e}");
    let (status, body) = s.post(
        "/v1/collections/byo/documents",
        &json!({"documents": [{"id": "huge", "text": "t", "vector": [1e39, 0.0, 0.0]}]}),
    );
    let e = assert_openai_error(status, &body, 400);
    assert!(e["message"].as_str().unwrap().contains("`huge`"), "{e}");
    let (status, body) =
        s.post("/v1/collections/byo/documents", &json!({"documents": [{"id": "plain", "text": "No vector."}]}));
    let e = assert_openai_error(status, &body, 400);
    assert!(e["message"].as_str().unwrap().contains("`plain`"), "{e}");
    let (status, body) = s.post("/v1/collections/byo/search", &json!({"query": "deserts", "mode": "dense"}));
    assert_eq!(assert_openai_error(status, &body, 400)["param"], "vector");
    let (status, body) = s.post("/v1/collections/byo/search", &json!({"vector": [1.0, 0.0], "mode": "dense"}));
    assert_eq!(assert_openai_error(status, &body, 400)["param"], "vector");
    let (_, info) = s.get("/v1/collections/byo");
    assert_eq!(info["documents"], 2);

    // JSONL ingestion carries vectors too; a bad line fails alone, with its line number.
    let body = [
        json!({"id": "j1", "text": "Ingested with its vector.", "vector": [0.7, 0.7, 0.0]}).to_string(),
        json!({"id": "j2", "text": "Wrong size.", "vector": [1.0]}).to_string(),
    ]
    .join("\n");
    let (job, _) = ingest_jsonl(s, "byo", body);
    assert_eq!(
        (job["progress"]["documents_written"].as_u64(), job["progress"]["documents_failed"].as_u64()),
        (Some(1), Some(1)),
        "{job}"
    );
    assert_eq!(job["errors"][0]["line"], 2, "{job}");
    let (_, r) = s.post("/v1/collections/byo/search", &json!({"vector": [0.7, 0.7, 0.0], "mode": "dense", "top_k": 1}));
    assert_eq!(r["results"][0]["document_id"], "j1", "{r}");

    // GraphQL: the same inputs, the same checks.
    let gql = |query: &str, variables: Value| -> Value {
        client()
            .post(format!("{}/graphql", s.url))
            .json(&json!({"query": query, "variables": variables}))
            .send()
            .unwrap()
            .json()
            .unwrap()
    };
    let v = gql(
        "mutation($d: [DocumentInput!]!) { upsertDocuments(collection: \"byo\", documents: $d) { upserted chunks } }",
        json!({"d": [{"id": "g", "text": "Sent through GraphQL.", "vector": [0.0, 0.0, 1.0]}]}),
    );
    assert_eq!(v["data"]["upsertDocuments"]["upserted"], 1, "{v}");
    let v = gql(
        "query($v: [Float!]) { search(collection: \"byo\", vector: $v, mode: DENSE, topK: 2) { chunkId } collection(name: \"byo\") { model dimension } }",
        json!({"v": [0.0, 0.05, 1.0]}),
    );
    assert_eq!(v["data"]["search"][0]["chunkId"], "g#0", "{v}");
    assert!(v["data"]["collection"]["model"].is_null() && v["data"]["collection"]["dimension"] == 3, "{v}");
    let v = gql(
        "mutation($d: [DocumentInput!]!) { upsertDocuments(collection: \"byo\", documents: $d) { upserted } }",
        json!({"d": [{"id": "gbad", "text": "t", "vector": [1.0]}]}),
    );
    let e = &v["errors"][0];
    assert_eq!(e["extensions"]["status"], 400, "{v}");
    assert!(e["message"].as_str().unwrap().contains("`gbad`"), "{v}");
}

/// Collections in PostgreSQL + pgvector (`--postgres-url`, a real server from
/// `scripts/setup-postgres.sh`): the same REST and GraphQL API, then the database stopped
/// under the running gateway (503 with `Retry-After`, `/ready` unready) and started again
/// (served again without restarting ragway).
#[test]
fn collections_in_postgres_over_rest_and_graphql_and_the_database_going_down() {
    let pg = ragway_index::postgres::LocalServer::from_env().unwrap_or_else(|e| panic!("{e}"));
    let s = Server::start(&["--postgres-url", &pg.url()]);
    s.wait_ready();
    let (status, info) = s.post("/v1/collections", &json!({"name": "in-pg"}));
    assert_eq!(status, 201, "{info}");
    assert_eq!(info["storage"], "postgres");
    let docs = json!({"wait": true, "documents": [
        {"id": "cats", "text": "The domestic cat is a small carnivorous mammal that purrs and hunts mice.", "metadata": {"year": 2001}},
        {"id": "rocket", "text": "Liquid-fuel rockets burn kerosene and liquid oxygen to reach orbit.", "metadata": {"year": 2005}}]});
    let (status, r) = s.post("/v1/collections/in-pg/documents", &docs);
    assert_eq!(status, 200, "{r}");
    let (status, r) =
        s.post("/v1/collections/in-pg/search", &json!({"query": "a feline pet", "top_k": 1, "mode": "dense"}));
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["results"][0]["document_id"], "cats");
    let (_, r) =
        s.post("/v1/collections/in-pg/search", &json!({"query": "kerosene", "filter": {"key": "year", "gte": 2003}}));
    assert_eq!(r["results"][0]["document_id"], "rocket", "{r}");
    let (status, r) = s.post("/graphql", &json!({"query": "{ collections { name storage documents } }"}));
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["data"]["collections"][0], json!({"name": "in-pg", "storage": "postgres", "documents": 2}));

    pg.stop().unwrap();
    let r = client()
        .post(format!("{}/v1/collections/in-pg/search", s.url))
        .json(&json!({"query": "a feline pet"}))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    assert!(r.headers().get("retry-after").is_some());
    let body: Value = r.json().unwrap();
    assert_openai_error(503, &body, 503);
    assert_eq!(body["error"]["code"], "storage_unavailable", "{body}");
    let (status, ready) = s.get("/ready");
    assert_eq!((status, ready["index"].as_str()), (503, Some("storage_unavailable")), "{ready}");

    pg.start_again().unwrap();
    s.wait_ready();
    let (status, r) =
        s.post("/v1/collections/in-pg/search", &json!({"query": "a feline pet", "top_k": 1, "mode": "dense"}));
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["results"][0]["document_id"], "cats");
}

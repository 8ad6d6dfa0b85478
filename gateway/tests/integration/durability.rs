//! Every acknowledged write survives `kill -9`, in both halves of the index; a batch that
//! was in flight is either wholly present or wholly absent.

use crate::common::{client, Server};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const BATCH: usize = 4;
const WORDS: [&str; 16] = [
    "amber", "basalt", "cobalt", "dune", "ember", "fjord", "garnet", "harbor", "indigo", "jasper", "kelp", "lagoon",
    "marble", "nectar", "obsidian", "prairie",
];

fn text(batch: usize, i: usize) -> String {
    let n = batch * BATCH + i;
    format!(
        "Record {n}: the {} {} near the {} keeps token zz{n}q.",
        WORDS[n % 16],
        WORDS[(n / 16) % 16],
        WORDS[(n / 256 + n * 7) % 16]
    )
}

struct Writer {
    acked: Arc<Mutex<Vec<usize>>>,
    attempted: Arc<Mutex<Vec<usize>>>,
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<()>,
}

fn start_writer(url: String, first_batch: usize) -> Writer {
    let acked = Arc::new(Mutex::new(Vec::new()));
    let attempted = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let (a, t, st) = (acked.clone(), attempted.clone(), stop.clone());
    let handle = std::thread::spawn(move || {
        let mut batch = first_batch;
        while !st.load(Ordering::Relaxed) {
            let docs: Vec<Value> = (0..BATCH)
                .map(|i| json!({"id": format!("b{batch}-{i}"), "text": text(batch, i), "metadata": {"batch": batch}}))
                .collect();
            t.lock().unwrap().push(batch);
            // Alternate waiting for visibility and answering once durable.
            let body = json!({"documents": docs, "wait": batch % 2 == 0});
            match client().post(format!("{url}/v1/collections/crash/documents")).json(&body).send() {
                Ok(r) if r.status() == 200 => a.lock().unwrap().push(batch),
                _ => return, // the server died under us
            }
            batch += 1;
        }
    });
    Writer { acked, attempted, stop, handle }
}

fn check(s: &Server, acked: &[usize], attempted: &[usize]) -> usize {
    let (_, info) = s.get("/v1/collections/crash");
    assert_eq!(info["state"], "ready", "{info}");
    let docs = info["documents"].as_u64().unwrap() as usize;
    assert_eq!(info["chunks"].as_u64().unwrap() as usize, docs, "one chunk per document: {info}");
    assert_eq!(info["keyword_chunks"].as_u64().unwrap() as usize, docs, "{info}");
    assert!(info["dense_points"].as_u64().unwrap() as usize >= docs);
    // Acknowledged batches: every document present and found by each half on its own.
    for &b in acked {
        for i in 0..BATCH {
            let id = format!("b{b}-{i}");
            let (status, _) = s.get(&format!("/v1/collections/crash/documents/{id}"));
            assert_eq!(status, 200, "acknowledged document {id} lost");
            let n = b * BATCH + i;
            let (_, r) = s.post("/v1/collections/crash/search", &json!({"query": format!("zz{n}q"), "mode": "keyword", "top_k": 1}));
            assert_eq!(r["results"][0]["document_id"], id.as_str(), "keyword half lost {id}: {r}");
            let (_, r) = s.post("/v1/collections/crash/search", &json!({"query": text(b, i), "mode": "dense", "top_k": 3}));
            let found = r["results"].as_array().unwrap().iter().any(|h| h["document_id"] == id.as_str());
            assert!(found, "dense half lost {id}: {r}");
        }
    }
    // Batches sent but not acknowledged: all or nothing.
    let mut present_unacked = 0;
    for &b in attempted.iter().filter(|b| !acked.contains(b)) {
        let present: Vec<bool> =
            (0..BATCH).map(|i| s.get(&format!("/v1/collections/crash/documents/b{b}-{i}")).0 == 200).collect();
        assert!(present.iter().all(|p| *p) || present.iter().all(|p| !*p), "batch {b} half present: {present:?}");
        if present[0] {
            present_unacked += 1;
            let (_, r) = s.post("/v1/collections/crash/search", &json!({"query": format!("zz{}q", b * BATCH), "mode": "keyword", "top_k": 1}));
            assert_eq!(r["results"][0]["document_id"], format!("b{b}-0").as_str());
        }
    }
    assert_eq!(docs, (acked.len() + present_unacked) * BATCH, "{info}");
    docs
}

#[test]
fn acknowledged_writes_survive_sigkill() {
    let data = std::env::temp_dir().join(format!("ragway-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let mut seed = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().subsec_nanos() as u64 | 1;
    let mut rand_ms = |lo: u64, hi: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        lo + seed % (hi - lo)
    };
    let mut acked_all: Vec<usize> = Vec::new();
    let mut attempted_all: Vec<usize> = Vec::new();
    let mut next_batch = 0;
    for round in 0..3 {
        // A short commit interval so that kills land between, during and after commits.
        let mut s = Server::start_in(&data, &["--commit-interval-ms", "50"]);
        s.wait_ready();
        if round == 0 {
            assert_eq!(s.post("/v1/collections", &json!({"name": "crash"})).0, 201);
        } else {
            check(&s, &acked_all, &attempted_all);
        }
        let writer = start_writer(s.url.clone(), next_batch);
        let started = Instant::now();
        let delay = rand_ms(800, 2500);
        while started.elapsed() < Duration::from_millis(delay) {
            std::thread::sleep(Duration::from_millis(10));
        }
        s.kill9();
        writer.stop.store(true, Ordering::Relaxed);
        writer.handle.join().unwrap();
        let acked = writer.acked.lock().unwrap().clone();
        let attempted = writer.attempted.lock().unwrap().clone();
        assert!(!acked.is_empty(), "round {round}: no write was acknowledged in {delay} ms");
        next_batch = attempted.iter().max().unwrap() + 1;
        acked_all.extend(acked);
        attempted_all.extend(attempted);
    }
    let s = Server::start_in(&data, &[]);
    s.wait_ready();
    let docs = check(&s, &acked_all, &attempted_all);
    assert!(docs >= acked_all.len() * BATCH);
    drop(s);
    let _ = std::fs::remove_dir_all(&data);
}

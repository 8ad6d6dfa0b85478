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

/// A fresh data directory for a crash test, named after it and this process.
fn crash_dir(tag: &str) -> std::path::PathBuf {
    let data = std::env::temp_dir().join(format!("ragway-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    data
}

/// Random integers in `lo..hi` (xorshift64 seeded from the clock): each run kills at other
/// points.
fn clock_seeded() -> impl FnMut(u64, u64) -> u64 {
    let mut seed = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().subsec_nanos() as u64 | 1;
    move |lo, hi| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        lo + seed % (hi - lo)
    }
}

#[test]
fn acknowledged_writes_survive_sigkill() {
    let data = crash_dir("crash");
    let mut rand_ms = clock_seeded();
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

/// What the clients were told, to check a restarted server against.
#[derive(Default)]
struct Acked {
    /// Documents whose last acknowledged operation was an upsert (id → text number).
    present: std::collections::HashMap<String, usize>,
    /// Documents whose last acknowledged operation was a delete.
    deleted: std::collections::HashSet<String>,
    /// Scratch collections whose delete was acknowledged / whose create was.
    dropped: std::collections::HashSet<String>,
    created: std::collections::HashSet<String>,
    /// Ids and collections touched by the operation in flight at the kill: either state.
    uncertain: std::collections::HashSet<String>,
}

/// One client doing upserts, deletes, compactions and collection create/delete cycles, one
/// request at a time, until the server dies.
fn mixed_workload(url: String, acked: Arc<Mutex<Acked>>, first: usize, seed: u64) {
    let mut rng = seed | 1;
    let mut next = |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let post = |path: &str, body: &Value| client().post(format!("{url}{path}")).json(body).send();
    let mut n = first;
    for step in 0.. {
        let op = next(10);
        let ok = match op {
            0..=4 => {
                let ids: Vec<String> = (0..3).map(|i| format!("m{n}-{i}")).collect();
                let docs: Vec<Value> = ids.iter().enumerate().map(|(i, id)| json!({"id": id, "text": text(n, i)})).collect();
                acked.lock().unwrap().uncertain.extend(ids.iter().cloned());
                let r = post("/v1/collections/mixed/documents", &json!({"documents": docs, "wait": step % 2 == 0}));
                let ok = matches!(&r, Ok(r) if r.status() == 200);
                if ok {
                    let mut a = acked.lock().unwrap();
                    for (i, id) in ids.iter().enumerate() {
                        a.uncertain.remove(id);
                        a.deleted.remove(id);
                        a.present.insert(id.clone(), n * BATCH + i);
                    }
                }
                n += 1;
                ok
            }
            5 | 6 => {
                let victims: Vec<String> = {
                    let a = acked.lock().unwrap();
                    let mut ids: Vec<&String> = a.present.keys().collect();
                    ids.sort();
                    let k = ids.len().min(2);
                    ids.iter().rev().take(k).map(|s| s.to_string()).collect()
                };
                if victims.is_empty() {
                    continue;
                }
                acked.lock().unwrap().uncertain.extend(victims.iter().cloned());
                let r = post("/v1/collections/mixed/documents/delete", &json!({"ids": victims}));
                let ok = matches!(&r, Ok(r) if r.status() == 200);
                if ok {
                    let mut a = acked.lock().unwrap();
                    for id in &victims {
                        a.uncertain.remove(id);
                        a.present.remove(id);
                        a.deleted.insert(id.clone());
                    }
                }
                ok
            }
            7 => matches!(post("/v1/collections/mixed/compact", &json!({})), Ok(r) if r.status() == 200),
            _ => {
                let name = format!("scratch-{n}");
                n += 1;
                acked.lock().unwrap().uncertain.insert(name.clone());
                let created = matches!(post("/v1/collections", &json!({"name": name})), Ok(r) if r.status() == 201);
                if !created {
                    return;
                }
                acked.lock().unwrap().created.insert(name.clone());
                let filled = post(&format!("/v1/collections/{name}/documents"), &json!({"documents": [{"id": "x", "text": "scratch"}]}));
                if !matches!(filled, Ok(r) if r.status() == 200) {
                    return;
                }
                let deleted = client().delete(format!("{url}/v1/collections/{name}")).send();
                let ok = matches!(deleted, Ok(r) if r.status() == 200);
                if ok {
                    let mut a = acked.lock().unwrap();
                    a.uncertain.remove(&name);
                    a.created.remove(&name);
                    a.dropped.insert(name);
                }
                ok
            }
        };
        if !ok {
            return; // the server died under us
        }
    }
}

fn check_mixed(s: &Server, acked: &Acked) {
    let (st, list) = s.get("/v1/collections");
    assert_eq!(st, 200, "{list}");
    let names: std::collections::HashSet<String> =
        list["data"].as_array().unwrap().iter().map(|c| c["settings"]["name"].as_str().unwrap().to_string()).collect();
    for name in acked.dropped.iter().filter(|n| !acked.uncertain.contains(*n)) {
        assert!(!names.contains(name), "deleted collection {name} came back");
    }
    for name in acked.created.iter().filter(|n| !acked.uncertain.contains(*n)) {
        assert!(names.contains(name), "acknowledged collection {name} is missing");
    }
    for (id, &n) in acked.present.iter().filter(|(id, _)| !acked.uncertain.contains(*id)) {
        assert_eq!(s.get(&format!("/v1/collections/mixed/documents/{id}")).0, 200, "acknowledged document {id} lost");
        let (_, r) = s.post("/v1/collections/mixed/search", &json!({"query": format!("zz{n}q"), "mode": "keyword", "top_k": 1}));
        assert_eq!(r["results"][0]["document_id"], id.as_str(), "keyword half lost {id}: {r}");
    }
    for id in acked.deleted.iter().filter(|id| !acked.uncertain.contains(*id)) {
        assert_eq!(s.get(&format!("/v1/collections/mixed/documents/{id}")).0, 404, "deleted document {id} came back");
    }
    let (_, info) = s.get("/v1/collections/mixed");
    let certain_present = acked.present.keys().filter(|id| !acked.uncertain.contains(*id)).count();
    let docs = info["documents"].as_u64().unwrap() as usize;
    assert!(docs >= certain_present && docs <= certain_present + acked.uncertain.len(), "{docs} documents: {info}");
}

/// `kill -9` at random points while a client upserts, deletes, compacts, and creates and
/// deletes collections; 20 runs on one data directory. Every run reopens, no acknowledged
/// write is lost, no acknowledged delete (of a document or a collection) is undone.
#[test]
fn twenty_sigkills_during_upserts_deletes_compaction_and_collection_deletes() {
    let data = crash_dir("crash-mixed");
    let mut rand = clock_seeded();
    let acked = Arc::new(Mutex::new(Acked::default()));
    let mut first = 0;
    for run in 0..20 {
        let mut s = Server::start_in(&data, &["--commit-interval-ms", "50"]);
        s.wait_ready();
        if run == 0 {
            assert_eq!(s.post("/v1/collections", &json!({"name": "mixed"})).0, 201);
        } else {
            check_mixed(&s, &acked.lock().unwrap());
            // What was in flight is settled now: read its state back as the truth.
            let mut a = acked.lock().unwrap();
            let uncertain: Vec<String> = a.uncertain.drain().collect();
            for u in uncertain {
                if u.starts_with("scratch-") {
                    a.created.remove(&u);
                    a.dropped.remove(&u);
                    if s.get(&format!("/v1/collections/{u}")).0 == 200 {
                        a.created.insert(u);
                    } else {
                        a.dropped.insert(u);
                    }
                } else if s.get(&format!("/v1/collections/mixed/documents/{u}")).0 == 200 {
                    a.deleted.remove(&u);
                    let n: usize = u[1..].split('-').next().unwrap().parse().unwrap();
                    let i: usize = u.rsplit('-').next().unwrap().parse().unwrap();
                    a.present.insert(u, n * BATCH + i);
                } else {
                    a.present.remove(&u);
                    a.deleted.insert(u);
                }
            }
        }
        let (url, shared) = (s.url.clone(), acked.clone());
        let worker_seed = rand(1, u64::MAX);
        let worker = std::thread::spawn(move || mixed_workload(url, shared, first, worker_seed));
        std::thread::sleep(Duration::from_millis(rand(300, 1500)));
        s.kill9();
        worker.join().unwrap();
        first += 1000;
    }
    let s = Server::start_in(&data, &[]);
    s.wait_ready();
    let a = acked.lock().unwrap();
    check_mixed(&s, &a);
    assert!(a.present.len() >= 20, "too little was acknowledged to test anything: {}", a.present.len());
    eprintln!(
        "crash test: 20 kill -9 runs, all reopened; {} documents acknowledged and present, {} acknowledged deletes \
         absent, {} deleted collections absent, {} collections present, 0 lost",
        a.present.len(),
        a.deleted.len(),
        a.dropped.len(),
        a.created.len()
    );
    drop(a);
    drop(s);
    let _ = std::fs::remove_dir_all(&data);
}

/// A unit vector of 8 dimensions for document `n` (splitmix64 of `n`).
fn own_vector(n: usize) -> Vec<f32> {
    let mut rng = ragway_engine::rng::SplitMix64::new(n as u64);
    let v: Vec<f32> = (0..8).map(|_| rng.next_f32() - 0.5).collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.into_iter().map(|x| x / norm).collect()
}

const BIG_BATCH: usize = 2_500;

/// The documents of batch `b` of the own-vector collection.
fn big_batch(b: usize) -> Value {
    let docs: Vec<Value> = (b * BIG_BATCH..(b + 1) * BIG_BATCH)
        .map(|n| json!({"id": format!("v{n}"), "text": format!("vector document {n}"), "vector": own_vector(n)}))
        .collect();
    json!({"documents": docs})
}

/// Acknowledged batches of the own-vector collection are there (their first and last
/// documents, by id and by their own vector), an unacknowledged one wholly or not at all.
fn check_big(s: &Server, acked: &[usize], attempted: &[usize]) {
    let (_, info) = s.get("/v1/collections/big");
    assert_eq!(info["state"], "ready", "{info}");
    let mut expected = acked.len() * BIG_BATCH;
    for &b in attempted.iter().filter(|b| !acked.contains(b)) {
        let first = s.get(&format!("/v1/collections/big/documents/v{}", b * BIG_BATCH)).0 == 200;
        let last = s.get(&format!("/v1/collections/big/documents/v{}", (b + 1) * BIG_BATCH - 1)).0 == 200;
        assert_eq!(first, last, "batch {b} half present");
        expected += if first { BIG_BATCH } else { 0 };
    }
    assert_eq!(info["documents"].as_u64().unwrap() as usize, expected, "{info}");
    for &b in acked {
        for n in [b * BIG_BATCH, (b + 1) * BIG_BATCH - 1] {
            assert_eq!(s.get(&format!("/v1/collections/big/documents/v{n}")).0, 200, "acknowledged v{n} lost");
            let (_, r) =
                s.post("/v1/collections/big/search", &json!({"vector": own_vector(n), "mode": "dense", "top_k": 1}));
            assert_eq!(r["results"][0]["document_id"], format!("v{n}").as_str(), "dense half lost v{n}: {r}");
        }
    }
}

/// `kill -9` around the periodic save of the graph and the table, which runs beside writes
/// once 50,000 points were added: every restart opens with every acknowledged write, from
/// that save plus the log's tail, or from the log alone when the kill cut the save short.
#[test]
fn sigkills_around_background_graph_saves_lose_nothing() {
    let data = crash_dir("crash-save");
    let mut rand = clock_seeded();
    let (mut acked, mut attempted) = (Vec::new(), Vec::new());
    // Restarts that opened from a saved graph, and kills that landed while a save ran.
    let (mut loaded_saves, mut mid_save) = (0, 0);
    let loaded = |s: &Server| -> usize {
        s.log_field("graph_points_loaded").and_then(|v| v.parse().ok()).expect("the open's log line")
    };
    for round in 0..4 {
        let mut s = Server::start_in(&data, &["--commit-interval-ms", "50"]);
        s.wait_ready();
        if round == 0 {
            let body = json!({"name": "big", "model": null, "dimension": 8});
            assert_eq!(s.post("/v1/collections", &body).0, 201);
        } else {
            check_big(&s, &acked, &attempted);
            loaded_saves += usize::from(loaded(&s) > 0);
        }
        // Past 50,000 new points (20 batches) a save starts; the kill lands before, during
        // or after it.
        let first = attempted.iter().max().map_or(0, |b| b + 1);
        let kill_after = first + rand(19, 24) as usize;
        let done = Arc::new(Mutex::new(Vec::new()));
        let (url, done2) = (s.url.clone(), done.clone());
        let writer = std::thread::spawn(move || {
            for b in first.. {
                done2.lock().unwrap().push((b, false));
                match client().post(format!("{url}/v1/collections/big/documents")).json(&big_batch(b)).send() {
                    Ok(r) if r.status() == 200 => done2.lock().unwrap().last_mut().unwrap().1 = true,
                    _ => return,
                }
            }
        });
        // Every other round aims at the save itself: the kill follows its start by 0-30 ms.
        let aim_at_save = round % 2 == 0;
        let started = Instant::now();
        loop {
            let due = if aim_at_save {
                s.log_has("saving the graph")
            } else {
                done.lock().unwrap().iter().any(|&(b, ok)| ok && b >= kill_after)
            };
            if due {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(300), "the writes stalled");
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(if aim_at_save { rand(0, 30) } else { rand(0, 400) }));
        s.kill9();
        writer.join().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        mid_save += usize::from(s.log_has("saving the graph") && !s.log_has("graph and table saved"));
        for (b, ok) in done.lock().unwrap().iter() {
            attempted.push(*b);
            if *ok {
                acked.push(*b);
            }
        }
    }
    let s = Server::start_in(&data, &[]);
    s.wait_ready();
    check_big(&s, &acked, &attempted);
    loaded_saves += usize::from(loaded(&s) > 0);
    eprintln!(
        "crash test: 4 kill -9 runs around background saves ({mid_save} while one was writing); {} documents \
         acknowledged, all present; {loaded_saves} of 4 restarts opened from a saved graph",
        acked.len() * BIG_BATCH
    );
    drop(s);
    let _ = std::fs::remove_dir_all(&data);
}

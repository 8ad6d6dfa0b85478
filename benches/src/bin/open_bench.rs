//! What a restart costs: the time from `Collection::open` to a collection that answers, with
//! the page cache warm and with the collection's files dropped from it, and the resident
//! memory per chunk once open.
//!
//! The collection holds `--n` documents of one chunk each that bring their own vectors
//! (`model: null`, clustered unit vectors of `--dim` dimensions) and SciFact abstracts as
//! their text (cycled; `--texts mixed` draws each text's sentences from random abstracts
//! instead, so that no two documents are alike), with a `bucket` metadata field. It is
//! written through the public API, closed gracefully (so the derived data is saved), then opened in a fresh child process per
//! measurement, so that the resident memory is the open collection's alone.
//!
//!     cargo run --release -p ragway-benches --bin open-bench -- --n 100000
//!
//! `--memory-limits-mib 800,1000,1400` then opens it once more per limit inside a memory
//! cgroup of that size (cgroup v1 or v2; needs the right to create one, as root in a VM or
//! container does), with the files dropped from the page cache first so that every page the
//! open and the searches read is charged to the cgroup: how fast the collection answers when
//! the machine holds only that much of it — the dense half alone, whole dense searches
//! (with their results' texts), hybrid searches (SciFact's query texts for the keyword
//! half), and the keyword half alone.

use clap::Parser;
use ragway_benches::{median, own_vectors_settings, unit, workspace_root, Clusters};
use ragway_engine::rng::SplitMix64 as Rng;
use ragway_index::store::DenseQuery;
use ragway_index::{Collection, DocumentInput, SearchMode, SearchRequest};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 100_000)]
    n: usize,
    #[arg(long, default_value_t = 384)]
    dim: usize,
    /// Opens per page-cache state (the median is reported).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Where to build the collection (a temporary directory when absent); an existing
    /// collection there is reused as is.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The collection's quantization (`none`, `f16`, `int8`).
    #[arg(long, default_value = "none")]
    quantization: String,
    /// Opens the collection in `--dir`, writes one more document and closes it, so that
    /// its graph and table are saved again in this build's formats; then measures.
    #[arg(long)]
    resave: bool,
    /// Internal: open the collection at this path, print one JSON line, exit.
    #[arg(long, hide = true)]
    open_only: Option<PathBuf>,
    /// With `--open-only`: drop the collection's files from the page cache first.
    #[arg(long, hide = true)]
    cold: bool,
    /// Memory limits (MiB) to open and search the collection under, one cgroup each.
    #[arg(long, value_delimiter = ',')]
    memory_limits_mib: Vec<u64>,
    /// With `--open-only`: join this cgroup before anything else.
    #[arg(long, hide = true)]
    cgroup: Option<PathBuf>,
    /// The documents' texts when the collection is written: `cycled` (SciFact's abstracts in
    /// turn, each repeated n / 5,183 times) or `mixed` (each one a title and 4–12 sentences
    /// drawn from random abstracts: SciFact's words and phrases, no two documents alike).
    #[arg(long, value_enum, default_value_t = Texts::Cycled)]
    texts: Texts,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Texts {
    Cycled,
    Mixed,
}

/// Resident memory: (anonymous, file-backed) bytes. File-backed pages are the mapped
/// files' page cache, shared and dropped under memory pressure.
fn rss_bytes() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (field("RssAnon:"), field("RssFile:"))
}

/// Resident bytes of the mappings of `dir`'s files, by the file's first path component
/// under `dir` (`keyword` for all of tantivy's files), from `/proc/self/smaps`.
fn resident_by_file(dir: &Path) -> std::collections::BTreeMap<String, u64> {
    let mut by = std::collections::BTreeMap::new();
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
    let mut current: Option<String> = None;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            // A mapping's header: address range, permissions, offset, device, inode, path.
            current = fields.nth(4).and_then(|path| {
                let rel = Path::new(path).strip_prefix(dir).ok()?;
                Some(rel.components().next()?.as_os_str().to_string_lossy().into_owned())
            });
        } else if first == "Rss:" {
            if let (Some(name), Some(kb)) = (&current, fields.next().and_then(|kb| kb.parse::<u64>().ok())) {
                *by.entry(name.clone()).or_default() += kb * 1024;
            }
        }
    }
    by
}

/// Major page faults of the whole process so far (reads that waited for the disk).
fn major_faults() -> u64 {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes the struct it is given.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) } == 0 {
        // SAFETY: written by the successful call above.
        return unsafe { ru.assume_init() }.ru_majflt as u64;
    }
    0
}

/// A memory cgroup limited to `bytes`, removed when dropped (v2 when the unified hierarchy
/// is mounted at /sys/fs/cgroup, v1's memory controller otherwise).
struct MemoryCgroup {
    path: PathBuf,
    v2: bool,
}

impl MemoryCgroup {
    fn new(name: &str, bytes: u64) -> anyhow::Result<MemoryCgroup> {
        let root = Path::new("/sys/fs/cgroup");
        let v2 = root.join("cgroup.controllers").exists();
        let path = if v2 { root.join(name) } else { root.join("memory").join(name) };
        std::fs::create_dir_all(&path).map_err(|e| {
            anyhow::anyhow!("cannot create the cgroup {} ({e}): --memory-limits-mib needs root", path.display())
        })?;
        let limit = if v2 { "memory.max" } else { "memory.limit_in_bytes" };
        std::fs::write(path.join(limit), bytes.to_string())?;
        Ok(MemoryCgroup { path, v2 })
    }

    /// The most memory the cgroup's processes were charged at once (anonymous and page cache).
    fn peak(&self) -> Option<u64> {
        let file = if self.v2 { "memory.peak" } else { "memory.max_usage_in_bytes" };
        std::fs::read_to_string(self.path.join(file)).ok()?.trim().parse().ok()
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        // Empty once the child has exited; its page cache moves to the parent cgroup.
        let _ = std::fs::remove_dir(&self.path);
    }
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Evicts a directory's files from the page cache (clean pages; no privileges needed).
fn drop_cache(dir: &Path) {
    for p in files(dir) {
        if let Ok(f) = std::fs::File::open(&p) {
            use std::os::fd::AsRawFd;
            // SAFETY: a valid descriptor; the call only advises the kernel.
            unsafe {
                libc::fdatasync(f.as_raw_fd());
                libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
            }
        }
    }
}

/// Queries searched (twice) under a memory limit.
const LIMITED_QUERIES: usize = 500;

/// Single-thread searches per second over `n` queries: `search(i)` for each, once to warm
/// up, then timed; and the major page faults both passes took.
fn timed_qps<T>(n: usize, search: impl Fn(usize) -> anyhow::Result<T>) -> anyhow::Result<(f64, u64)> {
    let faults = major_faults();
    for i in 0..n {
        search(i)?;
    }
    let t = Instant::now();
    for i in 0..n {
        search(i)?;
    }
    Ok((n as f64 / t.elapsed().as_secs_f64(), major_faults() - faults))
}

/// Single-thread dense searches per second over `queries` (and their major faults).
fn qps(c: &Collection, queries: &[Vec<f32>]) -> anyhow::Result<(f64, u64)> {
    timed_qps(queries.len(), |i| {
        Ok(c.search(&SearchRequest {
            top_k: 10,
            mode: SearchMode::Dense,
            vector: Some(queries[i].clone()),
            skip_drift: true,
            ..Default::default()
        })?)
    })
}

/// Single-thread hybrid searches per second: each query vector with a SciFact query's text
/// for the keyword half, fused.
fn hybrid_qps(c: &Collection, queries: &[Vec<f32>], texts: &[String]) -> anyhow::Result<(f64, u64)> {
    anyhow::ensure!(!texts.is_empty(), "no SciFact queries");
    timed_qps(queries.len(), |i| {
        Ok(c.search(&SearchRequest {
            top_k: 10,
            mode: SearchMode::Hybrid,
            query: texts[i % texts.len()].clone(),
            vector: Some(queries[i].clone()),
            skip_drift: true,
            ..Default::default()
        })?)
    })
}

/// Single-thread searches per second of the keyword half alone, at the hybrid default depth:
/// BM25 over the tantivy index, keys and scores only.
fn keyword_qps(c: &Collection, texts: &[String]) -> anyhow::Result<(f64, u64)> {
    anyhow::ensure!(!texts.is_empty(), "no SciFact queries");
    let view = c.store().view(None)?;
    let title_boost = c.settings().keyword.title_boost;
    timed_qps(LIMITED_QUERIES, |i| {
        Ok(view.keyword_search(
            &texts[i % texts.len()],
            ragway_index::collection::DEFAULT_HYBRID_CANDIDATES,
            title_boost,
        )?)
    })
}

/// SciFact's query texts, for the keyword half of hybrid searches.
fn query_texts() -> anyhow::Result<Vec<String>> {
    let queries = std::fs::read_to_string(workspace_root().join("../shared/data/scifact/queries.jsonl"))?;
    Ok(queries
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|q| q["text"].as_str().map(str::to_string))
        .collect())
}

/// Single-thread searches per second of the dense half alone: the store's ids and scores,
/// no chunk texts read for the results (the graph walk, the codes, the rescored vectors).
fn bare_qps(c: &Collection, queries: &[Vec<f32>]) -> anyhow::Result<(f64, u64)> {
    let view = c.store().view(None)?;
    let ef = c.settings().hnsw.ef;
    timed_qps(queries.len(), |i| {
        Ok(view.dense_search(&DenseQuery { vector: &queries[i], k: 10, ef, exact_scan_max: Some(0) })?)
    })
}

/// A pass's QPS when it ran, and its major faults (0 when it did not).
fn split(pass: Option<(f64, u64)>) -> (Option<f64>, u64) {
    (pass.map(|p| p.0), pass.map_or(0, |p| p.1))
}

/// Query vectors: random unit vectors near random stored ones' clusters (seeded).
fn queries(dim: usize) -> Vec<Vec<f32>> {
    let mut rng = Rng::new(7);
    (0..2000).map(|_| unit((0..dim).map(|_| rng.normal() as f32).collect())).collect()
}

fn open_only(dir: &Path, cold: bool, cgroup: Option<&Path>) -> anyhow::Result<()> {
    if let Some(cgroup) = cgroup {
        std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())?;
    }
    if cold {
        drop_cache(dir);
    }
    // The queries exist before the baseline, so that they are not counted as the collection's.
    let settings: Value = serde_json::from_slice(&std::fs::read(dir.join("settings.json"))?)?;
    let dim = settings["dimension"].as_u64().ok_or_else(|| anyhow::anyhow!("settings.json has no dimension"))? as usize;
    let mut queries = queries(dim);
    let mut texts = Vec::new();
    if cgroup.is_some() {
        // Searches that wait for the disk: fewer of them.
        queries.truncate(LIMITED_QUERIES);
        texts = query_texts()?;
    }
    let rss0 = rss_bytes();
    let t = Instant::now();
    let c = Collection::open_embedded_by(dir, None)?;
    // The first search proves the collection answers (and pays any lazy loading).
    let q: Vec<f32> = (0..dim).map(|i| if i == 0 { 1.0 } else { 0.0 }).collect();
    let r = c.search(&SearchRequest {
        top_k: 10,
        mode: SearchMode::Dense,
        vector: Some(q),
        skip_drift: true,
        ..Default::default()
    })?;
    let open_s = t.elapsed().as_secs_f64();
    let now = rss_bytes();
    let (rss, rss_file) = (now.0.saturating_sub(rss0.0), now.1.saturating_sub(rss0.1));
    let stats = c.open_stats();
    let (loaded, inserted) = (stats.graph_loaded, stats.graph_inserted);
    // Under a memory limit the searches run after a cold open too: they are the measurement.
    // First the dense half alone (what the index needs in memory), then whole searches (which
    // also read each result's text and record from the table).
    let limited = cgroup.is_some();
    let (bare, bare_faults) = split(limited.then(|| bare_qps(&c, &queries)).transpose()?);
    let (qps, search_faults) = split((!cold || limited).then(|| qps(&c, &queries)).transpose()?);
    // Then hybrid searches, whose keyword half reads the tantivy index's files too.
    let (hybrid, hybrid_faults) = split(limited.then(|| hybrid_qps(&c, &queries, &texts)).transpose()?);
    // And the keyword half alone (its index files are in memory by now).
    let (keyword, _) = split(limited.then(|| keyword_qps(&c, &texts)).transpose()?);
    // After the searches: what they brought in (vectors read from the page cache).
    let now = rss_bytes();
    let rss_searched = (now.0 + now.1).saturating_sub(rss0.0 + rss0.1);
    let anon_searched = now.0.saturating_sub(rss0.0);
    let by_file = resident_by_file(dir);
    println!(
        "{}",
        json!({"open_s": open_s, "rss_bytes": rss, "rss_file_bytes": rss_file, "hits": r.results.len(), "graph_loaded": loaded,
               "graph_inserted": inserted, "table_loaded": stats.table_loaded, "log_records": stats.log_records,
               "graph_and_keyword_ms": stats.graph_ms, "table_ms": stats.table_ms, "total_ms": stats.total_ms,
               "qps": qps, "rss_after_searches": rss_searched, "rss_anon_after_searches": anon_searched,
               "rss_by_file_after_searches": by_file, "search_major_faults": search_faults,
               "bare_qps": bare, "bare_major_faults": bare_faults, "hybrid_qps": hybrid,
               "hybrid_major_faults": hybrid_faults, "keyword_qps": keyword})
    );
    Ok(())
}

/// Document `i`'s (title, text): SciFact's abstract `i mod 5,183` (`cycled`), or a random
/// title and 4–12 sentences from random abstracts (`mixed`).
fn document_text(
    kind: Texts,
    i: usize,
    texts: &[(String, String)],
    pool: &[String],
    rng: &mut Rng,
) -> (String, String) {
    if kind == Texts::Cycled {
        return texts[i % texts.len()].clone();
    }
    let title = texts[rng.below(texts.len())].0.clone();
    let count = 4 + rng.below(9);
    let text = (0..count).map(|_| pool[rng.below(pool.len())].as_str()).collect::<Vec<_>>().join(" ");
    (title, text)
}

fn build(dir: &Path, n: usize, dim: usize, quantization: &str, kind: Texts) -> anyhow::Result<()> {
    let corpus = std::fs::read_to_string(workspace_root().join("../shared/data/scifact/corpus.jsonl"))?;
    let texts: Vec<(String, String)> = corpus
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|d| (d["title"].as_str().unwrap_or("").to_string(), d["text"].as_str().unwrap_or("").to_string()))
        .collect();
    anyhow::ensure!(!texts.is_empty(), "no SciFact texts");
    let pool: Vec<String> = texts.iter().flat_map(|(_, text)| ragway_prompts::rag::sentences(text)).collect();
    let mut rng = Rng::new(42);
    // Texts draw from their own generator, so that the vectors are those of a `cycled` build.
    let mut text_rng = Rng::new(43);
    let clusters = Clusters::new(dim, &mut rng);
    let settings = ragway_index::CollectionSettings {
        quantization: serde_json::from_value(json!(quantization))
            .map_err(|_| anyhow::anyhow!("unknown quantization {quantization}"))?,
        ..own_vectors_settings("open", dim)
    };
    let c = Collection::create_with(dir, settings, None)?;
    let t = Instant::now();
    let batch = 1000;
    for start in (0..n).step_by(batch) {
        let docs = (start..(start + batch).min(n))
            .map(|i| {
                let (title, text) = document_text(kind, i, &texts, &pool, &mut text_rng);
                let v = clusters.point(&mut rng);
                DocumentInput {
                    id: format!("d{i}"),
                    title: Some(title),
                    text,
                    metadata: Some(json!({"bucket": i % 1000})),
                    vector: Some(v),
                    ..Default::default()
                }
            })
            .collect();
        c.upsert(docs, false)?;
        if start % 50_000 == 0 && start > 0 {
            eprintln!("[open-bench] {start} documents written ({:.0} s)", t.elapsed().as_secs_f64());
        }
    }
    c.commit()?;
    let write_s = t.elapsed().as_secs_f64();
    eprintln!("[open-bench] single-thread QPS as built (in memory): {:.0}", qps(&c, &queries(dim))?.0);
    let t = Instant::now();
    c.close()?;
    eprintln!("[open-bench] {n} documents written in {write_s:.1} s, closed in {:.1} s", t.elapsed().as_secs_f64());
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(dir) = &args.open_only {
        return open_only(dir, args.cold, args.cgroup.as_deref());
    }
    let tmp = tempfile::tempdir()?;
    let dir = args.dir.clone().unwrap_or_else(|| tmp.path().join("open"));
    if !dir.join("settings.json").exists() {
        build(&dir, args.n, args.dim, &args.quantization, args.texts)?;
    } else if args.resave {
        let c = Collection::open_embedded_by(&dir, None)?;
        let dim = c.settings().dimension;
        let doc = DocumentInput {
            id: "resaved".into(),
            // A new version every time (an unchanged document is skipped, and nothing saved).
            text: format!(
                "One more document, so that closing saves the graph and the table again ({:?}).",
                std::time::SystemTime::now()
            ),
            vector: Some((0..dim).map(|i| if i == 1 { 1.0 } else { 0.0 }).collect()),
            ..Default::default()
        };
        c.upsert(vec![doc], true)?;
        let t = Instant::now();
        c.close()?;
        eprintln!("[open-bench] saved again in {:.1} s", t.elapsed().as_secs_f64());
    }
    let sizes: Vec<(String, u64)> = {
        let mut by: std::collections::BTreeMap<String, u64> = Default::default();
        for p in files(&dir) {
            let rel = p.strip_prefix(&dir).unwrap_or(&p);
            let top = rel.components().next().map(|c| c.as_os_str().to_string_lossy().into_owned()).unwrap_or_default();
            *by.entry(top).or_default() += std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
        }
        by.into_iter().collect()
    };
    let exe = std::env::current_exe()?;
    let mut report = json!({"n": args.n, "dim": args.dim, "quantization": args.quantization, "files_bytes": sizes});
    println!("| page cache | open (median s) | resident MiB (anonymous + file) | bytes per chunk (anonymous + file) | graph points loaded / inserted | table loaded / log records read | QPS after open | bytes per chunk after the searches (both) |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for cold in [false, true] {
        let mut runs = Vec::new();
        for _ in 0..args.repeats.max(1) {
            let mut cmd = Command::new(&exe);
            cmd.arg("--open-only").arg(&dir);
            if cold {
                cmd.arg("--cold");
            }
            let out = cmd.output()?;
            anyhow::ensure!(out.status.success(), "open failed: {}", String::from_utf8_lossy(&out.stderr));
            let line = String::from_utf8_lossy(&out.stdout);
            runs.push(serde_json::from_str::<Value>(line.trim())?);
        }
        let open_s = median(&runs.iter().map(|r| r["open_s"].as_f64().unwrap_or(f64::NAN)).collect::<Vec<_>>());
        let rss = median(&runs.iter().map(|r| r["rss_bytes"].as_f64().unwrap_or(f64::NAN)).collect::<Vec<_>>());
        let rss_file =
            median(&runs.iter().map(|r| r["rss_file_bytes"].as_f64().unwrap_or(f64::NAN)).collect::<Vec<_>>());
        let state = if cold { "dropped" } else { "warm" };
        println!(
            "| {state} | {open_s:.2} | {:.0} + {:.0} | {:.0} + {:.0} | {} / {} | {} / {} | {} | {:.0} |",
            rss / (1 << 20) as f64,
            rss_file / (1 << 20) as f64,
            rss / args.n as f64,
            rss_file / args.n as f64,
            runs[0]["graph_loaded"],
            runs[0]["graph_inserted"],
            runs[0]["table_loaded"],
            runs[0]["log_records"],
            runs[0]["qps"].as_f64().map_or("-".to_string(), |q| format!("{q:.0}")),
            runs[0]["rss_after_searches"].as_f64().unwrap_or(f64::NAN) / args.n as f64
        );
        report[state] = json!({"open_s": open_s, "rss_bytes": rss, "rss_file_bytes": rss_file, "runs": runs});
    }
    if let Some(r) = report["warm"]["runs"].get(0) {
        let per_chunk = |v: &Value| v.as_f64().unwrap_or(f64::NAN) / args.n as f64;
        let by_file: Vec<String> = r["rss_by_file_after_searches"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(name, bytes)| format!("{name} {:.0}", per_chunk(bytes)))
            .collect();
        println!(
            "\nbytes per chunk after the warm open's searches: anonymous {:.0}; mapped files: {}",
            per_chunk(&r["rss_anon_after_searches"]),
            by_file.join(", ")
        );
    }
    if !args.memory_limits_mib.is_empty() {
        println!("\n| memory limit | bytes per chunk | open (s) | dense half alone: QPS / major faults per search | whole searches (with texts): QPS / major faults per search | hybrid searches: QPS / major faults per search | keyword half alone (in memory by then): QPS | peak charged (MiB) |");
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
        let mut limited = Vec::new();
        for &mib in &args.memory_limits_mib {
            let bytes =
                mib.checked_mul(1 << 20).ok_or_else(|| anyhow::anyhow!("--memory-limits-mib {mib} is too large"))?;
            let cgroup = MemoryCgroup::new(&format!("ragway-open-bench-{}-{mib}", std::process::id()), bytes)?;
            let out = Command::new(&exe)
                .arg("--open-only")
                .arg(&dir)
                .arg("--cold")
                .arg("--cgroup")
                .arg(&cgroup.path)
                .output()?;
            let peak = cgroup.peak().map_or(f64::NAN, |b| b as f64 / (1 << 20) as f64);
            if !out.status.success() {
                // Killed by the kernel's OOM killer: the limit is below what the open needs.
                println!(
                    "| {mib} MiB | {:.0} | failed ({}) | - | - | - | - | {peak:.0} |",
                    bytes as f64 / args.n as f64,
                    out.status
                );
                limited.push(json!({"limit_mib": mib, "failed": out.status.to_string()}));
                continue;
            }
            let r: Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim())?;
            // Two passes over the queries: the warm-up one and the timed one.
            let per_search = |v: &Value| v.as_f64().unwrap_or(f64::NAN) / (2 * LIMITED_QUERIES) as f64;
            let number = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
            println!(
                "| {mib} MiB | {:.0} | {:.2} | {:.0} / {:.2} | {:.0} / {:.2} | {:.0} / {:.2} | {:.0} | {peak:.0} |",
                bytes as f64 / args.n as f64,
                number(&r["open_s"]),
                number(&r["bare_qps"]),
                per_search(&r["bare_major_faults"]),
                number(&r["qps"]),
                per_search(&r["search_major_faults"]),
                number(&r["hybrid_qps"]),
                per_search(&r["hybrid_major_faults"]),
                number(&r["keyword_qps"])
            );
            limited.push(json!({"limit_mib": mib, "peak_mib": peak, "run": r}));
        }
        report["memory_limits"] = json!(limited);
    }
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

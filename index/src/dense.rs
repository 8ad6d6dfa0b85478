//! The dense half: ragway's HNSW graph over chunk vectors ([`crate::hnsw`]), plus exact
//! search for filtered queries the graph cannot serve well.
//!
//! Cosine vectors are normalized when stored and scored by their dot product. Reported
//! scores are always "higher is better": cosine similarity, dot product, or the negated
//! Euclidean distance.

use crate::hnsw::{Cut, Graph, Params};
pub use crate::quant::Quantization;
use crate::simd::{dot, squared_l2};
use crate::topk::TopK;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, TryLockError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Distance {
    #[default]
    Cosine,
    Dot,
    L2,
}

impl Distance {
    /// Brings a vector into stored form (cosine: unit length). Zero vectors stay zero.
    pub fn prepare(self, v: &mut [f32]) {
        if self == Distance::Cosine {
            let norm = dot(v, v).sqrt();
            if norm > 0.0 {
                v.iter_mut().for_each(|x| *x /= norm);
            }
        }
    }

    /// Similarity of a prepared query and a stored vector; higher is better.
    pub fn score(self, q: &[f32], v: &[f32]) -> f32 {
        match self {
            Distance::Cosine | Distance::Dot => dot(q, v),
            Distance::L2 => -squared_l2(q, v).sqrt(),
        }
    }
}

/// HNSW parameters of a collection.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HnswParams {
    /// Links per node above layer 0 (layer 0 keeps twice as many).
    pub m: usize,
    pub ef_construction: usize,
    /// Search breadth when a request does not name one.
    pub ef: usize,
}

impl Default for HnswParams {
    fn default() -> Self {
        Self { m: 16, ef_construction: 200, ef: 64 }
    }
}

/// The collection's HNSW graph ([`crate::hnsw::Graph`]) behind a lock that is taken
/// exclusively only to grow it and to free deleted points. It holds the one stored copy of
/// each vector: chunks refer to their vector by point id. The points of deleted chunks are
/// filtered at search until [`DenseIndex::consolidate`] takes them out of the graph and
/// frees their slots for the next inserts.
pub struct DenseIndex {
    graph: RwLock<Graph>,
    /// Serializes batch inserts (each batch inserts in parallel).
    insert_lock: Mutex<()>,
    /// Held by [`DenseIndex::save_cut`] while it reads the graph, so that growing it waits
    /// here instead of at the graph's write lock: that lock prefers writers, and a grower
    /// queued there would hold every search back until the save ends.
    saving: Mutex<()>,
    /// Saves in progress ([`SaveCut`]s alive): inserts do not reuse free slots, and
    /// [`DenseIndex::consolidate`] does not free any, meanwhile, since a save writes the
    /// slots of its cut as they stand while it runs.
    saves: Arc<AtomicUsize>,
}

/// A cut of the graph ([`Cut`]) for [`DenseIndex::save_cut`]; while it lives, inserts take
/// fresh slots only.
pub struct SaveCut {
    cut: Cut,
    saves: Arc<AtomicUsize>,
}

impl SaveCut {
    /// Points the cut holds.
    pub fn points(&self) -> usize {
        self.cut.points()
    }
}

impl Drop for SaveCut {
    fn drop(&mut self) {
        self.saves.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What one [`DenseIndex::consolidate`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Consolidated {
    /// Points taken out of the graph (their slots are free).
    pub freed: usize,
    /// Neighbor lists rewritten.
    pub lists: usize,
    /// Points no walk reached any more, linked back in ([`Graph::reconnect_unreachable`]).
    pub linked: usize,
}

impl DenseIndex {
    pub fn new(
        params: HnswParams,
        quantization: Quantization,
        distance: Distance,
        dim: usize,
        capacity: usize,
    ) -> Self {
        let params = Params { m: params.m, ef_construction: params.ef_construction, quantization };
        let graph = Graph::new(dim, distance, params, capacity.max(1024));
        Self::from_graph(graph)
    }

    pub fn from_graph(graph: Graph) -> Self {
        Self {
            graph: RwLock::new(graph),
            insert_lock: Mutex::new(()),
            saving: Mutex::new(()),
            saves: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Reads a graph saved by [`DenseIndex::save`]; answers it with the log record it covers.
    pub fn load(path: &std::path::Path) -> crate::error::Result<(Self, u64)> {
        let (graph, covered) = Graph::load(path, 1024)?;
        Ok((Self::from_graph(graph), covered))
    }

    /// Inserts prepared vectors with their keys, in parallel, into free slots first (none
    /// while a save runs); returns their point ids in order.
    pub fn insert(&self, items: &[(&[f32], u64)]) -> Vec<u32> {
        let _one_batch = self.insert_lock.lock().unwrap_or_else(|e| e.into_inner());
        // Free slots change only while no batch runs (freed with the graph held
        // exclusively): counted once here, and without any, no insert takes the free
        // list's lock.
        let reusable = if self.saves.load(Ordering::Acquire) == 0 { self.read().free_len() } else { 0 };
        let reuse = reusable > 0;
        self.reserve_locked(items.len().saturating_sub(reusable));
        let g = self.read();
        if items.len() >= 64 {
            items.par_iter().map(|&(v, key)| g.insert_reusing(v, key, reuse)).collect()
        } else {
            items.iter().map(|&(v, key)| g.insert_reusing(v, key, reuse)).collect()
        }
    }

    /// Takes the points `dead` (whose chunks are gone) out of the graph and frees their
    /// slots, without a rebuild (see [`crate::hnsw`], "Deletes without a rebuild"). Writes
    /// wait only to mark them and, at the end, to free them; searches only while they are
    /// freed (a moment, with the graph held exclusively). The work is bounded by the
    /// caller's batch: one pass over the graph's lists, and a re-selection for each list
    /// that named a dead point.
    pub fn consolidate(&self, dead: &[u32]) -> Consolidated {
        let (marked, points) = {
            // Inserts running now may have chosen a dead point as a neighbor before it was
            // marked; the lock waits for them. Later ones never link to a marked point.
            let _no_inserts = self.insert_lock.lock().unwrap_or_else(|e| e.into_inner());
            let g = self.read();
            (g.mark_deleted(dead), g.len())
        };
        if marked == 0 {
            return Consolidated::default();
        }
        // In slices, each under a read guard of its own, so that growing the graph (which
        // takes the write lock) never waits for the whole pass.
        const SLICE: usize = 1 << 14;
        const BLOCK: usize = 256;
        let mut lists = 0;
        for start in (0..points).step_by(SLICE) {
            let end = (start + SLICE).min(points);
            let g = self.read();
            lists += (start..end)
                .step_by(BLOCK)
                .collect::<Vec<_>>()
                .into_par_iter()
                .map(|b| g.repair(b..(b + BLOCK).min(end)))
                .sum::<usize>();
        }
        let linked = self.read().reconnect_unreachable();
        // Freeing needs the graph exclusively: no insert batch running (they hold a read
        // guard throughout) and no save from its cut to its end. A save writes the slots
        // of its cut as they stand, beside a table taken at the cut that may still name
        // these points' chunks: a slot freed before the graph file is written would be
        // saved free while the saved table points at it. A save may take long, so the
        // check is retried, not waited on, and writes do not wait behind it.
        loop {
            let no_inserts = self.insert_lock.lock().unwrap_or_else(|e| e.into_inner());
            let not_saving = match self.saving.try_lock() {
                Ok(_) if self.saves.load(Ordering::Acquire) > 0 => None,
                Ok(guard) => Some(guard),
                Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
                Err(TryLockError::WouldBlock) => None,
            };
            if let Some(_not_saving) = not_saving {
                let freed = self.graph.write().unwrap_or_else(|e| e.into_inner()).free_deleted();
                drop(no_inserts);
                return Consolidated { freed, lists, linked };
            }
            drop(no_inserts);
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Makes room for `more` points beyond those in the graph, so that inserting them
    /// does not grow it.
    pub fn reserve(&self, more: usize) {
        let _no_inserts = self.insert_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.reserve_locked(more);
    }

    fn reserve_locked(&self, more: usize) {
        if !self.read().has_room(more) {
            let _not_saving = self.saving.lock().unwrap_or_else(|e| e.into_inner());
            let mut g = self.graph.write().unwrap_or_else(|e| e.into_inner());
            let want = (g.capacity() * 2).max(g.len() + more + 1024);
            *g = g.grown(want);
        }
    }

    /// The graph as it stands, for [`DenseIndex::save_cut`] (no insert runs while it is
    /// taken; until it is dropped, inserts do not reuse free slots).
    pub fn cut(&self) -> SaveCut {
        let _no_inserts = self.insert_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.saves.fetch_add(1, Ordering::AcqRel);
        SaveCut { cut: self.read().cut(), saves: self.saves.clone() }
    }

    /// Saves the points of `cut`, marked as covering the log up to `seq`, while inserts
    /// may go on (see [`Graph::save_cut`]). Growing the graph and freeing deleted points
    /// wait for it.
    pub fn save_cut(&self, path: &std::path::Path, seq: u64, cut: &SaveCut) -> crate::error::Result<()> {
        let _saving = self.saving.lock().unwrap_or_else(|e| e.into_inner());
        self.read().save_cut(path, seq, cut.cut)
    }

    /// Recomputes every point's code for `quant` (benchmarks; see
    /// [`Graph::set_quantization`]).
    pub fn set_quantization(&self, quant: Quantization) {
        let _no_inserts = self.insert_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.graph.write().unwrap_or_else(|e| e.into_inner()).set_quantization(quant);
    }

    /// The graph, for reading vectors by point id and searching.
    pub fn read(&self) -> RwLockReadGuard<'_, Graph> {
        self.graph.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Slots in the graph: points, deleted ones not yet freed, and free slots.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Points holding a vector: the graph's slots less the free ones.
    pub fn points(&self) -> usize {
        let g = self.read();
        g.len() - g.free_len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Saves the graph, marked as covering the log up to `seq`. No insert may run meanwhile
    /// (the collection holds its writer lock).
    pub fn save(&self, path: &std::path::Path, seq: u64) -> crate::error::Result<()> {
        let _no_inserts = self.insert_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.read().save(path, seq)
    }

    /// The `k` best points whose key passes `keep`, best first, as (key, score).
    ///
    /// The graph is walked unfiltered and the results filtered afterwards, widening the walk
    /// (4x each time) while too few pass; callers fall back to an exact scan when even the
    /// widest walk comes up short.
    pub fn search(&self, query: &[f32], k: usize, ef: usize, keep: &dyn Fn(u64) -> bool) -> Vec<(u64, f32)> {
        let g = self.read();
        let n = g.len();
        if k == 0 || n == 0 {
            return Vec::new();
        }
        let mut want = k;
        loop {
            let hits = g.search(query, want, ef.max(want), &|_| true);
            let walked_all = want >= n;
            let found = hits.len();
            let kept: Vec<(u64, f32)> =
                hits.into_iter().map(|(id, s)| (g.key(id), s)).filter(|(key, _)| keep(*key)).take(k).collect();
            if kept.len() >= k || walked_all || found < want || want >= MAX_WIDENED_WALK {
                return kept;
            }
            want = (want * 4).min(n).min(MAX_WIDENED_WALK);
        }
    }
}

/// The widest graph walk before the caller's exact scan takes over.
const MAX_WIDENED_WALK: usize = 16_384;

/// Exact top-`k` over `candidates`, best first; ties go to the smaller key.
pub fn exact_search<'a>(
    distance: Distance,
    query: &[f32],
    candidates: impl Iterator<Item = (u64, &'a [f32])>,
    k: usize,
) -> Vec<(u64, f32)> {
    if k == 0 {
        return Vec::new();
    }
    let mut top = TopK::new(k);
    for (key, v) in candidates {
        top.push(Scored(distance.score(query, v), key));
    }
    top.into_sorted().into_iter().map(|s| (s.1, s.0)).collect()
}

#[derive(PartialEq, Clone, Copy)]
struct Scored(f32, u64);

impl Eq for Scored {}

impl PartialOrd for Scored {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Scored {
    /// Higher score is greater; on equal scores the smaller key is greater (ranks first).
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0).then(other.1.cmp(&self.1))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Seeded unit vectors (the graph tests share them).
    pub(crate) fn vectors(n: usize, dim: usize, seed: u64) -> Vec<Vec<f32>> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                let mut v: Vec<f32> = (0..dim)
                    .map(|_| {
                        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
                    })
                    .collect();
                Distance::Cosine.prepare(&mut v);
                v
            })
            .collect()
    }

    #[test]
    fn graph_search_agrees_with_exact_search() {
        for distance in [Distance::Cosine, Distance::Dot, Distance::L2] {
            let data = vectors(2000, 16, 1);
            let index = DenseIndex::new(HnswParams::default(), Quantization::None, distance, 16, data.len());
            let items: Vec<(&[f32], u64)> = data.iter().enumerate().map(|(i, v)| (v.as_slice(), i as u64)).collect();
            index.insert(&items);
            assert_eq!(index.len(), 2000);
            let queries = vectors(50, 16, 2);
            let mut hits = 0;
            for q in &queries {
                let exact =
                    exact_search(distance, q, data.iter().enumerate().map(|(i, v)| (i as u64, v.as_slice())), 10);
                let approx = index.search(q, 10, 100, &|_| true);
                assert_eq!(approx.len(), 10);
                // Scores from the graph are the exact scores of the points it found.
                for (key, score) in &approx {
                    let want = distance.score(q, &data[*key as usize]);
                    assert!((score - want).abs() < 1e-4, "{distance:?}: {score} vs {want}");
                }
                hits += approx.iter().filter(|a| exact.iter().any(|e| e.0 == a.0)).count();
            }
            let recall = hits as f64 / 500.0;
            assert!(recall > 0.95, "{distance:?} recall {recall}");
        }
    }

    #[test]
    fn filtered_search_only_returns_kept_points() {
        let data = vectors(500, 8, 3);
        let index = DenseIndex::new(HnswParams::default(), Quantization::None, Distance::Cosine, 8, 500);
        let items: Vec<(&[f32], u64)> = data.iter().enumerate().map(|(i, v)| (v.as_slice(), i as u64)).collect();
        index.insert(&items);
        let found = index.search(&data[0], 10, 200, &|id| id % 2 == 1);
        assert!(!found.is_empty());
        assert!(found.iter().all(|(k, _)| k % 2 == 1));
    }

    /// Searches run while rounds of deletes take points out of the graph and inserts reuse
    /// their slots: every hit's score is the exact score of the vector its key was written
    /// with (a search never reads a slot while it is rewritten), and at the end the graph
    /// holds no more slots than at the start plus what the last round had not freed.
    #[test]
    fn searches_stay_exact_while_deleted_points_are_freed_and_reused() {
        use std::sync::atomic::AtomicBool;
        let dim = 24;
        let all = vectors(9000, dim, 31);
        let index = DenseIndex::new(
            HnswParams { m: 8, ef_construction: 64, ef: 64 },
            Quantization::None,
            Distance::Cosine,
            dim,
            3000,
        );
        let items: Vec<(&[f32], u64)> = all[..3000].iter().enumerate().map(|(i, v)| (v.as_slice(), i as u64)).collect();
        let mut points: std::collections::HashMap<u64, u32> = (0..3000u64).zip(index.insert(&items)).collect();
        let slots = index.len();
        let stop = AtomicBool::new(false);
        let queries = vectors(64, dim, 32);
        std::thread::scope(|s| {
            for t in 0..2 {
                let (index, all, stop, queries) = (&index, &all, &stop, &queries);
                s.spawn(move || {
                    let mut searched = 0;
                    while !stop.load(Ordering::Relaxed) || searched < 100 {
                        let q = &queries[(searched + t) % queries.len()];
                        for (key, score) in index.search(q, 10, 64, &|_| true) {
                            let want = Distance::Cosine.score(q, &all[key as usize]);
                            assert!((score - want).abs() < 1e-4, "key {key}: {score} vs {want}");
                        }
                        searched += 1;
                    }
                });
            }
            // Six rounds, each deleting 500 of the oldest live keys and writing 1000 new ones.
            let mut next = 3000usize;
            for round in 0..6 {
                let mut live: Vec<u64> = points.keys().copied().collect();
                live.sort_unstable();
                let dead: Vec<u32> = live[..500].iter().map(|k| points.remove(k).unwrap()).collect();
                let done = index.consolidate(&dead);
                assert_eq!(done.freed, 500, "round {round}");
                let items: Vec<(&[f32], u64)> =
                    all[next..next + 500].iter().enumerate().map(|(i, v)| (v.as_slice(), (next + i) as u64)).collect();
                for ((_, key), id) in items.iter().zip(index.insert(&items)) {
                    points.insert(*key, id);
                }
                next += 500;
            }
            stop.store(true, Ordering::Relaxed);
        });
        assert_eq!(index.len(), slots, "every insert reused a freed slot");
        assert_eq!(index.points(), 3000);
        // The live points are those searched for: recall against exact search over them.
        let mut hits = 0;
        for q in &queries {
            let exact = exact_search(Distance::Cosine, q, points.keys().map(|&k| (k, all[k as usize].as_slice())), 10);
            let found = index.search(q, 10, 100, &|_| true);
            assert!(found.iter().all(|(k, _)| points.contains_key(k)), "a deleted key came back");
            hits += found.iter().filter(|f| exact.iter().any(|e| e.0 == f.0)).count();
        }
        let recall = hits as f64 / (10 * queries.len()) as f64;
        assert!(recall >= 0.95, "recall@10 after six rounds of deletes and reuse: {recall}");
    }

    /// A save's cut holds frees and slot reuse back until it is dropped: the save writes
    /// the cut's slots as they stand beside a table taken at the cut.
    #[test]
    fn a_save_in_progress_holds_frees_and_reuse_back() {
        let data = vectors(600, 8, 41);
        let index = DenseIndex::new(HnswParams::default(), Quantization::None, Distance::Cosine, 8, 600);
        let items: Vec<(&[f32], u64)> = data[..500].iter().enumerate().map(|(i, v)| (v.as_slice(), i as u64)).collect();
        let ids = index.insert(&items);
        let cut = index.cut();
        std::thread::scope(|s| {
            let consolidating = s.spawn(|| index.consolidate(&ids[..100]));
            std::thread::sleep(std::time::Duration::from_millis(300));
            assert!(!consolidating.is_finished(), "slots freed while a save's cut was alive");
            assert_eq!(index.read().free_len(), 0);
            drop(cut);
            assert_eq!(consolidating.join().unwrap().freed, 100);
        });
        // Free slots are reused, except while a cut is alive.
        let cut = index.cut();
        let fresh = index.insert(&[(data[500].as_slice(), 500)]);
        assert_eq!(fresh, vec![500], "a fresh slot while the cut lives");
        drop(cut);
        let reused = index.insert(&[(data[501].as_slice(), 501)]);
        assert!(ids[..100].contains(&reused[0]), "a freed slot once it is gone");
    }

    #[test]
    fn exact_search_orders_by_score_then_key() {
        let q = [1.0f32, 0.0];
        let vs = [[1.0f32, 0.0], [0.0, 1.0], [1.0, 0.0], [0.5, 0.5]];
        let got = exact_search(Distance::Dot, &q, vs.iter().enumerate().map(|(i, v)| (i as u64, v.as_slice())), 3);
        assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), vec![0, 2, 3]);
    }
}

//! The dense half: an hnsw_rs graph over chunk vectors, plus exact search for filtered
//! queries the graph cannot serve well.
//!
//! hnsw_rs wants a non-negative distance that grows as points get further apart. Cosine
//! vectors are normalized when stored, and scored by their dot product; the graph uses
//! `1 - dot`. Dot-product collections use `softplus(-dot)`, which is positive and falls as
//! the dot product rises (so the graph ranks by dot product). L2 uses the squared distance.
//! Reported scores are always "higher is better": cosine similarity, dot product, or the
//! negated Euclidean distance.

use hnsw_rs::anndists::dist::distances::Distance as GraphDistance;
use hnsw_rs::hnsw::Hnsw;
use ragway_engine::kernels::dot;
use serde::{Deserialize, Serialize};

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

    fn graph_distance(self, a: &[f32], b: &[f32]) -> f32 {
        match self {
            Distance::Cosine => (1.0 - dot(a, b)).max(0.0),
            Distance::Dot => softplus(-dot(a, b)),
            Distance::L2 => squared_l2(a, b),
        }
    }

    fn score_from_graph(self, d: f32) -> f32 {
        match self {
            Distance::Cosine => 1.0 - d,
            // Inverse of softplus(-x): x = -ln(e^d - 1).
            Distance::Dot => -(d.exp_m1()).ln(),
            Distance::L2 => -d.sqrt(),
        }
    }
}

fn softplus(x: f32) -> f32 {
    if x > 0.0 {
        x + (-x).exp().ln_1p()
    } else {
        x.exp().ln_1p()
    }
}

fn squared_l2(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            let d = x[i] - y[i];
            acc[i] += d * d;
        }
    }
    acc.iter().sum::<f32>() + ra.iter().zip(rb).map(|(x, y)| (x - y) * (x - y)).sum::<f32>()
}

#[derive(Debug, Clone, Copy)]
pub struct GraphDist(pub Distance);

impl GraphDistance<f32> for GraphDist {
    fn eval(&self, a: &[f32], b: &[f32]) -> f32 {
        self.0.graph_distance(a, b)
    }
}

/// HNSW parameters of a collection.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HnswParams {
    /// Links per node (hnsw_rs `max_nb_connection`).
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

/// One hnsw_rs graph. Ids are chunk keys; points are never removed (deleted chunks are
/// filtered at search and dropped by the next rebuild).
pub struct DenseIndex {
    graph: Hnsw<'static, f32, GraphDist>,
    distance: Distance,
}

impl DenseIndex {
    pub fn new(params: HnswParams, distance: Distance, capacity: usize) -> Self {
        let graph = Hnsw::new(params.m, capacity.max(1024), 16, params.ef_construction, GraphDist(distance));
        Self { graph, distance }
    }

    /// Inserts prepared vectors; large batches are inserted in parallel.
    pub fn insert(&self, items: &[(&[f32], usize)]) {
        if items.len() >= 256 {
            self.graph.parallel_insert_slice(&items.to_vec());
        } else {
            for &(v, id) in items {
                self.graph.insert_slice((v, id));
            }
        }
    }

    /// Points in the graph (deleted ones included until a rebuild).
    pub fn len(&self) -> usize {
        self.graph.get_nb_point()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `k` best points that pass `keep`, best first, as (key, score).
    ///
    /// The graph is walked unfiltered and the results filtered afterwards, widening the walk
    /// (4x each time) while too few pass. hnsw_rs's own filtered walk never stops early and
    /// visits most of the graph on every query (measured: 20x slower than hnswlib at the same
    /// recall); callers fall back to an exact scan when even the widest walk comes up short.
    pub fn search(&self, query: &[f32], k: usize, ef: usize, keep: &dyn Fn(usize) -> bool) -> Vec<(u64, f32)> {
        let n = self.len();
        if k == 0 || n == 0 {
            return Vec::new();
        }
        let mut want = k;
        loop {
            let hits = self.graph.search(query, want, ef.max(want));
            let walked_all = want >= n;
            let found = hits.len();
            let kept: Vec<(u64, f32)> = hits
                .into_iter()
                .filter(|h| keep(h.d_id))
                .take(k)
                .map(|h| (h.d_id as u64, self.distance.score_from_graph(h.distance)))
                .collect();
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
    // A bounded min-heap keyed on score.
    let mut heap: std::collections::BinaryHeap<std::cmp::Reverse<Scored>> = std::collections::BinaryHeap::new();
    for (key, v) in candidates {
        let s = Scored(distance.score(query, v), key);
        if heap.len() < k {
            heap.push(std::cmp::Reverse(s));
        } else if s > heap.peek().expect("non-empty").0 {
            heap.pop();
            heap.push(std::cmp::Reverse(s));
        }
    }
    let mut out: Vec<(u64, f32)> = heap.into_iter().map(|r| (r.0 .1, r.0 .0)).collect();
    out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    out
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
mod tests {
    use super::*;

    fn vectors(n: usize, dim: usize, seed: u64) -> Vec<Vec<f32>> {
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
            let index = DenseIndex::new(HnswParams::default(), distance, data.len());
            let items: Vec<(&[f32], usize)> = data.iter().enumerate().map(|(i, v)| (v.as_slice(), i)).collect();
            index.insert(&items);
            assert_eq!(index.len(), 2000);
            let queries = vectors(50, 16, 2);
            let mut hits = 0;
            for q in &queries {
                let exact = exact_search(distance, q, data.iter().enumerate().map(|(i, v)| (i as u64, v.as_slice())), 10);
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
        let index = DenseIndex::new(HnswParams::default(), Distance::Cosine, 500);
        let items: Vec<(&[f32], usize)> = data.iter().enumerate().map(|(i, v)| (v.as_slice(), i)).collect();
        index.insert(&items);
        let found = index.search(&data[0], 10, 200, &|id| id % 2 == 1);
        assert!(!found.is_empty());
        assert!(found.iter().all(|(k, _)| k % 2 == 1));
    }

    #[test]
    fn exact_search_orders_by_score_then_key() {
        let q = [1.0f32, 0.0];
        let vs = [[1.0f32, 0.0], [0.0, 1.0], [1.0, 0.0], [0.5, 0.5]];
        let got = exact_search(Distance::Dot, &q, vs.iter().enumerate().map(|(i, v)| (i as u64, v.as_slice())), 3);
        assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), vec![0, 2, 3]);
    }
}

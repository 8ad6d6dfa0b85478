//! ragway's own HNSW graph (Malkov & Yashunin, 2016): the dense half's index.
//!
//! One copy of each vector: the graph owns the stored (prepared) vectors, and the rest of
//! the collection reads them from here by point id. Points are numbered densely from 0 in
//! insertion order; each carries the caller's 64-bit key.
//!
//! ## Concurrency
//! Inserts run in parallel with each other and with searches, as in hnswlib:
//! - a point's vector, key and level are written by its inserter before the point is
//!   *published*, i.e. before its id is stored into any neighbor list or the entry point;
//! - neighbor lists are arrays of atomics: slot 0 holds the count, slots 1.. the ids. A
//!   list is only modified under its node's lock; ids are stored with `Release` and read
//!   with `Acquire`, so a reader that finds an id also sees the vector written before it
//!   was published. A reader may see a list mid-rewrite (a mix of old and new ids): every
//!   id in it is a published point, which is all a search needs.
//! - the capacity is fixed per [`Graph`]; [`Graph::grown`] copies into a larger one while
//!   the caller holds it exclusively.
//!
//! ## Deletes without a rebuild
//! A point whose chunk is gone is taken out of the graph in three steps, none of which
//! rebuilds it (as FreshDiskANN consolidates deletes, and hnswlib reuses deleted slots):
//! 1. [`Graph::mark_deleted`] marks it: from then on no insert links to it, and searches
//!    still walk through it but never return it. The caller waits for inserts already
//!    running (they may have chosen it before the mark) before step 2.
//! 2. [`Graph::repair`] rewrites every list that holds a marked point: its place goes to
//!    the best of the list's other points and the marked point's own neighbors, chosen by
//!    the same heuristic as an insert's. Inserts and searches go on meanwhile.
//! 3. [`Graph::free_deleted`], with the graph held exclusively (so no search still holds
//!    a marked id), clears the marked points' lists, gives them [`FREE_KEY`] and puts their
//!    slots on the free list; the entry point moves to a live point when it was marked.
//!    Before that, [`Graph::reconnect_unreachable`] links back any live point that a walk
//!    from the entry point can no longer reach (a re-selection may prune a point out of
//!    every list that named it).
//!
//! An insert may then reuse a free slot: it writes the slot's vector, code and key before
//! publishing it, like a fresh point's, and keeps the slot's level (drawn from the same
//! distribution), so its upper lists are already there. No list names a free slot, so
//! nothing reads it while it is rewritten.
//!
//! ## Distances
//! Internally "smaller is closer": cosine and dot products use `-dot` (vectors of cosine
//! collections are unit length), L2 the squared distance. Scores reported outward are
//! "higher is better" (see [`Distance::score`]).
//!
//! ## Quantization
//! With [`Quantization::F16`] or [`Quantization::Int8`] the graph also keeps a code of each
//! vector ([`crate::quant`]): searches walk the graph on the codes and rescore the best of
//! the `ef` candidates they end with — [`rescore_depth`]: four per result asked, at least
//! 40 — exactly from the f32 vectors. Codes this close rank the true neighbors among the
//! first few candidates, so the rest are not worth their reads: a vector rescored is 1.5 KB
//! at 384 dimensions that a collection larger than memory reads from disk (the vectors'
//! pages are mapped with `MADV_RANDOM`: a rescoring fault reads its page, not the kernel's
//! read-ahead window around it). With int8 codes an insert's walk
//! (most of a build's distances, and its cache misses: a code is a quarter of a vector)
//! runs on the codes too, and the `ef_construction` candidates it ends with are rescored
//! from the f32 vectors before the neighbor heuristic, which always measures f32
//! distances. F16 graphs build on the f32 vectors (an f16 distance costs what an f32 one
//! does).
//!
//! ## File format (little-endian)
//! `RGWHNSW1`, then a header of u64s (version, dim, m, m0, ef_construction, distance,
//! points, entry point + 1 (0: none), max level, covered log sequence number, and from
//! version 3 the quantization), then the
//! keys (u64 × n), levels (u8 × n, padded to 8), layer-0 lists (u32 × n × (m0 + 1)), the
//! upper lists' offsets (u64 × (n + 1)) and their lists (u32), and a CRC-32 of everything
//! before it. Then zeros up to a multiple of 64 bytes, the vectors (f32 × n × dim) and a
//! CRC-32 of that padding and the vectors. With quantization, then zeros up to a multiple
//! of 64 bytes, the codes (u32 × n × words) and a CRC-32 of that padding and the codes.
//! Version 2 files (no quantization field, no codes) are read as unquantized graphs.
//! A free slot is saved with the key [`FREE_KEY`] and empty lists.
//!
//! ## Opening by memory-mapping
//! [`Graph::load`] maps the file: the structure (keys, levels, lists) is checked and copied
//! into the graph's growable arrays, the vectors stay in the mapping and are read from the
//! page cache where the search touches them. An open therefore costs the structure (about
//! 150 bytes per point), not the vectors (`4 × dim` bytes per point), and the vectors are
//! never held twice. Codes are mapped the same way. Points inserted after the open live in
//! memory. The file is only ever replaced by a rename, so a mapping stays valid after a
//! later save. The mapping is private and copy-on-write: an insert that reuses a free
//! mapped slot writes its vector there, into memory of the process's own, never into the
//! file. The vectors' checksum is not read on open (it would read every vector);
//! [`Graph::verify_vectors`] checks it, reading the file.
//!
//! After a restart with a cold page cache, each mapped code or vector a search touches
//! first is a disk read, and a walk that faults them in one at a time waits on each in
//! turn. So while a kind of page may be cold (see [`crate::cold`]) — the codes (or vectors)
//! the walk reads, the vectors it rescores — a search first asks the kernel for all the
//! pages of a step (a node's unvisited neighbors, the candidates to rescore) and the reads
//! overlap ([`Graph::read_ahead`]).

use crate::cold::{major_faults, ColdSpell};
use crate::dense::Distance;
use crate::error::{IndexError, Result};
use crate::filefmt::{Cursor, SumWriter};
use crate::quant::{f16_parts, int8_parts, Quantization};
use crate::region::Region;
use crate::simd::{dot, dot_f16, dot_i8, dot_i8_i8, squared_l2, squared_l2_f16, squared_l2_i8, QueryI8};
use std::cell::UnsafeCell;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, RwLock};

const MAGIC: &[u8; 8] = b"RGWHNSW1";
/// How much of a neighbor's vector the walk prefetches.
const PREFETCH_BYTES: usize = 256;
const FORMAT_VERSION: u64 = 3;
/// Alignment of the vectors in the file (a cache line).
const VECTORS_ALIGN: u64 = 64;
/// Highest layer a point may get (the level draw is capped here).
const MAX_LEVEL: usize = 16;
/// Smallest and largest `m` (links per point and layer; twice as many on layer 0).
pub const M_RANGE: std::ops::RangeInclusive<usize> = 2..=128;
/// Largest `ef` (a search's breadth) and `ef_construction` (an insert's): the candidate
/// heaps are sized by them.
pub const MAX_EF: usize = 10_000;
/// A full neighbor list re-selected by a back-link keeps `1 / LINK_SLACK` of its slots free
/// (see [`Graph::link_back`]).
const LINK_SLACK: usize = 4;
/// Candidates rescored from the f32 vectors per result a quantized search asks for, and
/// at least this many in all ([`rescore_depth`]).
const RESCORE_PER_RESULT: usize = 4;
const MIN_RESCORE: usize = 40;

/// How many of a quantized walk's candidates, best first by their codes, are rescored
/// exactly for a search of `k` results.
pub fn rescore_depth(k: usize) -> usize {
    k.saturating_mul(RESCORE_PER_RESULT).max(MIN_RESCORE)
}
/// The key of a free slot (no chunk key is this large: keys count up from 0).
pub const FREE_KEY: u64 = u64::MAX;
/// A point's state: in the graph ...
const LIVE: u8 = 0;
/// ... marked deleted: walked through, never returned or linked to ([`Graph::mark_deleted`]) ...
const DELETED: u8 = 1;
/// ... or a free slot that no list names ([`Graph::free_deleted`]).
const FREE: u8 = 2;

/// A distance in the graph: smaller is closer.
#[derive(Debug, Clone, Copy)]
struct Dist(f32);

impl PartialEq for Dist {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for Dist {}

impl PartialOrd for Dist {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Dist {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// The graph's view of a [`Distance`].
#[derive(Debug, Clone, Copy)]
struct Metric(Distance);

impl Metric {
    #[inline]
    fn eval(self, a: &[f32], b: &[f32]) -> f32 {
        match self.0 {
            Distance::Cosine | Distance::Dot => -dot(a, b),
            Distance::L2 => squared_l2(a, b),
        }
    }

    /// The internal distance from `q` to a code of `quant` (not `None`).
    #[inline]
    fn eval_code(self, quant: Quantization, q: &[f32], code: &[u32]) -> f32 {
        let l2 = matches!(self.0, Distance::L2);
        match quant {
            Quantization::Int8 => {
                let (scale, c) = int8_parts(code, q.len());
                if l2 {
                    squared_l2_i8(q, c, scale)
                } else {
                    -dot_i8(q, c, scale)
                }
            }
            Quantization::F16 => {
                let c = f16_parts(code, q.len());
                if l2 {
                    squared_l2_f16(q, c)
                } else {
                    -dot_f16(q, c)
                }
            }
            Quantization::None => unreachable!("codes exist only with quantization"),
        }
    }

    /// The outward score of an internal distance.
    #[inline]
    fn score(self, d: f32) -> f32 {
        match self.0 {
            Distance::Cosine | Distance::Dot => -d,
            Distance::L2 => -d.max(0.0).sqrt(),
        }
    }
}

/// What a walk measures distances from: the query, and for a walk on int8 codes of a
/// cosine or dot-product graph where the CPU has integer dot products, the query quantized
/// too ([`QueryI8`]: the walk's distances become integer dot products; the candidates it
/// ends with are rescored exactly from the f32 vectors as always).
struct Probe<'a> {
    q: &'a [f32],
    i8: Option<QueryI8>,
}

/// Build parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Params {
    /// Links per node above layer 0 (layer 0 keeps twice as many).
    pub m: usize,
    pub ef_construction: usize,
    /// Codes the search walks on (the build always uses the f32 vectors).
    pub quantization: Quantization,
}

/// A visited set over every id the graph can hold, cleared in O(1) by bumping a generation
/// (and in O(n) once every 65,535 uses).
struct Visited {
    marks: Vec<u16>,
    generation: u16,
}

impl Visited {
    fn new(n: usize) -> Self {
        Self { marks: vec![0; n], generation: 0 }
    }

    fn reset(&mut self, n: usize) {
        if self.marks.len() < n {
            self.marks.resize(n, 0);
        }
        self.generation = self.generation.wrapping_add(1);
        if self.generation == 0 {
            self.marks.iter_mut().for_each(|m| *m = 0);
            self.generation = 1;
        }
    }

    /// Marks `id`; true when it was not marked yet.
    #[inline]
    fn insert(&mut self, id: u32) -> bool {
        let m = &mut self.marks[id as usize];
        if *m == self.generation {
            false
        } else {
            *m = self.generation;
            true
        }
    }
}

/// What [`Graph::save_cut`] writes: the first `points` points and the entry point they had.
#[derive(Debug, Clone, Copy)]
pub struct Cut {
    points: usize,
    entry: Option<(u32, usize)>,
}

impl Cut {
    /// Points the cut holds.
    pub fn points(&self) -> usize {
        self.points
    }
}

/// An HNSW graph over up to `capacity` points.
pub struct Graph {
    dim: usize,
    m: usize,
    m0: usize,
    ef_construction: usize,
    metric: Metric,
    level_mult: f64,
    capacity: usize,
    /// Ids handed out (points being inserted included).
    allocated: AtomicUsize,
    /// Points whose insertion finished.
    inserted: AtomicUsize,
    /// Vectors of points `0..mapped_points`, read from the saved file.
    mapped: Option<Mapped>,
    /// `mapped`'s first vector (null without one), read without unwrapping on the hot path.
    mapped_ptr: *mut f32,
    mapped_points: usize,
    /// Vectors of points `mapped_points..capacity`.
    vectors: Region<UnsafeCell<f32>>,
    quant: Quantization,
    /// `u32` words of one point's code (0 without quantization).
    code_words: usize,
    /// The mapped codes of points `0..mapped_points` (null without).
    mapped_codes: *mut u32,
    /// Codes of points `mapped_points..capacity`.
    codes: Region<UnsafeCell<u32>>,
    // The per-point arrays that are plain numbers live in `Region`s: growing the graph
    // extends them in place (no copy under the write lock).
    keys: Region<AtomicU64>,
    levels: Region<AtomicU8>,
    links0: Region<AtomicU32>,
    /// [`LIVE`], [`DELETED`] or [`FREE`], per point.
    states: Region<AtomicU8>,
    /// Free slots, for inserts to reuse ([`Graph::free_deleted`]).
    free: Mutex<Vec<u32>>,
    /// Points marked deleted and not freed yet: while 0, inserts skip the checks.
    marked: AtomicUsize,
    upper: Box<[OnceLock<Box<[AtomicU32]>>]>,
    locks: Box<[Mutex<()>]>,
    /// `(entry point, its level)`; `None` while empty.
    entry: RwLock<Option<(u32, usize)>>,
    visited: Mutex<Vec<Visited>>,
    /// Whether searches read ahead ([`Graph::read_ahead`]) what their walk reads (the codes,
    /// or the vectors without codes) ...
    cold_walk: ColdSpell,
    /// ... and the vectors they rescore (with codes).
    cold_rescore: ColdSpell,
}

/// The vectors of a saved graph, in its memory-mapped file.
struct Mapped {
    /// Private and copy-on-write: reused slots are written here, never to the file.
    map: memmap2::MmapMut,
    /// The file mapped, for [`Graph::verify_vectors`] (the mapping may hold reused slots).
    file: std::fs::File,
    /// Where the vectors' checksummed section (padding, then vectors) starts.
    section: usize,
    /// Where the codes' section starts (0: none).
    codes_section: usize,
}

// SAFETY: the non-`Sync` fields are `vectors` (`UnsafeCell<f32>`), `codes`
// (`UnsafeCell<u32>`) and the mapped vectors' and codes' pointers. A vector or code slot is
// written by the thread that allocated its id (or took it from the free list) before the
// id is published with a `Release` store; every read of a slot happens after an `Acquire`
// load that observed the id (see the module documentation), or with exclusive access
// (`&mut self`). A slot is rewritten only after [`Graph::free_deleted`] freed it: with the
// graph held exclusively, once no list names it, so no reader holds its id. The mapping
// is private (copy-on-write) and lives as long as the graph.
unsafe impl Sync for Graph {}
// SAFETY: the pointers refer into the mapping the graph owns, which moves with it.
unsafe impl Send for Graph {}

impl Graph {
    pub fn new(dim: usize, distance: Distance, params: Params, capacity: usize) -> Self {
        Self::with_mapped(dim, distance, params, capacity, None, 0)
    }

    /// A graph whose first `mapped_points` vectors are in `mapped`.
    fn with_mapped(
        dim: usize,
        distance: Distance,
        params: Params,
        capacity: usize,
        mapped: Option<Mapped>,
        mapped_points: usize,
    ) -> Self {
        let m = params.m.clamp(2, 128);
        let m0 = 2 * m;
        let capacity = capacity.max(16).max(mapped_points);
        // Regions are backed lazily, with huge pages where they are large (`Region`).
        let vectors = Region::zeroed((capacity - mapped_points) * dim);
        let code_words = params.quantization.words(dim);
        let codes = Region::zeroed((capacity - mapped_points) * code_words);
        let links0 = Region::zeroed(capacity * (m0 + 1));
        Self {
            dim,
            m,
            m0,
            // Collections created before the API bounded it may carry a larger one.
            ef_construction: params.ef_construction.clamp(m, MAX_EF),
            metric: Metric(distance),
            level_mult: 1.0 / (m as f64).ln(),
            capacity,
            allocated: AtomicUsize::new(0),
            inserted: AtomicUsize::new(0),
            // Set by whoever hands over the mapping ([`Graph::load`], [`Graph::grown`]).
            mapped_ptr: std::ptr::null_mut(),
            mapped,
            mapped_points,
            vectors,
            quant: params.quantization,
            code_words,
            mapped_codes: std::ptr::null_mut(),
            codes,
            keys: Region::zeroed(capacity),
            levels: Region::zeroed(capacity),
            links0,
            states: Region::zeroed(capacity),
            free: Mutex::new(Vec::new()),
            marked: AtomicUsize::new(0),
            upper: (0..capacity).map(|_| OnceLock::new()).collect(),
            locks: (0..capacity).map(|_| Mutex::new(())).collect(),
            entry: RwLock::new(None),
            visited: Mutex::new(Vec::new()),
            cold_walk: ColdSpell::new(mapped_points > 0),
            cold_rescore: ColdSpell::new(mapped_points > 0),
        }
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn distance(&self) -> Distance {
        self.metric.0
    }

    pub fn params(&self) -> Params {
        Params { m: self.m, ef_construction: self.ef_construction, quantization: self.quant }
    }

    pub fn quantization(&self) -> Quantization {
        self.quant
    }

    /// Slots whose first insert finished: points, deleted points and free slots.
    pub fn len(&self) -> usize {
        self.inserted.load(Ordering::Acquire)
    }

    /// Free slots an insert may reuse.
    pub fn free_len(&self) -> usize {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// True when slot `id` is free (no point is there).
    pub fn is_free(&self, id: u32) -> bool {
        self.states[id as usize].load(Ordering::Acquire) == FREE
    }

    /// True when `id` is marked deleted or free: no insert links to it, no search returns it.
    #[inline]
    fn is_gone(&self, id: u32) -> bool {
        self.states[id as usize].load(Ordering::Acquire) != LIVE
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Room for `more` points beyond those allocated.
    pub fn has_room(&self, more: usize) -> bool {
        self.allocated.load(Ordering::Acquire).saturating_add(more) <= self.capacity
    }

    /// The stored vector of point `id` (a published point).
    #[inline]
    pub fn vector(&self, id: u32) -> &[f32] {
        let i = id as usize;
        if i < self.mapped_points {
            // SAFETY: the mapping holds `mapped_points × dim` f32s from `mapped_ptr` (checked
            // when loaded), is read-only and lives as long as `self`.
            return unsafe { std::slice::from_raw_parts(self.mapped_ptr.add(i * self.dim), self.dim) };
        }
        let start = (i - self.mapped_points) * self.dim;
        let cells = &self.vectors[start..start + self.dim];
        // SAFETY: `UnsafeCell<f32>` has the layout of `f32`; the slot was fully written
        // before `id` was published (module documentation), and is never written again.
        unsafe { std::slice::from_raw_parts(cells.as_ptr() as *const f32, self.dim) }
    }

    /// The code of point `id` (a published point; empty without quantization).
    #[inline]
    fn code(&self, id: u32) -> &[u32] {
        let i = id as usize;
        let w = self.code_words;
        if i < self.mapped_points {
            // SAFETY: as for `vector`: the mapping holds `mapped_points × code_words` u32s
            // from `mapped_codes` (checked when loaded).
            return unsafe { std::slice::from_raw_parts(self.mapped_codes.add(i * w), w) };
        }
        let start = (i - self.mapped_points) * w;
        let cells = &self.codes[start..start + w];
        // SAFETY: as for `vector`: written before `id` was published, never again.
        unsafe { std::slice::from_raw_parts(cells.as_ptr() as *const u32, w) }
    }

    /// Recomputes the codes of every point for `quant` (benchmarks compare quantizations on
    /// one build; a collection's quantization is fixed when it is created). The caller holds
    /// the graph exclusively; the graph must have no mapped points.
    pub fn set_quantization(&mut self, quant: Quantization) {
        assert_eq!(self.mapped_points, 0, "set_quantization on a mapped graph");
        let n = *self.allocated.get_mut();
        let w = quant.words(self.dim);
        let mut codes: Region<UnsafeCell<u32>> = Region::zeroed(self.capacity * w);
        for i in 0..n {
            let slot = &mut codes[i * w..(i + 1) * w];
            // SAFETY: `UnsafeCell<u32>` is `repr(transparent)` over `u32`; `slot` is exclusive.
            let slot = unsafe { std::slice::from_raw_parts_mut(UnsafeCell::raw_get(slot.as_ptr()), w) };
            quant.encode(self.vector(i as u32), slot);
        }
        self.codes = codes;
        self.quant = quant;
        self.code_words = w;
    }

    pub fn key(&self, id: u32) -> u64 {
        self.keys[id as usize].load(Ordering::Acquire)
    }

    fn level(&self, id: u32) -> usize {
        self.levels[id as usize].load(Ordering::Acquire) as usize
    }

    /// The list of `id` at `level`: slot 0 is the count.
    #[inline]
    fn list(&self, id: u32, level: usize) -> &[AtomicU32] {
        if level == 0 {
            let start = id as usize * (self.m0 + 1);
            &self.links0[start..start + self.m0 + 1]
        } else {
            let upper = self.upper[id as usize].get().expect("points above layer 0 have upper lists");
            let start = (level - 1) * (self.m + 1);
            &upper[start..start + self.m + 1]
        }
    }

    #[inline]
    fn neighbors(&self, id: u32, level: usize, out: &mut Vec<u32>) {
        let list = self.list(id, level);
        let n = (list[0].load(Ordering::Acquire) as usize).min(list.len() - 1);
        out.clear();
        out.extend(list[1..=n].iter().map(|s| s.load(Ordering::Acquire)));
    }

    fn set_neighbors(&self, id: u32, level: usize, ids: &[u32]) {
        let list = self.list(id, level);
        let n = ids.len().min(list.len() - 1);
        for (slot, &x) in list[1..=n].iter().zip(ids) {
            slot.store(x, Ordering::Release);
        }
        list[0].store(n as u32, Ordering::Release);
    }

    fn visited(&self) -> Visited {
        let mut v = self.visited.lock().unwrap_or_else(|e| e.into_inner()).pop().unwrap_or_else(|| Visited::new(0));
        // Sized to the capacity: concurrent inserts may publish ids beyond today's count.
        v.reset(self.capacity);
        v
    }

    fn give_back(&self, v: Visited) {
        let mut pool = self.visited.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < 16 {
            pool.push(v);
        }
    }

    /// Asks the CPU to start loading the vector of `id`, or its code when the walk reads
    /// codes (a hint; no effect elsewhere).
    #[inline]
    fn prefetch<const CODES: bool>(&self, id: u32) {
        #[cfg(target_arch = "x86_64")]
        {
            let (ptr, bytes) = if CODES {
                (self.code(id).as_ptr() as *const i8, self.code_words * 4)
            } else {
                (self.vector(id).as_ptr() as *const i8, self.dim * 4)
            };
            // One hint per 64-byte line of the vector.
            for line in (0..bytes.min(PREFETCH_BYTES)).step_by(64) {
                // SAFETY: prefetching is a hint that never faults; the address is inside
                // the vector slice.
                unsafe { std::arch::x86_64::_mm_prefetch(ptr.add(line), std::arch::x86_64::_MM_HINT_T0) };
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = id;
    }

    /// Asks the kernel for the pages that hold the codes (`CODES`) or the vectors of those
    /// of `ids` that lie in the mapped file, all at once (`madvise(WILLNEED)`). After a cold
    /// start each such page would otherwise be a page fault of its own, the walk waiting
    /// on one disk read after another; asked for together, the reads overlap. Searches do
    /// this while that kind of page is cold (`cold_walk`, `cold_rescore`): a syscall per
    /// point costs more than a warm search's distance.
    fn read_ahead<const CODES: bool>(&self, ids: &[u32]) {
        #[cfg(unix)]
        if let Some(mapped) = &self.mapped {
            let base = mapped.map.as_ptr() as usize;
            for &id in ids {
                let i = id as usize;
                if i >= self.mapped_points {
                    continue;
                }
                let (at, bytes) = if CODES {
                    (self.mapped_codes.wrapping_add(i * self.code_words) as usize, self.code_words * 4)
                } else {
                    (self.mapped_ptr.wrapping_add(i * self.dim) as usize, self.dim * 4)
                };
                // A hint: a refusal only leaves the page to be faulted in.
                let _ = mapped.map.advise_range(memmap2::Advice::WillNeed, at - base, bytes);
            }
        }
        #[cfg(not(unix))]
        let _ = ids;
    }

    #[inline]
    fn dist_to(&self, q: &[f32], id: u32) -> Dist {
        Dist(self.metric.eval(q, self.vector(id)))
    }

    /// The distance the walk uses: to the code when `CODES`, else to the vector.
    #[inline]
    fn walk_dist<const CODES: bool>(&self, p: &Probe<'_>, id: u32) -> Dist {
        if CODES {
            match &p.i8 {
                Some(qi) => {
                    let (scale, c) = int8_parts(self.code(id), p.q.len());
                    Dist(-dot_i8_i8(qi, c, scale))
                }
                None => Dist(self.metric.eval_code(self.quant, p.q, self.code(id))),
            }
        } else {
            self.dist_to(p.q, id)
        }
    }

    /// Greedy descent on one upper layer: the closest point reachable from `start`.
    fn greedy<const CODES: bool>(
        &self,
        q: &Probe<'_>,
        mut cur: u32,
        mut cur_d: Dist,
        level: usize,
        buf: &mut Vec<u32>,
        ahead: bool,
    ) -> (u32, Dist) {
        loop {
            let mut changed = false;
            self.neighbors(cur, level, buf);
            if ahead {
                self.read_ahead::<CODES>(buf);
            }
            for &n in buf.iter() {
                let d = self.walk_dist::<CODES>(q, n);
                if d < cur_d {
                    cur_d = d;
                    cur = n;
                    changed = true;
                }
            }
            if !changed {
                return (cur, cur_d);
            }
        }
    }

    /// Beam search on one layer from `start`: up to `ef` closest points, as a max-heap on
    /// distance. `keep` filters what enters the results (every point still guides the walk).
    fn search_layer<const CODES: bool>(
        &self,
        q: &Probe<'_>,
        start: &[(u32, Dist)],
        ef: usize,
        level: usize,
        visited: &mut Visited,
        keep: &dyn Fn(u32) -> bool,
        ahead: bool,
    ) -> BinaryHeap<(Dist, u32)> {
        let mut candidates: BinaryHeap<Reverse<(Dist, u32)>> = BinaryHeap::with_capacity(ef * 2);
        let mut results: BinaryHeap<(Dist, u32)> = BinaryHeap::with_capacity(ef + 1);
        for &(id, d) in start {
            if visited.insert(id) {
                candidates.push(Reverse((d, id)));
                if keep(id) {
                    results.push((d, id));
                }
            }
        }
        while results.len() > ef {
            results.pop();
        }
        let mut buf = Vec::with_capacity(self.m0);
        while let Some(Reverse((d, id))) = candidates.pop() {
            if results.len() >= ef && d > results.peek().expect("non-empty").0 {
                break;
            }
            self.neighbors(id, level, &mut buf);
            // Unvisited neighbors first, their vectors fetched ahead of the distance loop
            // (the walk is bound by memory latency, not arithmetic).
            buf.retain(|&n| visited.insert(n));
            if ahead {
                self.read_ahead::<CODES>(&buf);
            }
            for &n in &buf {
                self.prefetch::<CODES>(n);
            }
            for &n in &buf {
                let nd = self.walk_dist::<CODES>(q, n);
                if results.len() < ef || nd < results.peek().expect("non-empty").0 {
                    candidates.push(Reverse((nd, n)));
                    if keep(n) {
                        results.push((nd, n));
                        if results.len() > ef {
                            results.pop();
                        }
                    }
                }
            }
        }
        results
    }

    /// The neighbor heuristic (the paper's, as hnswlib has it): from candidates sorted by
    /// distance to the new point, keep one only if it is closer to the new point than to
    /// every neighbor kept so far; then fill the free slots with the closest pruned ones
    /// (the paper's `keepPrunedConnections`) up to `fill_to` entries. Without the fill,
    /// clusters of near-duplicate vectors (templated texts, boilerplate chunks) leave points
    /// their neighbors no longer link to, which a search cannot reach even for its own vector.
    fn select(&self, sorted: &[(Dist, u32)], m: usize, fill_to: usize) -> Vec<u32> {
        if sorted.len() <= m {
            return sorted.iter().map(|c| c.1).collect();
        }
        let mut kept: Vec<(Dist, u32)> = Vec::with_capacity(m);
        let mut pruned: Vec<u32> = Vec::new();
        for &(d, id) in sorted {
            if kept.len() >= m {
                break;
            }
            let v = self.vector(id);
            if kept.iter().all(|&(_, k)| Dist(self.metric.eval(v, self.vector(k))) > d) {
                kept.push((d, id));
            } else {
                pruned.push(id);
            }
        }
        let mut out: Vec<u32> = kept.into_iter().map(|c| c.1).collect();
        let free = fill_to.min(m).saturating_sub(out.len());
        out.extend(pruned.into_iter().take(free));
        out
    }

    fn random_level(&self, seed: u64) -> usize {
        // splitmix64 of the point's id: reproducible for a given insertion order.
        let z = ragway_engine::rng::SplitMix64::new(seed).next_u64();
        let u = ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        ((-u.ln() * self.level_mult) as usize).min(MAX_LEVEL)
    }

    /// Writes the vector and code of slot `id`.
    ///
    /// # Safety
    /// The calling thread owns the slot: it allocated it, or took it from the free list,
    /// and has not published it, so nothing else reads or writes it.
    unsafe fn write_slot(&self, id: usize, vector: &[f32]) {
        let w = self.code_words;
        let (v, code): (&mut [f32], &mut [u32]) = if id < self.mapped_points {
            // SAFETY: the private mapping holds `mapped_points` vectors and codes from these
            // pointers (checked when loaded); the slot is the caller's (see above).
            unsafe {
                (
                    std::slice::from_raw_parts_mut(self.mapped_ptr.add(id * self.dim), self.dim),
                    if w > 0 { std::slice::from_raw_parts_mut(self.mapped_codes.add(id * w), w) } else { &mut [] },
                )
            }
        } else {
            let i = id - self.mapped_points;
            let cells = &self.vectors[i * self.dim..(i + 1) * self.dim];
            let codes = &self.codes[i * w..(i + 1) * w];
            // SAFETY: `UnsafeCell<T>` is `repr(transparent)` over `T`; the slot is the
            // caller's (see above).
            unsafe {
                (
                    std::slice::from_raw_parts_mut(UnsafeCell::raw_get(cells.as_ptr()), self.dim),
                    std::slice::from_raw_parts_mut(UnsafeCell::raw_get(codes.as_ptr()), w),
                )
            }
        };
        v.copy_from_slice(vector);
        if w > 0 {
            self.quant.encode(vector, code);
        }
    }

    /// Inserts one point in a fresh slot; returns its id. Panics when the graph is full
    /// (callers check [`Graph::has_room`] and grow first).
    pub fn insert(&self, vector: &[f32], key: u64) -> u32 {
        self.insert_reusing(vector, key, false)
    }

    /// Inserts one point, in a free slot when `reuse` and there is one (see the module
    /// documentation), else in a fresh one; returns its id.
    pub fn insert_reusing(&self, vector: &[f32], key: u64, reuse: bool) -> u32 {
        assert_eq!(vector.len(), self.dim, "vector dimension");
        let reused = if reuse { self.free.lock().unwrap_or_else(|e| e.into_inner()).pop() } else { None };
        let (id, level) = match reused {
            Some(id) => (id as usize, self.level(id)),
            None => {
                let id = self.allocated.fetch_add(1, Ordering::AcqRel);
                assert!(id < self.capacity, "HNSW graph is full ({} points)", self.capacity);
                (id, self.random_level(id as u64))
            }
        };
        let fresh = reused.is_none();
        let id32 = id as u32;
        // SAFETY: slot `id` was just allocated to this thread, or taken off the free list
        // (no list names it and no search holds it), and is not published yet.
        unsafe { self.write_slot(id, vector) };
        self.keys[id].store(key, Ordering::Release);
        if fresh {
            self.levels[id].store(level as u8, Ordering::Release);
            if level > 0 {
                let lists: Box<[AtomicU32]> = (0..level * (self.m + 1)).map(|_| AtomicU32::new(0)).collect();
                let _ = self.upper[id].set(lists);
            }
        } else {
            // A free slot keeps its level and its (emptied) upper lists.
            self.states[id].store(LIVE, Ordering::Release);
        }
        let finished = || {
            if fresh {
                self.inserted.fetch_add(1, Ordering::AcqRel);
            }
        };
        let entry = {
            let e = *self.entry.read().unwrap_or_else(|e| e.into_inner());
            match e {
                Some(e) => e,
                None => {
                    let mut w = self.entry.write().unwrap_or_else(|e| e.into_inner());
                    match *w {
                        Some(e) => e,
                        None => {
                            *w = Some((id32, level));
                            drop(w);
                            finished();
                            return id32;
                        }
                    }
                }
            }
        };
        let (ep, max_level) = entry;
        // An int8 graph's build walks on the codes too (see the module documentation).
        if self.quant == Quantization::Int8 {
            self.connect::<true>(vector, id32, level, ep, max_level);
        } else {
            self.connect::<false>(vector, id32, level, ep, max_level);
        }
        if level > max_level {
            let mut w = self.entry.write().unwrap_or_else(|e| e.into_inner());
            if w.is_none_or(|(_, l)| level > l) {
                *w = Some((id32, level));
            }
        }
        finished();
        id32
    }

    /// Links the new point `id` (level `level`) into the graph whose entry point is `ep` at
    /// `max_level`: on each of its layers, the `ef_construction` closest points a walk finds,
    /// the neighbor heuristic's choice among them, and the back-links. With `CODES` the walk
    /// measures distances on the codes and its candidates are rescored exactly from the f32
    /// vectors before the heuristic, which always uses f32 distances.
    fn connect<const CODES: bool>(&self, vector: &[f32], id32: u32, level: usize, ep: u32, max_level: usize) {
        let mut buf = Vec::with_capacity(self.m0);
        let p = self.probe::<CODES>(vector);
        let mut cur = ep;
        let mut cur_d = self.walk_dist::<CODES>(&p, ep);
        for l in (level + 1..=max_level).rev() {
            (cur, cur_d) = self.greedy::<CODES>(&p, cur, cur_d, l, &mut buf, false);
        }
        let mut visited = self.visited();
        let mut start = vec![(cur, cur_d)];
        for l in (0..=level.min(max_level)).rev() {
            visited.reset(self.capacity);
            let found = self.search_layer::<CODES>(&p, &start, self.ef_construction, l, &mut visited, &|_| true, false);
            let found = found.into_vec();
            // The next layer's walk starts from these, with the walk's own distances.
            let next: Vec<(u32, Dist)> = found.iter().filter(|c| c.1 != id32).map(|&(d, id)| (id, d)).collect();
            let mut sorted: Vec<(Dist, u32)> = if CODES {
                for c in &next {
                    self.prefetch::<false>(c.0);
                }
                next.iter().map(|&(id, _)| (self.dist_to(vector, id), id)).collect()
            } else {
                next.iter().map(|&(id, d)| (d, id)).collect()
            };
            sorted.sort_unstable();
            // Deleted points still guide the walk, but are never linked to.
            let chosen = if self.marked.load(Ordering::Acquire) > 0 {
                let linkable: Vec<(Dist, u32)> = sorted.iter().copied().filter(|c| !self.is_gone(c.1)).collect();
                self.select(&linkable, self.m, self.m)
            } else {
                self.select(&sorted, self.m, self.m)
            };
            let cap = if l == 0 { self.m0 } else { self.m };
            {
                // One lock at a time, never nested: inserts cannot deadlock. Once this point
                // was published on a higher layer, concurrent inserts may already have linked
                // themselves into this list: keep those links after our own choice.
                let _own = self.locks[id32 as usize].lock().unwrap_or_else(|e| e.into_inner());
                self.neighbors(id32, l, &mut buf);
                let mut merged = chosen.clone();
                for &x in buf.iter() {
                    if merged.len() >= cap {
                        break;
                    }
                    if !merged.contains(&x) && !self.is_gone(x) {
                        merged.push(x);
                    }
                }
                self.set_neighbors(id32, l, &merged);
            }
            for &n in &chosen {
                self.link_back(n, id32, l, cap, &mut buf);
            }
            start = next;
        }
        self.give_back(visited);
    }

    /// The probe of a walk from `q`: on int8 codes of a cosine or dot-product graph where
    /// the CPU has integer dot products, with the query quantized too ([`Probe`]).
    fn probe<'a, const CODES: bool>(&self, q: &'a [f32]) -> Probe<'a> {
        let int8 = CODES
            && self.quant == Quantization::Int8
            && !matches!(self.metric.0, Distance::L2)
            && crate::simd::int8_dot_fast();
        Probe { q, i8: int8.then(|| QueryI8::new(q)) }
    }

    /// Adds `new` to the list of `n` at `level`, re-selecting when the list is full.
    ///
    /// A re-selection fills the list only to `cap - cap / LINK_SLACK`, so the next few
    /// back-links append instead of re-selecting again: with every list refilled to the
    /// brim, each back-link to a full list cost a neighbor-heuristic pass (up to `cap²/2`
    /// distances), more than the insert's own graph walk. Measured with `ann-bench` at
    /// 100,000 points: 31% fewer distances per insert, the same recall per distance a
    /// search computes.
    fn link_back(&self, n: u32, new: u32, level: usize, cap: usize, buf: &mut Vec<u32>) {
        let _g = self.locks[n as usize].lock().unwrap_or_else(|e| e.into_inner());
        self.neighbors(n, level, buf);
        if buf.contains(&new) {
            return;
        }
        if buf.len() < cap {
            let list = self.list(n, level);
            list[buf.len() + 1].store(new, Ordering::Release);
            list[0].store(buf.len() as u32 + 1, Ordering::Release);
            return;
        }
        self.reselect(n, level, cap, buf.iter().copied().chain(std::iter::once(new)).filter(|&x| !self.is_gone(x)));
    }

    /// Re-selects the list of `id` at `level` from `cands` (live points, each once) by the
    /// neighbor heuristic, filling it to `cap - cap / LINK_SLACK` (see [`Graph::link_back`]).
    /// The caller holds `id`'s lock.
    fn reselect(&self, id: u32, level: usize, cap: usize, cands: impl IntoIterator<Item = u32>) {
        let base = self.vector(id);
        let mut scored: Vec<(Dist, u32)> =
            cands.into_iter().map(|x| (Dist(self.metric.eval(base, self.vector(x))), x)).collect();
        scored.sort_unstable();
        let chosen = self.select(&scored, cap, cap - cap / LINK_SLACK);
        self.set_neighbors(id, level, &chosen);
    }

    /// Marks points deleted (step 1 of the module documentation's "Deletes without a
    /// rebuild"); ids out of range, already marked or free are skipped. Returns how many
    /// were marked. Inserts already running may still link to them: the caller waits for
    /// those before [`Graph::repair`].
    pub fn mark_deleted(&self, ids: &[u32]) -> usize {
        let n = self.len();
        let mut marked = 0;
        for &id in ids {
            if (id as usize) < n
                && self.states[id as usize].compare_exchange(LIVE, DELETED, Ordering::AcqRel, Ordering::Acquire).is_ok()
            {
                marked += 1;
            }
        }
        self.marked.fetch_add(marked, Ordering::AcqRel);
        marked
    }

    /// Rewrites the lists of the live points in `ids` that hold a deleted point (step 2):
    /// each deleted neighbor's place goes to the best of the list's live points and the
    /// deleted neighbor's own live neighbors, by the insert's heuristic. Returns how many
    /// lists were rewritten. Runs beside inserts and searches.
    pub fn repair(&self, ids: std::ops::Range<usize>) -> usize {
        let mut buf = Vec::with_capacity(self.m0);
        let mut theirs = Vec::with_capacity(self.m0);
        let mut rewritten = 0;
        for id in ids.start..ids.end.min(self.len()) {
            let id32 = id as u32;
            if self.is_gone(id32) {
                continue;
            }
            for level in 0..=self.level(id32) {
                let cap = if level == 0 { self.m0 } else { self.m };
                let _own = self.locks[id].lock().unwrap_or_else(|e| e.into_inner());
                self.neighbors(id32, level, &mut buf);
                if !buf.iter().any(|&x| self.is_gone(x)) {
                    continue;
                }
                let mut cands: Vec<u32> = Vec::with_capacity(cap * 2);
                for &x in buf.iter() {
                    if !self.is_gone(x) {
                        cands.push(x);
                    } else if self.level(x) >= level {
                        self.neighbors(x, level, &mut theirs);
                        cands.extend(theirs.iter().copied().filter(|&y| y != id32 && !self.is_gone(y)));
                    }
                }
                cands.sort_unstable();
                cands.dedup();
                self.reselect(id32, level, cap, cands);
                rewritten += 1;
            }
        }
        rewritten
    }

    /// Links the live points that a walk from the entry point cannot reach at layer 0 back
    /// into the graph: each goes into the list of its nearest reachable point, found by a
    /// walk, and what it links to becomes reachable with it. A repair's re-selection may
    /// prune a point out of every list that named it, and when a large share of the graph
    /// is deleted at once a few points can be left in a small group that only links among
    /// itself; no search returns those. A full list gives up the entry farthest from its
    /// owner that other lists also name. Returns how many points were linked. Runs beside
    /// inserts and searches (points inserted meanwhile are left out).
    pub fn reconnect_unreachable(&self) -> usize {
        let n = self.len();
        let Some((entry, _)) = *self.entry.read().unwrap_or_else(|e| e.into_inner()) else {
            return 0;
        };
        let mut named = vec![0u32; n];
        let mut buf = Vec::with_capacity(self.m0);
        for id in 0..n as u32 {
            if !self.is_gone(id) {
                self.neighbors(id, 0, &mut buf);
                for &x in &buf {
                    if let Some(c) = named.get_mut(x as usize) {
                        *c += 1;
                    }
                }
            }
        }
        let mut reached = vec![false; n];
        let mut stack = Vec::new();
        let mut spread = |from: u32, reached: &mut Vec<bool>| {
            if (from as usize) < n && !reached[from as usize] {
                reached[from as usize] = true;
                stack.push(from);
            }
            let mut out = Vec::with_capacity(self.m0);
            while let Some(id) = stack.pop() {
                self.neighbors(id, 0, &mut out);
                for &x in &out {
                    if (x as usize) < n && !reached[x as usize] && !self.is_gone(x) {
                        reached[x as usize] = true;
                        stack.push(x);
                    }
                }
            }
        };
        spread(entry, &mut reached);
        let mut linked = 0;
        for id in 0..n as u32 {
            if reached[id as usize] || self.is_gone(id) {
                continue;
            }
            let near = self.search(&self.vector(id).to_vec(), 3, self.ef_construction, &|x| {
                x != id && reached.get(x as usize).copied().unwrap_or(false)
            });
            for (near, _) in near {
                let _g = self.locks[near as usize].lock().unwrap_or_else(|e| e.into_inner());
                self.neighbors(near, 0, &mut buf);
                if buf.contains(&id) {
                    break;
                }
                if buf.len() < self.m0 {
                    buf.push(id);
                } else {
                    // The entry farthest from `near` that another list also names.
                    let base = self.vector(near);
                    let Some(slot) = (0..buf.len())
                        .filter(|&i| named.get(buf[i] as usize).is_some_and(|&c| c > 1))
                        .max_by_key(|&i| Dist(self.metric.eval(base, self.vector(buf[i]))))
                    else {
                        continue;
                    };
                    if let Some(c) = named.get_mut(buf[slot] as usize) {
                        *c -= 1;
                    }
                    buf[slot] = id;
                }
                self.set_neighbors(near, 0, &buf);
                named[id as usize] += 1;
                linked += 1;
                break;
            }
            spread(id, &mut reached);
        }
        linked
    }

    /// Frees the deleted points' slots (step 3): clears their lists, gives them
    /// [`FREE_KEY`] and puts them on the free list; moves the entry point to the live point
    /// of the highest level when it was deleted. Exclusive access guarantees that no search
    /// or insert holds a deleted id; [`Graph::repair`] must have run over every point since
    /// they were marked. Returns how many slots were freed.
    pub fn free_deleted(&mut self) -> usize {
        let n = *self.inserted.get_mut();
        let mut freed = Vec::new();
        for id in 0..n {
            if *self.states[id].get_mut() != DELETED {
                continue;
            }
            for level in 0..=self.level(id as u32) {
                self.list(id as u32, level)[0].store(0, Ordering::Release);
            }
            *self.keys[id].get_mut() = FREE_KEY;
            *self.states[id].get_mut() = FREE;
            freed.push(id as u32);
        }
        let entry = self.entry.get_mut().unwrap_or_else(|e| e.into_inner());
        if entry.is_some_and(|(e, _)| *self.states[e as usize].get_mut() != LIVE) {
            let mut best: Option<(u32, usize)> = None;
            for id in 0..n {
                let level = *self.levels[id].get_mut() as usize;
                if *self.states[id].get_mut() == LIVE && best.is_none_or(|(_, l)| level > l) {
                    best = Some((id as u32, level));
                }
            }
            *entry = best;
        }
        self.free.get_mut().unwrap_or_else(|e| e.into_inner()).extend(&freed);
        *self.marked.get_mut() = 0;
        freed.len()
    }

    /// The `k` closest points that pass `keep`, closest first, as (id, score). Scores are
    /// exact: with quantization the best [`rescore_depth`]`(k)` of the walk's `ef`
    /// candidates are rescored from the vectors.
    pub fn search(&self, q: &[f32], k: usize, ef: usize, keep: &dyn Fn(u32) -> bool) -> Vec<(u32, f32)> {
        self.search_rescoring(q, k, ef, keep, rescore_depth(k))
    }

    /// [`Graph::search`], rescoring the best `depth` candidates of a quantized walk.
    fn search_rescoring(
        &self,
        q: &[f32],
        k: usize,
        ef: usize,
        keep: &dyn Fn(u32) -> bool,
        depth: usize,
    ) -> Vec<(u32, f32)> {
        if self.quant == Quantization::None {
            self.walk::<false>(q, k, ef, keep, depth)
        } else {
            self.walk::<true>(q, k, ef, keep, depth)
        }
    }

    fn walk<const CODES: bool>(
        &self,
        q: &[f32],
        k: usize,
        ef: usize,
        keep: &dyn Fn(u32) -> bool,
        depth: usize,
    ) -> Vec<(u32, f32)> {
        let Some((ep, max_level)) = *self.entry.read().unwrap_or_else(|e| e.into_inner()) else {
            return Vec::new();
        };
        if k == 0 {
            return Vec::new();
        }
        let mut buf = Vec::with_capacity(self.m0);
        // A graph opened from its file may find its pages on disk (see the module documentation).
        let mapped = self.mapped_points > 0;
        let mut faults = if mapped { major_faults() } else { 0 };
        let ahead = mapped && self.cold_walk.on();
        let p = self.probe::<CODES>(q);
        let mut cur = ep;
        let mut cur_d = self.walk_dist::<CODES>(&p, ep);
        for l in (1..=max_level).rev() {
            (cur, cur_d) = self.greedy::<CODES>(&p, cur, cur_d, l, &mut buf, ahead);
        }
        let mut visited = self.visited();
        // Deleted points guide the walk but are never returned.
        let keep = |id: u32| !self.is_gone(id) && keep(id);
        // `ef` sizes the walk's heaps: at most MAX_EF (a collection created before the API
        // bounded `hnsw.ef` may carry a larger one), never fewer than the results asked for.
        let ef = ef.min(MAX_EF).max(k);
        let found = self.search_layer::<CODES>(&p, &[(cur, cur_d)], ef, 0, &mut visited, &keep, ahead);
        self.give_back(visited);
        let mut found = found.into_vec();
        if mapped {
            let now = major_faults();
            self.cold_walk.after(now > faults);
            faults = now;
        }
        if CODES {
            // The walk's best candidates by their codes; never fewer than the results asked.
            let depth = depth.max(k);
            if found.len() > depth {
                found.select_nth_unstable(depth);
                found.truncate(depth);
            }
            if mapped && self.cold_rescore.on() {
                buf.clear();
                buf.extend(found.iter().map(|c| c.1));
                self.read_ahead::<false>(&buf);
            }
            for c in found.iter_mut() {
                self.prefetch::<false>(c.1);
            }
            for c in found.iter_mut() {
                c.0 = self.dist_to(q, c.1);
            }
            if mapped {
                self.cold_rescore.after(major_faults() > faults);
            }
        }
        found.sort_unstable();
        let metric = self.metric;
        found.into_iter().take(k).map(|(d, id)| (id, metric.score(d.0))).collect()
    }

    /// The graph with room for `capacity` points (the caller holds `self` exclusively,
    /// which is left empty). The vectors, codes, keys, levels and layer-0 lists are not
    /// copied: their regions are extended in place or moved by the kernel
    /// ([`Region::grow`]), so growing a graph of a million points under its write lock
    /// takes milliseconds, not the seconds a copy of its gigabytes of vectors took.
    pub fn grown(&mut self, capacity: usize) -> Graph {
        let n = *self.allocated.get_mut();
        let mapped_points = self.mapped_points;
        let capacity = capacity.max(n).max(self.capacity);
        // A graph of empty regions, then this one's regions, grown, moved into it.
        let mut g = Graph::with_mapped(self.dim, self.metric.0, self.params(), 0, None, 0);
        g.capacity = capacity;
        g.mapped = self.mapped.take();
        g.mapped_points = mapped_points;
        g.cold_walk = std::mem::replace(&mut self.cold_walk, ColdSpell::new(false));
        g.cold_rescore = std::mem::replace(&mut self.cold_rescore, ColdSpell::new(false));
        self.mapped_points = 0;
        g.mapped_ptr = std::mem::replace(&mut self.mapped_ptr, std::ptr::null_mut());
        g.mapped_codes = std::mem::replace(&mut self.mapped_codes, std::ptr::null_mut());
        g.m = self.m;
        g.m0 = self.m0;
        g.ef_construction = self.ef_construction;
        g.quant = self.quant;
        g.code_words = self.code_words;
        fn take_grown<T: crate::region::Zeroable>(r: &mut Region<T>, len: usize) -> Region<T> {
            let mut r = std::mem::replace(r, Region::zeroed(0));
            r.grow(len);
            r
        }
        g.vectors = take_grown(&mut self.vectors, (capacity - mapped_points) * self.dim);
        g.codes = take_grown(&mut self.codes, (capacity - mapped_points) * self.code_words);
        g.keys = take_grown(&mut self.keys, capacity);
        g.levels = take_grown(&mut self.levels, capacity);
        g.links0 = take_grown(&mut self.links0, capacity * (self.m0 + 1));
        g.states = take_grown(&mut self.states, capacity);
        g.free = Mutex::new(std::mem::take(self.free.get_mut().unwrap_or_else(|e| e.into_inner())));
        *g.marked.get_mut() = *self.marked.get_mut();
        let mut upper = std::mem::take(&mut self.upper).into_vec();
        upper.resize_with(capacity, OnceLock::new);
        g.upper = upper.into_boxed_slice();
        g.locks = (0..capacity).map(|_| Mutex::new(())).collect();
        *g.allocated.get_mut() = n;
        *g.inserted.get_mut() = *self.inserted.get_mut();
        *g.entry.get_mut().unwrap_or_else(|e| e.into_inner()) =
            *self.entry.get_mut().unwrap_or_else(|e| e.into_inner());
        g
    }

    /// The graph as it stands, for [`Graph::save_cut`]. The caller ensures that no insert
    /// runs now; inserts may run again while the cut is saved.
    pub fn cut(&self) -> Cut {
        let points = self.len();
        assert_eq!(points, self.allocated.load(Ordering::Acquire), "cut while inserting");
        Cut { points, entry: *self.entry.read().unwrap_or_else(|e| e.into_inner()) }
    }

    /// Writes the graph to `path`, marked as covering the owner's log up to record
    /// `covered_seq` (atomically: a temporary file, fsynced, then renamed). The caller
    /// ensures no insert runs meanwhile.
    pub fn save(&self, path: &Path, covered_seq: u64) -> Result<()> {
        self.save_cut(path, covered_seq, self.cut())
    }

    /// Writes the points of `cut` as [`Graph::save`] does, while inserts may go on: links
    /// to points added since the cut are left out of the saved lists, and the entry point is
    /// the cut's. Vectors, keys and levels of the cut's points never change, and every id a
    /// list holds is a published point (see the module documentation), so what is written
    /// is a whole graph of those points.
    pub fn save_cut(&self, path: &Path, covered_seq: u64, cut: Cut) -> Result<()> {
        let n = cut.points;
        let mut w = SumWriter::create(path, MAGIC)?;
        let (entry, max_level) = match cut.entry {
            Some((e, l)) => (e as u64 + 1, l as u64),
            None => (0, 0),
        };
        let distance = match self.metric.0 {
            Distance::Cosine => 0u64,
            Distance::Dot => 1,
            Distance::L2 => 2,
        };
        for x in [
            FORMAT_VERSION,
            self.dim as u64,
            self.m as u64,
            self.m0 as u64,
            self.ef_construction as u64,
            distance,
            n as u64,
            entry,
            max_level,
            covered_seq,
            self.quant.tag(),
        ] {
            w.u64(x)?;
        }
        for i in 0..n {
            w.u64(self.key(i as u32))?;
        }
        let levels: Vec<u8> = (0..n).map(|i| self.level(i as u32) as u8).collect();
        w.put(&levels)?;
        w.put(&[0u8; 8][..(8 - n % 8) % 8])?;
        let mut buf = Vec::with_capacity(self.m0);
        // A list as the cut has it: its links to the cut's points, the free slots zeroed.
        let mut put_list = |w: &mut SumWriter, id: u32, level: usize, slots: usize| -> Result<()> {
            self.neighbors(id, level, &mut buf);
            buf.retain(|&x| (x as usize) < n);
            w.u32(buf.len() as u32)?;
            for slot in 0..slots {
                w.u32(buf.get(slot).copied().unwrap_or(0))?;
            }
            Ok(())
        };
        for i in 0..n {
            put_list(&mut w, i as u32, 0, self.m0)?;
        }
        let mut offset = 0u64;
        for i in 0..=n {
            w.u64(offset)?;
            if i < n {
                offset += (self.level(i as u32) * (self.m + 1)) as u64;
            }
        }
        for i in 0..n {
            for level in 1..=self.level(i as u32) {
                put_list(&mut w, i as u32, level, self.m)?;
            }
        }
        start_aligned_section(&mut w)?;
        for i in 0..n {
            for x in self.vector(i as u32) {
                w.put(&x.to_le_bytes())?;
            }
        }
        if self.code_words > 0 {
            start_aligned_section(&mut w)?;
            for i in 0..n {
                for x in self.code(i as u32) {
                    w.put(&x.to_le_bytes())?;
                }
            }
        }
        w.finish()
    }

    /// Opens a graph written by [`Graph::save`] with room for `extra` more points (see
    /// the module documentation: the vectors stay in the mapped file); answers it with the
    /// log record it covers.
    pub fn load(path: &Path, extra: usize) -> Result<(Graph, u64)> {
        let bad = |why: &str| IndexError::Corrupt(format!("{}: {why}", path.display()));
        let file = std::fs::File::open(path)?;
        // SAFETY: the file is only ever replaced by a rename, never written in place or
        // truncated, so the mapping's contents do not change under it. The mapping is
        // private: what the graph writes there (reused slots) never reaches the file.
        let mut map = unsafe { memmap2::MmapOptions::new().map_copy(&file)? };
        if map.len() < 8 + 10 * 8 + 4 || &map[..8] != MAGIC {
            return Err(bad("not a ragway HNSW file"));
        }
        let mut r = Cursor::new(&map);
        r.take(8);
        let header: Vec<u64> = (0..10).map(|_| r.u64()).collect::<Option<_>>().ok_or_else(|| bad("short header"))?;
        let [version, dim, m, m0, efc, distance, n, entry, max_level, seq] = header[..] else { unreachable!() };
        let quant = match version {
            2 => Quantization::None,
            FORMAT_VERSION => {
                let tag = r.u64().ok_or_else(|| bad("short header"))?;
                Quantization::from_tag(tag).ok_or_else(|| bad("unknown quantization"))?
            }
            _ => return Err(bad(&format!("format version {version}, this build reads 2 and {FORMAT_VERSION}"))),
        };
        let distance = match distance {
            0 => Distance::Cosine,
            1 => Distance::Dot,
            2 => Distance::L2,
            _ => return Err(bad("unknown distance")),
        };
        if dim == 0
            || dim > 1 << 16
            || !usize::try_from(m).is_ok_and(|m| M_RANGE.contains(&m))
            || m0 != 2 * m
            || n > u32::MAX as u64
            || max_level > MAX_LEVEL as u64
            || !(1..=MAX_EF as u64).contains(&efc)
        {
            return Err(bad("implausible header"));
        }
        let (dim, m, m0, n) = (dim as usize, m as usize, m0 as usize, n as usize);
        // The vectors must fit in the file before anything is sized by `n`.
        if (n as u64).checked_mul(dim as u64 * 4 + 8).is_none_or(|b| b > map.len() as u64) {
            return Err(bad("short file"));
        }
        let keys = r.take(n * 8).ok_or_else(|| bad("short keys"))?;
        let levels = r.take(n + (8 - n % 8) % 8).ok_or_else(|| bad("short levels"))?;
        let links = r.take(n * (m0 + 1) * 4).ok_or_else(|| bad("short links"))?;
        let offsets: Vec<u64> = (0..=n).map(|_| r.u64()).collect::<Option<_>>().ok_or_else(|| bad("short offsets"))?;
        let upper_len = offsets[n].checked_mul(4).ok_or_else(|| bad("offsets"))?;
        let upper =
            r.take(usize::try_from(upper_len).map_err(|_| bad("offsets"))?).ok_or_else(|| bad("short upper lists"))?;
        let structure_end = r.at;
        let crc = r.u32().ok_or_else(|| bad("short file"))?;
        if crc32fast::hash(&map[..structure_end]) != crc {
            return Err(bad("checksum mismatch"));
        }
        let section = r.at;
        let vectors_at = (r.at as u64).next_multiple_of(VECTORS_ALIGN) as usize;
        let vectors_end = vectors_at + n * dim * 4;
        let code_words = quant.words(dim);
        let (codes_section, codes_at, end) = if code_words > 0 {
            let section = vectors_end + 4;
            let at = (section as u64).next_multiple_of(VECTORS_ALIGN) as usize;
            let bytes = (n as u64).checked_mul(code_words as u64 * 4).ok_or_else(|| bad("size"))?;
            (section, at, at as u64 + bytes + 4)
        } else {
            (0, 0, vectors_end as u64 + 4)
        };
        if map.len() as u64 != end {
            return Err(bad("file size does not match its header"));
        }
        if (map.as_ptr() as usize + vectors_at) % std::mem::align_of::<f32>() != 0 {
            return Err(bad("misaligned vectors"));
        }
        // What every search reads — the codes, or the vectors when there are none — is read
        // ahead by the kernel while the open goes on, so that after a cold start the first
        // searches do not fault their pages in one by one.
        let (ahead_at, ahead_len) =
            if code_words > 0 { (codes_at, n * code_words * 4) } else { (vectors_at, n * dim * 4) };
        #[cfg(unix)]
        if let Err(e) = map.advise_range(memmap2::Advice::WillNeed, ahead_at, ahead_len) {
            tracing::debug!(error = %e, "madvise(WILLNEED) on the saved graph failed");
        }
        // With codes the vectors are only rescored, a few scattered ones a search: a fault
        // there reads its own page, not a read-ahead window of vectors no search asked for
        // (which, when the collection is larger than memory, evicts the codes).
        #[cfg(unix)]
        if code_words > 0 {
            if let Err(e) = map.advise_range(memmap2::Advice::Random, vectors_at, n * dim * 4) {
                tracing::debug!(error = %e, "madvise(RANDOM) on the saved graph's vectors failed");
            }
        }
        let capacity = n.checked_add(extra).ok_or_else(|| bad("size"))?;
        // The mapping moves in last, once nothing borrows from it.
        let params = Params { m, ef_construction: efc as usize, quantization: quant };
        let mut g = Graph::with_mapped(dim, distance, params, capacity, None, n);
        let mut free = Vec::new();
        for (i, (slot, b)) in g.keys.iter_mut().zip(keys.chunks_exact(8)).enumerate() {
            let key = u64::from_le_bytes(b.try_into().expect("8 bytes"));
            *slot.get_mut() = key;
            if key == FREE_KEY {
                *g.states[i].get_mut() = FREE;
                free.push(i as u32);
            }
        }
        for (slot, &level) in g.levels.iter_mut().zip(&levels[..n]) {
            if level as usize > MAX_LEVEL {
                return Err(bad("level out of range"));
            }
            *slot.get_mut() = level;
        }
        for (i, c) in links.chunks_exact(4).enumerate() {
            let x = u32::from_le_bytes(c.try_into().expect("4 bytes"));
            let slot = i % (m0 + 1);
            if (slot == 0 && x as usize > m0) || (slot > 0 && x as usize >= n.max(1)) {
                return Err(bad("link out of range"));
            }
            *g.links0[i].get_mut() = x;
        }

        let mut upper = Cursor::new(upper);
        for i in 0..n {
            let level = levels[i] as usize;
            let len = (offsets[i + 1].checked_sub(offsets[i]).ok_or_else(|| bad("offsets"))?) as usize;
            if len != level * (m + 1) {
                return Err(bad("upper list size"));
            }
            if level > 0 {
                let raw = upper.take(len * 4).ok_or_else(|| bad("short upper lists"))?;
                let mut lists = Vec::with_capacity(len);
                for (j, c) in raw.chunks_exact(4).enumerate() {
                    let x = u32::from_le_bytes(c.try_into().expect("4 bytes"));
                    let slot = j % (m + 1);
                    if (slot == 0 && x as usize > m) || (slot > 0 && x as usize >= n) {
                        return Err(bad("link out of range"));
                    }
                    lists.push(AtomicU32::new(x));
                }
                // A walk at layer l reads the lists at l of the points it reaches: each must
                // have one (slots past a list's count may be stale, and are never read).
                for (l, list) in lists.chunks_exact(m + 1).enumerate() {
                    let count = list[0].load(Ordering::Relaxed) as usize;
                    if list[1..=count].iter().any(|x| (levels[x.load(Ordering::Relaxed) as usize] as usize) < l + 1) {
                        return Err(bad("a link above layer 0 names a point below that layer"));
                    }
                }
                let _ = g.upper[i].set(lists.into_boxed_slice());
            }
        }
        if !upper.is_done() {
            return Err(bad("upper lists"));
        }
        // No list may name a free slot (reusing it rewrites it while searches run), and a
        // free slot's own lists are empty.
        if !free.is_empty() {
            for i in 0..n as u32 {
                for level in 0..=g.level(i) {
                    let list = g.list(i, level);
                    let count = list[0].load(Ordering::Relaxed) as usize;
                    if (count > 0 && g.is_free(i))
                        || list[1..=count].iter().any(|x| g.is_free(x.load(Ordering::Relaxed)))
                    {
                        return Err(bad("a list names a free slot"));
                    }
                }
            }
        }
        let entry = match entry {
            0 if n == 0 => None,
            0 => return Err(bad("no entry point")),
            e if (e - 1) as usize >= n => return Err(bad("entry point out of range")),
            e => Some(((e - 1) as u32, max_level as usize)),
        };
        if let Some((e, l)) = entry {
            if levels[e as usize] as usize != l || g.is_free(e) {
                return Err(bad("entry point level"));
            }
        }
        *g.free.get_mut().unwrap_or_else(|e| e.into_inner()) = free;
        *g.entry.get_mut().unwrap_or_else(|e| e.into_inner()) = entry;
        *g.allocated.get_mut() = n;
        *g.inserted.get_mut() = n;
        // Pointers into the mapping, taken once nothing else borrows it.
        g.mapped_ptr = map[vectors_at..].as_mut_ptr() as *mut f32;
        g.mapped_codes = if code_words > 0 { map[codes_at..].as_mut_ptr() as *mut u32 } else { std::ptr::null_mut() };
        g.mapped = Some(Mapped { section, codes_section, map, file });
        Ok((g, seq))
    }

    /// Checks the saved vectors' checksum (reading every one of them) for a graph opened by
    /// [`Graph::load`]; `Ok` for a graph with none mapped.
    pub fn verify_vectors(&self) -> Result<()> {
        use std::io::{Read, Seek, SeekFrom};
        let Some(m) = &self.mapped else { return Ok(()) };
        // From the file, not the mapping: reused slots are written into the mapping.
        let end = m.map.len() - 4;
        let sections = match m.codes_section {
            0 => vec![(m.section, end, "vectors")],
            codes => vec![(m.section, codes - 4, "vectors"), (codes, end, "codes")],
        };
        let mut file = &m.file;
        let mut block = vec![0u8; 1 << 20];
        for (start, end, what) in sections {
            file.seek(SeekFrom::Start(start as u64))?;
            let mut sum = crc32fast::Hasher::new();
            let mut left = end - start;
            while left > 0 {
                let take = left.min(block.len());
                file.read_exact(&mut block[..take])?;
                sum.update(&block[..take]);
                left -= take;
            }
            let mut crc = [0u8; 4];
            file.read_exact(&mut crc)?;
            if sum.finalize() != u32::from_le_bytes(crc) {
                return Err(IndexError::Corrupt(format!("saved graph: the {what}' checksum does not match")));
            }
        }
        Ok(())
    }
}

/// Ends the file's current checksummed section and pads to [`VECTORS_ALIGN`], where the next
/// section's array (vectors, codes) starts; the padding belongs to the new section.
fn start_aligned_section(w: &mut SumWriter) -> Result<()> {
    w.seal()?;
    let pad = (VECTORS_ALIGN - w.position() % VECTORS_ALIGN) % VECTORS_ALIGN;
    w.put(&[0u8; VECTORS_ALIGN as usize][..pad as usize])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dense::exact_search;
    use crate::dense::tests::vectors;
    use rayon::prelude::*;

    fn recall(g: &Graph, data: &[Vec<f32>], queries: &[Vec<f32>], distance: Distance, ef: usize) -> f64 {
        let mut hits = 0;
        for q in queries {
            let exact = exact_search(distance, q, data.iter().enumerate().map(|(i, v)| (i as u64, v.as_slice())), 10);
            let approx = g.search(q, 10, ef, &|_| true);
            assert_eq!(approx.len(), 10);
            for (id, score) in &approx {
                let want = distance.score(q, &data[g.key(*id) as usize]);
                assert!((score - want).abs() < 1e-4, "{distance:?}: {score} vs {want}");
            }
            hits += approx.iter().filter(|a| exact.iter().any(|e| e.0 == g.key(a.0))).count();
        }
        hits as f64 / (10 * queries.len()) as f64
    }

    /// Inserts `data` (keys from `first_key`), growing the graph whenever it is full.
    fn insert_growing(g: &mut Graph, data: &[Vec<f32>], first_key: usize) {
        for (i, v) in data.iter().enumerate() {
            if !g.has_room(1) {
                *g = g.grown(g.capacity() * 2);
            }
            g.insert(v, (first_key + i) as u64);
        }
    }

    /// A graph of `data`, inserted one by one (keys are the indexes).
    fn graph_of(
        data: &[Vec<f32>],
        distance: Distance,
        m: usize,
        ef_construction: usize,
        quantization: Quantization,
    ) -> Graph {
        let g = Graph::new(data[0].len(), distance, Params { m, ef_construction, quantization }, data.len());
        for (i, v) in data.iter().enumerate() {
            g.insert(v, i as u64);
        }
        g
    }

    #[test]
    fn parallel_build_reaches_exact_search_recall_for_every_distance() {
        for distance in [Distance::Cosine, Distance::Dot, Distance::L2] {
            let data = vectors(3000, 24, 1);
            let g = Graph::new(
                24,
                distance,
                Params { m: 16, ef_construction: 100, quantization: Quantization::None },
                data.len(),
            );
            data.par_iter().enumerate().for_each(|(i, v)| {
                g.insert(v, i as u64);
            });
            assert_eq!(g.len(), 3000);
            let r = recall(&g, &data, &vectors(50, 24, 2), distance, 100);
            assert!(r > 0.95, "{distance:?} recall {r}");
        }
    }

    #[test]
    fn save_and_load_round_trip_answer_alike_and_keep_growing() {
        let dir = tempfile::tempdir().unwrap();
        let data = vectors(1500, 16, 3);
        let mut g = Graph::new(
            16,
            Distance::Cosine,
            Params { m: 8, ef_construction: 64, quantization: Quantization::None },
            100,
        );
        insert_growing(&mut g, &data[..1000], 0);
        let path = dir.path().join("g.hnsw");
        g.save(&path, 42).unwrap();
        let (mut loaded, covered) = Graph::load(&path, 10).unwrap();
        assert_eq!(loaded.len(), 1000);
        assert_eq!(covered, 42);
        assert_eq!(loaded.mapped_points, 1000, "the saved vectors are read from the file");
        loaded.verify_vectors().unwrap();
        let queries = vectors(20, 16, 4);
        for q in &queries {
            assert_eq!(g.search(q, 10, 50, &|_| true), loaded.search(q, 10, 50, &|_| true));
        }
        // Growing past the room it was opened with keeps the mapped vectors.
        insert_growing(&mut loaded, &data[1000..], 1000);
        for (i, v) in data.iter().enumerate() {
            assert_eq!(loaded.vector(i as u32), &v[..], "point {i}");
        }
        assert!(recall(&loaded, &data, &queries, Distance::Cosine, 100) > 0.95);
        // Saved again (over the file it maps) and reopened: the same answers.
        loaded.save(&path, 43).unwrap();
        let (again, covered) = Graph::load(&path, 0).unwrap();
        assert_eq!((again.len(), covered), (1500, 43));
        for q in &queries {
            assert_eq!(loaded.search(q, 10, 50, &|_| true), again.search(q, 10, 50, &|_| true));
        }
    }

    #[test]
    fn a_cold_graph_reads_ahead_and_answers_as_a_warm_one() {
        let dir = tempfile::tempdir().unwrap();
        let data = vectors(2000, 32, 21);
        let queries = vectors(crate::cold::COLD_SEARCHES as usize + 8, 32, 22);
        for quantization in [Quantization::None, Quantization::Int8] {
            let g = graph_of(&data, Distance::Cosine, 8, 64, quantization);
            let path = dir.path().join("g.hnsw");
            g.save(&path, 1).unwrap();
            let (loaded, _) = Graph::load(&path, 0).unwrap();
            // Opened from its file: its pages may be on disk only, so searches read ahead.
            assert!(loaded.cold_walk.on() && loaded.cold_rescore.on(), "{quantization:?}");
            let faults = major_faults();
            let cold: Vec<_> = queries.iter().map(|q| loaded.search(q, 10, 40, &|_| true)).collect();
            if major_faults() == faults {
                // Every page was in memory: each search counted the cold spells down (the
                // rescoring's only where there are codes to rescore from).
                assert!(!loaded.cold_walk.on(), "{quantization:?}");
                assert_eq!(loaded.cold_rescore.on(), quantization == Quantization::None);
            }
            loaded.cold_walk.0.store(0, Ordering::Relaxed);
            loaded.cold_rescore.0.store(0, Ordering::Relaxed);
            for (q, before) in queries.iter().zip(&cold) {
                assert_eq!(&loaded.search(q, 10, 40, &|_| true), before, "{quantization:?}");
                assert_eq!(&g.search(q, 10, 40, &|_| true), before, "{quantization:?}");
            }
            // A graph built in memory never reads ahead.
            assert!(!g.cold_walk.on() && !g.cold_rescore.on());
        }
    }

    #[test]
    fn a_cut_saved_while_inserts_go_on_is_the_graph_of_its_points() {
        let dir = tempfile::tempdir().unwrap();
        let data = vectors(4000, 16, 8);
        let g = Graph::new(
            16,
            Distance::Cosine,
            Params { m: 8, ef_construction: 64, quantization: Quantization::Int8 },
            4000,
        );
        for (i, v) in data[..2000].iter().enumerate() {
            g.insert(v, i as u64);
        }
        let cut = g.cut();
        assert_eq!(cut.points(), 2000);
        let path = dir.path().join("g.hnsw");
        // Inserts link the cut's points to new ones (and re-select their lists) while the
        // cut is written: the file holds none of those links.
        std::thread::scope(|s| {
            s.spawn(|| {
                use rayon::prelude::*;
                data[2000..].par_iter().enumerate().for_each(|(i, v)| {
                    g.insert(v, 2000 + i as u64);
                });
            });
            for round in 0..5 {
                g.save_cut(&path, round, cut).unwrap();
            }
        });
        let (loaded, covered) = Graph::load(&path, 0).unwrap();
        assert_eq!((loaded.len(), covered), (2000, 4));
        loaded.verify_vectors().unwrap();
        for i in 0..2000u32 {
            assert_eq!(loaded.key(i), i as u64);
            assert_eq!(loaded.vector(i), &data[i as usize][..]);
        }
        let queries = vectors(30, 16, 9);
        assert!(recall(&loaded, &data[..2000], &queries, Distance::Cosine, 100) > 0.95);
        // The live graph, all 4000 points, is intact too.
        assert_eq!(g.len(), 4000);
        assert!(recall(&g, &data, &queries, Distance::Cosine, 100) > 0.95);
    }

    #[test]
    fn damaged_files_are_refused_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let data = vectors(200, 8, 5);
        let g = graph_of(&data, Distance::Dot, 4, 32, Quantization::None);
        let path = dir.path().join("g.hnsw");
        g.save(&path, 0).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let vectors_at = bytes.len() - 4 - 200 * 8 * 4;
        // The structure is checked on open.
        for at in [0, 20, 100, vectors_at / 2, vectors_at - 70] {
            let mut b = bytes.clone();
            b[at] ^= 0x40;
            std::fs::write(&path, &b).unwrap();
            assert!(Graph::load(&path, 0).is_err(), "flip at {at} accepted");
        }
        // The vectors by their own checksum, on demand.
        for at in [vectors_at, bytes.len() - 100, bytes.len() - 1] {
            let mut b = bytes.clone();
            b[at] ^= 0x40;
            std::fs::write(&path, &b).unwrap();
            let (g, _) = Graph::load(&path, 0).unwrap();
            assert!(g.verify_vectors().is_err(), "flip at {at} accepted");
        }
        std::fs::write(&path, &bytes).unwrap();
        Graph::load(&path, 0).unwrap().0.verify_vectors().unwrap();
        for cut in [1, 9, bytes.len() / 2] {
            std::fs::write(&path, &bytes[..bytes.len() - cut]).unwrap();
            assert!(Graph::load(&path, 0).is_err(), "cut of {cut} accepted");
        }
    }

    #[test]
    fn quantized_walks_keep_recall_and_report_exact_scores() {
        for distance in [Distance::Cosine, Distance::Dot, Distance::L2] {
            let data = vectors(3000, 40, 11);
            let queries = vectors(50, 40, 12);
            let mut g = Graph::new(
                40,
                distance,
                Params { m: 16, ef_construction: 100, quantization: Quantization::None },
                3000,
            );
            data.par_iter().enumerate().for_each(|(i, v)| {
                g.insert(v, i as u64);
            });
            let plain = recall(&g, &data, &queries, distance, 100);
            for quant in [Quantization::F16, Quantization::Int8] {
                g.set_quantization(quant);
                // `recall` also checks that every reported score is the exact one.
                let r = recall(&g, &data, &queries, distance, 100);
                assert!(r > 0.95 && r >= plain - 0.02, "{distance:?} {quant:?}: recall {r} (unquantized {plain})");
                // The walk really reads the codes: with every code zeroed it stops finding
                // the neighbors, while a vector's own search still finds it exactly.
                for q in &queries[..5] {
                    let found = g.search(q, 10, 100, &|_| true);
                    assert!(found.windows(2).all(|w| w[0].1 >= w[1].1), "{quant:?}: results best first");
                }
            }
            g.set_quantization(Quantization::Int8);
            for c in g.codes.iter_mut() {
                *c.get_mut() = 0;
            }
            let starved = recall(&g, &data, &queries, distance, 100);
            assert!(starved < 0.5, "{distance:?}: zeroed codes still gave recall {starved}");
        }
    }

    #[test]
    fn rescoring_the_best_candidates_keeps_the_recall_of_rescoring_all() {
        assert_eq!((rescore_depth(1), rescore_depth(10), rescore_depth(100)), (40, 40, 400));
        assert_eq!(rescore_depth(usize::MAX), usize::MAX, "the depth saturates");
        let data = vectors(6000, 48, 31);
        let queries = vectors(200, 48, 32);
        let mut g = Graph::new(
            48,
            Distance::Cosine,
            Params { m: 12, ef_construction: 100, quantization: Quantization::None },
            6000,
        );
        data.par_iter().enumerate().for_each(|(i, v)| {
            g.insert(v, i as u64);
        });
        for quant in [Quantization::F16, Quantization::Int8] {
            g.set_quantization(quant);
            for ef in [64, 256] {
                let (mut all, mut best, mut exact_k) = (0, 0, 0);
                let mut differ = 0;
                for q in &queries {
                    let exact = exact_search(
                        Distance::Cosine,
                        q,
                        data.iter().enumerate().map(|(i, v)| (i as u64, v.as_slice())),
                        10,
                    );
                    let hits =
                        |found: &[(u32, f32)]| found.iter().filter(|a| exact.iter().any(|e| e.0 == g.key(a.0))).count();
                    let full = g.search_rescoring(q, 10, ef, &|_| true, usize::MAX);
                    let shallow = g.search(q, 10, ef, &|_| true);
                    // Rescoring only as many candidates as results ranks by the codes' order
                    // among them: the exact scores, but not always the exact ten.
                    let bare = g.search_rescoring(q, 10, ef, &|_| true, 10);
                    assert_eq!(shallow.len(), 10);
                    for (id, score) in &shallow {
                        let want = Distance::Cosine.score(q, &data[g.key(*id) as usize]);
                        assert!((score - want).abs() < 1e-4, "{quant:?}: {score} vs {want}");
                    }
                    (all, best, exact_k) = (all + hits(&full), best + hits(&shallow), exact_k + hits(&bare));
                    differ += usize::from(bare != full);
                }
                let total = (10 * queries.len()) as f64;
                let (all, best, bare) = (all as f64 / total, best as f64 / total, exact_k as f64 / total);
                assert!(best >= all - 0.005, "{quant:?} ef {ef}: recall {best} rescoring 40, {all} rescoring {ef}");
                // The depth is what the walk rescores: with fewer, int8 codes' misorderings
                // show (f16 codes order ten candidates as their vectors do).
                assert!(bare <= best, "{quant:?} ef {ef}: rescoring 10 gave recall {bare}, 40 {best}");
                if quant == Quantization::Int8 {
                    assert!(differ > 0, "ef {ef}: rescoring 10 int8 candidates always found what rescoring all did");
                }
            }
        }
    }

    #[test]
    fn int8_graphs_build_on_their_codes_with_the_recall_of_an_f32_build() {
        for distance in [Distance::Cosine, Distance::Dot, Distance::L2] {
            let data = vectors(3000, 40, 21);
            let queries = vectors(50, 40, 22);
            // One thread each: the same insertion order, so only the walk's distances differ.
            let plain = graph_of(&data, distance, 12, 60, Quantization::None);
            let mut coded = graph_of(&data, distance, 12, 60, Quantization::Int8);
            let (mut a, mut b) = (Vec::new(), Vec::new());
            let differ = (0..data.len() as u32)
                .filter(|&id| {
                    plain.neighbors(id, 0, &mut a);
                    coded.neighbors(id, 0, &mut b);
                    a != b
                })
                .count();
            assert!(differ > 0, "{distance:?}: the int8 build chose every link the f32 build did");
            // The links' quality, searched alike (on the f32 vectors) at a small `ef`.
            coded.set_quantization(Quantization::None);
            let (rp, rc) =
                (recall(&plain, &data, &queries, distance, 16), recall(&coded, &data, &queries, distance, 16));
            assert!(rc >= rp - 0.02, "{distance:?}: recall {rc} after an int8 build, {rp} after an f32 build");
        }
    }

    #[test]
    fn quantized_graphs_save_their_codes_and_reopen_alike() {
        let dir = tempfile::tempdir().unwrap();
        let data = vectors(1200, 24, 13);
        let queries = vectors(20, 24, 14);
        for quant in [Quantization::F16, Quantization::Int8] {
            let g = graph_of(&data[..1000], Distance::Cosine, 8, 64, quant);
            let path = dir.path().join(format!("{quant:?}.hnsw"));
            g.save(&path, 7).unwrap();
            let (mut loaded, covered) = Graph::load(&path, 0).unwrap();
            assert_eq!((loaded.len(), covered, loaded.quantization()), (1000, 7, quant));
            loaded.verify_vectors().unwrap();
            for i in 0..1000u32 {
                assert_eq!(loaded.code(i), g.code(i), "{quant:?} point {i}");
            }
            for q in &queries {
                assert_eq!(g.search(q, 10, 50, &|_| true), loaded.search(q, 10, 50, &|_| true));
            }
            // Points added after the open get codes in memory; a grown graph keeps both.
            insert_growing(&mut loaded, &data[1000..], 1000);
            for (i, v) in data.iter().enumerate() {
                let mut code = vec![0u32; quant.words(v.len())];
                quant.encode(v, &mut code);
                assert_eq!(loaded.code(i as u32), &code[..], "{quant:?} point {i}");
            }
            assert!(recall(&loaded, &data, &queries, Distance::Cosine, 100) > 0.95);
            // A flipped bit among the codes is caught by their checksum.
            let bytes = std::fs::read(&path).unwrap();
            let mut b = bytes.clone();
            let at = bytes.len() - 40;
            b[at] ^= 0x10;
            std::fs::write(&path, &b).unwrap();
            let (damaged, _) = Graph::load(&path, 0).unwrap();
            let err = damaged.verify_vectors().unwrap_err().to_string();
            assert!(err.contains("codes"), "{err}");
        }
    }

    #[test]
    fn version_2_files_still_open_as_unquantized_graphs() {
        // A version-2 file is a version-3 file of an unquantized graph without the last
        // header field.
        let dir = tempfile::tempdir().unwrap();
        let data = vectors(300, 8, 15);
        let g = graph_of(&data, Distance::Cosine, 4, 32, Quantization::None);
        let path = dir.path().join("g.hnsw");
        g.save(&path, 3).unwrap();
        let v3 = std::fs::read(&path).unwrap();
        let header_end = 8 + 11 * 8;
        // Structure: magic, header without the quantization, the rest; its CRC recomputed.
        let mut v2: Vec<u8> = Vec::new();
        v2.extend_from_slice(&v3[..8]);
        v2.extend_from_slice(&2u64.to_le_bytes());
        v2.extend_from_slice(&v3[16..header_end - 8]);
        // The rest of the structure (keys, levels, lists, offsets, upper lists), by the format.
        let n = 300;
        let upper: usize = (0..n).map(|i| g.level(i as u32) * (4 + 1) * 4).sum();
        let body_end = header_end + n * 8 + n.next_multiple_of(8) + n * (8 + 1) * 4 + (n + 1) * 8 + upper;
        v2.extend_from_slice(&v3[header_end..body_end]);
        let crc = crc32fast::hash(&v2);
        v2.extend_from_slice(&crc.to_le_bytes());
        let pad = (64 - v2.len() % 64) % 64;
        v2.extend(std::iter::repeat(0u8).take(pad));
        let vectors_start = v2.len();
        v2.extend_from_slice(&v3[v3.len() - 4 - 300 * 8 * 4..v3.len() - 4]);
        let vcrc = crc32fast::hash(&v2[vectors_start - pad..]);
        v2.extend_from_slice(&vcrc.to_le_bytes());
        std::fs::write(&path, &v2).unwrap();
        let (old, covered) = Graph::load(&path, 0).unwrap();
        assert_eq!((old.len(), covered, old.quantization()), (300, 3, Quantization::None));
        old.verify_vectors().unwrap();
        for q in &vectors(10, 8, 16) {
            assert_eq!(g.search(q, 5, 40, &|_| true), old.search(q, 5, 40, &|_| true));
        }
    }

    #[test]
    fn filtered_search_returns_only_kept_points() {
        let data = vectors(800, 8, 6);
        let g = graph_of(&data, Distance::Cosine, 8, 64, Quantization::None);
        let found = g.search(&data[0], 10, 200, &|id| g.key(id) % 3 == 0);
        assert_eq!(found.len(), 10);
        assert!(found.iter().all(|(id, _)| g.key(*id) % 3 == 0));
    }

    /// Recall@10 at `ef` over the graph's live points (`vectors[key]`), against exact
    /// search over the same points; also checks every reported score.
    fn live_recall(
        g: &Graph,
        vectors: &std::collections::HashMap<u64, Vec<f32>>,
        queries: &[Vec<f32>],
        ef: usize,
    ) -> f64 {
        let mut hits = 0;
        for q in queries {
            let exact = exact_search(Distance::Cosine, q, vectors.iter().map(|(k, v)| (*k, v.as_slice())), 10);
            let approx = g.search(q, 10, ef, &|_| true);
            assert_eq!(approx.len(), 10);
            for (id, score) in &approx {
                let want = Distance::Cosine.score(q, &vectors[&g.key(*id)]);
                assert!((score - want).abs() < 1e-4, "point {id}: {score} vs {want}");
            }
            hits += approx.iter().filter(|a| exact.iter().any(|e| e.0 == g.key(a.0))).count();
        }
        hits as f64 / (10 * queries.len()) as f64
    }

    /// No list names a deleted or free point, free slots have empty lists, the entry point
    /// is live, and every live point's own vector finds it first.
    fn assert_clean(g: &Graph) -> usize {
        let mut buf = Vec::new();
        for id in 0..g.len() as u32 {
            for level in 0..=g.level(id) {
                g.neighbors(id, level, &mut buf);
                if g.is_free(id) {
                    assert!(buf.is_empty(), "free slot {id} keeps links at level {level}");
                } else if !g.is_gone(id) {
                    assert!(buf.iter().all(|&x| !g.is_gone(x)), "point {id} links to a deleted point");
                }
            }
        }
        let (e, _) = g.entry.read().unwrap().expect("an entry point");
        assert!(!g.is_gone(e), "the entry point is deleted");
        let live: Vec<u32> = (0..g.len() as u32).filter(|&id| !g.is_gone(id)).collect();
        let lost = live
            .iter()
            .filter(|&&id| g.search(g.vector(id), 1, 64, &|_| true).first().map(|h| h.0) != Some(id))
            .count();
        assert!(lost * 200 <= live.len(), "{lost} of {} live points not found by their own vector", live.len());
        live.len()
    }

    /// Takes the points of `keys` out of `g` as [`crate::dense::DenseIndex::consolidate`]
    /// does, single-threaded; returns how many slots were freed.
    fn delete_keys(g: &mut Graph, keys: &std::collections::HashSet<u64>) -> usize {
        let ids: Vec<u32> = (0..g.len() as u32).filter(|&id| !g.is_gone(id) && keys.contains(&g.key(id))).collect();
        assert_eq!(g.mark_deleted(&ids), ids.len());
        // Marked points are walked through but never returned.
        let q = g.vector(ids[0]).to_vec();
        assert!(g.search(&q, 10, 64, &|_| true).iter().all(|(id, _)| !ids.contains(id)));
        assert!(g.repair(0..g.len()) > 0);
        g.reconnect_unreachable();
        g.free_deleted()
    }

    #[test]
    fn deleted_points_leave_the_graph_and_inserts_reuse_their_slots() {
        use std::collections::{HashMap, HashSet};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.hnsw");
        let data = vectors(6000, 16, 21);
        let queries = vectors(40, 16, 22);
        let mut g = graph_of(&data[..3000], Distance::Cosine, 8, 64, Quantization::None);
        let mut live: HashMap<u64, Vec<f32>> = (0..3000).map(|i| (i as u64, data[i].clone())).collect();

        // A third of the points deleted, their entry point among them.
        let entry_key = g.key(g.entry.read().unwrap().unwrap().0);
        let gone: HashSet<u64> = (0..3000u64).filter(|k| k % 3 == entry_key % 3).collect();
        assert_eq!(delete_keys(&mut g, &gone), 1000);
        live.retain(|k, _| !gone.contains(k));
        assert_eq!((g.len(), g.free_len()), (3000, 1000));
        assert_eq!(assert_clean(&g), 2000);
        let r = live_recall(&g, &live, &queries, 100);
        assert!(r >= 0.95, "recall@10 after deleting a third: {r}");

        // New points fill the free slots before the graph grows.
        for (i, v) in data[3000..4000].iter().enumerate() {
            let id = g.insert_reusing(v, 3000 + i as u64, true);
            assert!((id as usize) < 3000, "slot {id} is fresh while free ones remain");
            live.insert(3000 + i as u64, v.clone());
        }
        assert_eq!((g.len(), g.free_len()), (3000, 0));
        assert_eq!(assert_clean(&g), 3000);
        for (k, v) in &live {
            let id = (0..3000u32).find(|&id| g.key(id) == *k).unwrap();
            assert_eq!(g.vector(id), &v[..]);
        }
        let r = live_recall(&g, &live, &queries, 100);
        assert!(r >= 0.95, "recall@10 after reusing the slots: {r}");

        // Free slots are saved as such and reused after a reopen, in the mapped file (whose
        // saved vectors stay as written: the checksum still holds).
        let more: HashSet<u64> = live.keys().copied().filter(|k| k % 5 == 0).collect();
        let freed = delete_keys(&mut g, &more);
        live.retain(|k, _| !more.contains(k));
        g.save(&path, 7).unwrap();
        let (mut loaded, _) = Graph::load(&path, 100).unwrap();
        assert_eq!((loaded.len(), loaded.free_len(), loaded.mapped_points), (3000, freed, 3000));
        for q in &queries {
            assert_eq!(g.search(q, 10, 50, &|_| true), loaded.search(q, 10, 50, &|_| true));
        }
        for (i, v) in data[4000..4000 + freed].iter().enumerate() {
            let id = loaded.insert_reusing(v, 4000 + i as u64, true);
            assert!((id as usize) < 3000);
            assert_eq!(loaded.vector(id), &v[..]);
            live.insert(4000 + i as u64, v.clone());
        }
        loaded.verify_vectors().unwrap();
        assert_eq!(assert_clean(&loaded), 3000);
        let third: HashSet<u64> = live.keys().copied().filter(|k| k % 7 == 1).collect();
        delete_keys(&mut loaded, &third);
        live.retain(|k, _| !third.contains(k));
        insert_growing(&mut loaded, &data[5000..6000], 5000);
        live.extend((5000..6000).map(|i| (i as u64, data[i].clone())));
        assert_eq!(assert_clean(&loaded), live.len());
        let r = live_recall(&loaded, &live, &queries, 100);
        assert!(r >= 0.95, "recall@10 after a reopen, more deletes and reuse: {r}");
        loaded.save(&path, 8).unwrap();
        let (again, _) = Graph::load(&path, 0).unwrap();
        assert_eq!(again.free_len(), loaded.free_len());
        for q in &queries {
            assert_eq!(loaded.search(q, 10, 50, &|_| true), again.search(q, 10, 50, &|_| true));
        }
    }

    mod damaged {
        use super::*;
        use proptest::prelude::*;

        /// A saved int8 graph with free slots, its bytes, and where the structure's checksum
        /// sits (found, not assumed: the one position whose preceding bytes hash to it).
        fn sample(dir: &Path) -> (std::path::PathBuf, Vec<u8>, usize) {
            let data = vectors(120, 8, 21);
            let mut g = graph_of(&data, Distance::Cosine, 4, 24, Quantization::Int8);
            g.mark_deleted(&[3, 50, 77]);
            g.repair(0..g.len());
            g.free_deleted();
            let path = dir.join("g.hnsw");
            g.save(&path, 7).unwrap();
            let bytes = std::fs::read(&path).unwrap();
            let crc_at = (8..bytes.len() - 4)
                .find(|&p| crc32fast::hash(&bytes[..p]).to_le_bytes()[..] == bytes[p..p + 4])
                .expect("the structure's checksum");
            (path, bytes, crc_at)
        }

        /// The structure's checksum at `crc_at`, recomputed over the (damaged) bytes before it.
        fn reseal(b: &mut [u8], crc_at: usize) {
            let crc = crc32fast::hash(&b[..crc_at]);
            b[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
        }

        /// Header fields that size work (here `ef_construction`, the insert's heaps) are
        /// bounded on open, whatever the checksum says.
        #[test]
        fn an_implausible_ef_construction_is_refused() {
            let dir = tempfile::tempdir().unwrap();
            let (path, mut b, crc_at) = sample(dir.path());
            // The header's u64s after the magic: version, dim, m, m0, ef_construction, ...
            assert_eq!(u64::from_le_bytes(b[40..48].try_into().unwrap()), 24);
            b[40..48].copy_from_slice(&(1u64 << 50).to_le_bytes());
            reseal(&mut b, crc_at);
            std::fs::write(&path, &b).unwrap();
            let err = Graph::load(&path, 4).err().expect("refused");
            assert!(err.to_string().contains("implausible header"), "{err}");
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(300))]
            /// A graph file damaged under a valid checksum (a buggy writer, not a disk: that
            /// the checksum catches) is refused, or opens into a graph that searches, takes
            /// inserts and checks its vectors without a panic.
            #[test]
            fn damaged_graph_files_never_panic(flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
                                               cut in any::<prop::sample::Index>()) {
                let dir = tempfile::tempdir().unwrap();
                let (path, bytes, crc_at) = sample(dir.path());
                let mut b = bytes.clone();
                for (at, x) in &flips {
                    b[8 + at.index(crc_at - 8)] ^= x | 1;
                }
                reseal(&mut b, crc_at);
                std::fs::write(&path, &b).unwrap();
                if let Ok((g, _)) = Graph::load(&path, 4) {
                    for q in vectors(5, 8, 22) {
                        let found = g.search(&q, 10, 32, &|_| true);
                        prop_assert!(found.len() <= 10);
                    }
                    g.insert(&vectors(1, 8, 23)[0], 1000);
                    let _ = g.verify_vectors();
                }
                let cut = cut.index(bytes.len());
                std::fs::write(&path, &bytes[..cut]).unwrap();
                prop_assert!(Graph::load(&path, 0).is_err());
            }
        }
    }
}

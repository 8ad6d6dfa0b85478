//! Paged KV memory: fixed-size blocks of positions handed out by a pool, and per-sequence
//! block tables (vLLM's layout). The device decoder ([`super::device_model`]) keeps keys and
//! values of every layer in one pool of blocks, each block `BLOCK` positions of one layer,
//! so a block table per layer maps a sequence's positions to rows of the cache tensors.
//!
//! What this module decides, on the host: which block holds which position, when blocks are
//! allocated, shared (`n` > 1 sequences share the prompt's blocks), copied before a shared
//! block is written (copy-on-write), dropped when a sliding-window layer no longer needs them,
//! and returned when a sequence finishes, is cancelled or is preempted. The copying of rows
//! happens on the device, from the [`CopyBlock`] orders this module returns.

use std::sync::{Arc, Mutex, MutexGuard};

/// Positions per block.
pub const BLOCK: usize = 16;

/// The blocks of the cache and who holds them.
#[derive(Debug)]
pub struct BlockPool {
    free: Vec<u32>,
    /// Holders of each block (0: free).
    refs: Vec<u32>,
}

/// The pool could not hand out another block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutOfBlocks {
    pub needed: usize,
    pub free: usize,
}

impl std::fmt::Display for OutOfBlocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KV cache out of blocks: {} needed, {} free", self.needed, self.free)
    }
}

impl BlockPool {
    pub fn new(blocks: usize) -> Self {
        let blocks = blocks.min(u32::MAX as usize);
        // Handed out from the low end first: `pop` takes the last element.
        Self { free: (0..blocks as u32).rev().collect(), refs: vec![0; blocks] }
    }

    pub fn capacity(&self) -> usize {
        self.refs.len()
    }

    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    pub fn used_blocks(&self) -> usize {
        self.capacity() - self.free_blocks()
    }

    fn allocate(&mut self) -> Option<u32> {
        let b = self.free.pop()?;
        self.refs[b as usize] = 1;
        Some(b)
    }

    fn share(&mut self, b: u32) {
        self.refs[b as usize] += 1;
    }

    fn release(&mut self, b: u32) {
        let r = &mut self.refs[b as usize];
        debug_assert!(*r > 0, "block {b} released while free");
        *r = r.saturating_sub(1);
        if *r == 0 {
            self.free.push(b);
        }
    }

    fn holders(&self, b: u32) -> u32 {
        self.refs[b as usize]
    }
}

/// A pool shared by the sequences that hold its blocks; each sequence returns its blocks when
/// it is dropped.
pub type SharedPool = Arc<Mutex<BlockPool>>;

fn lock(pool: &SharedPool) -> MutexGuard<'_, BlockPool> {
    // The pool's state stays consistent across a panic in another holder (each operation
    // completes before it returns), so a poisoned lock is still usable.
    pool.lock().unwrap_or_else(|e| e.into_inner())
}

/// Copy the rows of block `from` into block `to` (all [`BLOCK`] positions) before writing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyBlock {
    pub from: u32,
    pub to: u32,
}

/// The blocks of one layer of one sequence: entry `i` holds positions `i * BLOCK ..`; `None`
/// for blocks a sliding-window layer has dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockTable {
    blocks: Vec<Option<u32>>,
}

impl BlockTable {
    /// The cache row of position `pos`, if its block is held.
    pub fn slot(&self, pos: usize) -> Option<u32> {
        let b = (*self.blocks.get(pos / BLOCK)?)?;
        Some(b * BLOCK as u32 + (pos % BLOCK) as u32)
    }

    /// Blocks held.
    pub fn held(&self) -> usize {
        self.blocks.iter().flatten().count()
    }

    pub fn blocks(&self) -> &[Option<u32>] {
        &self.blocks
    }
}

/// The KV memory of one sequence on a paged cache: a block table per layer.
#[derive(Debug)]
pub struct PagedKv {
    pool: SharedPool,
    tables: Vec<BlockTable>,
    /// The attention window of each layer (`None`: global).
    windows: Arc<Vec<Option<usize>>>,
    len: usize,
}

impl PagedKv {
    pub fn new(pool: SharedPool, windows: Arc<Vec<Option<usize>>>) -> Self {
        Self { pool, tables: vec![BlockTable::default(); windows.len()], windows, len: 0 }
    }

    /// Positions stored (or dropped by sliding layers).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn table(&self, layer: usize) -> &BlockTable {
        &self.tables[layer]
    }

    /// Blocks held over all layers.
    pub fn held_blocks(&self) -> usize {
        self.tables.iter().map(BlockTable::held).sum()
    }

    /// Makes room for positions `len..new_len` in every layer: allocates blocks, and replaces
    /// a shared block that is about to be written (the partial block after a fork) by a copy.
    /// On failure nothing is allocated and the pool is as it was.
    pub fn grow(&mut self, new_len: usize) -> Result<Vec<CopyBlock>, OutOfBlocks> {
        if new_len <= self.len {
            return Ok(Vec::new());
        }
        let mut pool = lock(&self.pool);
        let first = self.len / BLOCK;
        let end = new_len.div_ceil(BLOCK);
        // Count first, so that a failure changes nothing.
        let mut needed = 0;
        for t in &self.tables {
            for i in first..end {
                match t.blocks.get(i).copied().flatten() {
                    None => needed += 1,
                    Some(b) if pool.holders(b) > 1 => needed += 1,
                    Some(_) => {}
                }
            }
        }
        if needed > pool.free_blocks() {
            return Err(OutOfBlocks { needed, free: pool.free_blocks() });
        }
        let mut copies = Vec::new();
        for t in &mut self.tables {
            if t.blocks.len() < end {
                t.blocks.resize(end, None);
            }
            for i in first..end {
                match t.blocks[i] {
                    None => t.blocks[i] = pool.allocate(),
                    Some(b) if pool.holders(b) > 1 => {
                        let to = pool.allocate().expect("counted above");
                        // Positions before `len` in this block are the shared ones to keep.
                        if i * BLOCK < self.len {
                            copies.push(CopyBlock { from: b, to });
                        }
                        pool.release(b);
                        t.blocks[i] = Some(to);
                    }
                    Some(_) => {}
                }
            }
        }
        Ok(copies)
    }

    /// Records that positions up to `new_len` are written, and returns to the pool the blocks
    /// of sliding layers that no query from `new_len` on can see (those wholly before
    /// `new_len + 1 - window`).
    pub fn advance(&mut self, new_len: usize) {
        self.len = new_len;
        let mut pool = lock(&self.pool);
        for (t, w) in self.tables.iter_mut().zip(self.windows.iter()) {
            let Some(w) = *w else { continue };
            let keep_from = (new_len + 1).saturating_sub(w) / BLOCK;
            for b in t.blocks.iter_mut().take(keep_from) {
                if let Some(id) = b.take() {
                    pool.release(id);
                }
            }
        }
    }

    /// A sequence that continues from the same positions: it shares every block (the first
    /// write to a shared block copies it, see [`grow`](Self::grow)).
    pub fn fork(&self) -> Self {
        let mut pool = lock(&self.pool);
        for b in self.tables.iter().flat_map(|t| t.blocks.iter().flatten()) {
            pool.share(*b);
        }
        Self { pool: self.pool.clone(), tables: self.tables.clone(), windows: self.windows.clone(), len: self.len }
    }

    /// Returns every block and forgets every position.
    pub fn clear(&mut self) {
        let mut pool = lock(&self.pool);
        for t in &mut self.tables {
            for b in t.blocks.drain(..).flatten() {
                pool.release(b);
            }
        }
        self.len = 0;
    }
}

impl Drop for PagedKv {
    fn drop(&mut self) {
        self.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(blocks: usize) -> SharedPool {
        Arc::new(Mutex::new(BlockPool::new(blocks)))
    }

    fn free(p: &SharedPool) -> usize {
        p.lock().unwrap().free_blocks()
    }

    #[test]
    fn grows_by_blocks_and_maps_positions_to_rows() {
        let p = pool(64);
        let mut kv = PagedKv::new(p.clone(), Arc::new(vec![None, None]));
        assert!(kv.grow(1).unwrap().is_empty());
        assert_eq!(free(&p), 62, "one block per layer");
        kv.advance(1);
        kv.grow(BLOCK).unwrap();
        assert_eq!(free(&p), 62, "the first block still has room");
        kv.advance(BLOCK);
        kv.grow(BLOCK + 1).unwrap();
        assert_eq!(free(&p), 60);
        kv.advance(BLOCK + 1);
        // Every position of every layer has its own row.
        let mut rows: Vec<u32> = (0..2)
            .flat_map(|l| (0..=BLOCK).map(move |pos| (l, pos)))
            .map(|(l, pos)| kv.table(l).slot(pos).unwrap())
            .collect();
        let n = rows.len();
        rows.sort_unstable();
        rows.dedup();
        assert_eq!(rows.len(), n);
        assert_eq!(kv.table(0).slot(2 * BLOCK), None, "its block is not allocated yet");
        assert_eq!(kv.table(0).slot(3).unwrap() % BLOCK as u32, 3);
        drop(kv);
        assert_eq!(free(&p), 64, "a dropped sequence returns its blocks");
    }

    #[test]
    fn a_failed_grow_changes_nothing() {
        let p = pool(5);
        let mut kv = PagedKv::new(p.clone(), Arc::new(vec![None, None]));
        kv.grow(2 * BLOCK).unwrap();
        kv.advance(2 * BLOCK);
        assert_eq!(free(&p), 1);
        let err = kv.grow(2 * BLOCK + 1).unwrap_err();
        assert_eq!(err, OutOfBlocks { needed: 2, free: 1 });
        assert_eq!(free(&p), 1);
        assert_eq!(kv.table(0).held(), 2);
        assert_eq!(kv.table(1).blocks().len(), 2);
    }

    #[test]
    fn forks_share_blocks_and_copy_the_partial_block_before_writing() {
        let p = pool(32);
        let mut a = PagedKv::new(p.clone(), Arc::new(vec![None]));
        a.grow(BLOCK + 5).unwrap();
        a.advance(BLOCK + 5);
        assert_eq!(free(&p), 30);
        let mut b = a.fork();
        assert_eq!(free(&p), 30, "a fork allocates nothing");
        assert_eq!(a.table(0), b.table(0));
        // b writes position BLOCK + 5: its second block is shared, so it gets a copy.
        let copies = b.grow(BLOCK + 6).unwrap();
        let shared = a.table(0).blocks()[1].unwrap();
        let own = b.table(0).blocks()[1].unwrap();
        assert_ne!(shared, own);
        assert_eq!(copies, vec![CopyBlock { from: shared, to: own }]);
        assert_eq!(a.table(0).blocks()[0], b.table(0).blocks()[0], "full blocks stay shared");
        assert_eq!(free(&p), 29);
        // a is now the only holder of its partial block: it writes in place.
        assert!(a.grow(BLOCK + 6).unwrap().is_empty());
        assert_eq!(a.table(0).blocks()[1], Some(shared));
        drop(a);
        assert_eq!(free(&p), 30, "the shared first block stays with b");
        drop(b);
        assert_eq!(free(&p), 32);
    }

    #[test]
    fn a_fork_at_a_block_boundary_copies_nothing() {
        let p = pool(8);
        let mut a = PagedKv::new(p.clone(), Arc::new(vec![None]));
        a.grow(BLOCK).unwrap();
        a.advance(BLOCK);
        let mut b = a.fork();
        assert!(b.grow(BLOCK + 1).unwrap().is_empty());
        assert_eq!(free(&p), 6);
    }

    #[test]
    fn sliding_layers_drop_blocks_behind_the_window() {
        let p = pool(64);
        let window = 20;
        let mut kv = PagedKv::new(p.clone(), Arc::new(vec![Some(window), None]));
        for len in 1..=200 {
            kv.grow(len).unwrap();
            kv.advance(len);
            // The sliding layer holds the window (plus the rest of a block); the global layer all.
            assert!(kv.table(0).held() * BLOCK <= window + 2 * BLOCK, "len {len}");
            assert_eq!(kv.table(1).held(), len.div_ceil(BLOCK));
            // Every position the next query sees is still held.
            for pos in (len + 1).saturating_sub(window)..len {
                assert!(kv.table(0).slot(pos).is_some(), "len {len} pos {pos}");
            }
        }
        kv.clear();
        assert_eq!(free(&p), 64);
        assert!(kv.is_empty());
    }

    #[test]
    fn clear_for_preemption_returns_every_block() {
        let p = pool(16);
        let mut kv = PagedKv::new(p.clone(), Arc::new(vec![None; 3]));
        kv.grow(40).unwrap();
        kv.advance(40);
        assert_eq!(free(&p), 16 - 9);
        let fork = kv.fork();
        kv.clear();
        assert_eq!(free(&p), 16 - 9, "the fork still holds them");
        drop(fork);
        assert_eq!(free(&p), 16);
        // A cleared sequence starts again from position 0.
        kv.grow(1).unwrap();
        assert_eq!(kv.held_blocks(), 3);
    }
}

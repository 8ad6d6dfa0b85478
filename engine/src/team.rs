//! The decoder's threads: a fixed team that spins between the parallel loops of a forward
//! pass instead of sleeping.
//!
//! A decode step of a small model is a few hundred short parallel loops (each projection,
//! each layer's attention), microseconds apart. Run through rayon, every loop woke the other
//! worker from its sleep (a futex wake: an inter-processor interrupt, which a VM turns into
//! an exit to its hypervisor), and on the 2-core VM the second thread sped SmolLM2's decode
//! up by only 1.1–1.25x. llama.cpp keeps its threads spinning through a graph's compute for
//! the same reason. Here the helpers spin for [`SPIN`] after their last loop (a whole decode
//! step, and the gap to the next one), then park until the next loop wakes them.
//!
//! Loops hand out their items one at a time through a compare-and-swap on a counter tagged
//! with the loop's number, so a helper that is late (parked, or descheduled by the host)
//! takes whatever is left or nothing: the calling thread never waits for a helper to arrive,
//! only for the items a helper has taken to finish.

use std::any::Any;
use std::ops::Range;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{fence, AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle helper spins before it parks.
const SPIN: Duration = Duration::from_millis(1);
/// The low bits of [`Shared::next`] count the items taken; the high bits tag the loop.
const IDX_BITS: u32 = 24;
const IDX_MASK: u64 = (1 << IDX_BITS) - 1;
/// Most items one loop hands out (longer loops hand out runs of consecutive items).
const MAX_ITEMS: usize = 1 << 16;

type Job<'a> = &'a (dyn Fn(usize) + Sync);

struct Shared {
    /// Even: loop number × 2 of the published loop; odd while the caller writes the next one.
    seq: AtomicU64,
    /// Points at the caller's `Job` (a reference on its stack) while its loop runs.
    job: AtomicPtr<()>,
    items: AtomicUsize,
    /// `tag << IDX_BITS | next item`; a take is a compare-and-swap that checks the tag.
    next: AtomicU64,
    /// Helpers between joining a loop and leaving it; the caller waits for zero.
    active: AtomicUsize,
    /// A caller holds the team (a loop inside a loop, or a second model's forward, runs on
    /// its own thread instead).
    busy: AtomicBool,
    sleepers: AtomicUsize,
    sleep: Mutex<()>,
    wake: Condvar,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

/// The process's decoder team: as many threads as rayon's pool at first use (the calling
/// thread is one of them).
pub struct Team {
    shared: &'static Shared,
    threads: usize,
}

static TEAM: OnceLock<Team> = OnceLock::new();

/// The team, started at first use with `rayon::current_num_threads()` threads.
pub fn team() -> &'static Team {
    TEAM.get_or_init(|| Team::start(rayon::current_num_threads()))
}

fn tag_of(seq: u64) -> u64 {
    (seq >> 1) & ((1 << (64 - IDX_BITS)) - 1)
}

impl Team {
    fn start(threads: usize) -> Team {
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            seq: AtomicU64::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            items: AtomicUsize::new(0),
            next: AtomicU64::new(0),
            active: AtomicUsize::new(0),
            busy: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            sleep: Mutex::new(()),
            wake: Condvar::new(),
            panic: Mutex::new(None),
        }));
        let mut started = 1;
        for i in 1..threads.max(1) {
            let spawned = std::thread::Builder::new().name(format!("ragway-decode-{i}")).spawn(move || helper(shared));
            match spawned {
                Ok(_) => started += 1,
                Err(e) => {
                    tracing::warn!("decoder thread {i} could not start ({e}); running with {started}");
                    break;
                }
            }
        }
        Team { shared, threads: started }
    }

    /// Threads that run a loop, the caller included.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// `f(i)` for every `i < items`, spread over the team; returns when all have run. A
    /// panic in any of them is raised here, after every item taken has finished.
    pub fn for_each(&self, items: usize, f: impl Fn(usize) + Sync) {
        self.run(items, &f);
    }

    fn run(&self, items: usize, f: Job) {
        if items == 0 {
            return;
        }
        if items > MAX_ITEMS {
            // Handed out in runs of consecutive items instead.
            let per = items.div_ceil(MAX_ITEMS);
            return self.run(items.div_ceil(per), &|i| (i * per..((i + 1) * per).min(items)).for_each(f));
        }
        let s = self.shared;
        if items == 1 || self.threads == 1 || s.busy.swap(true, Acquire) {
            (0..items).for_each(f);
            return;
        }
        let job: Job = f;
        let seq = s.seq.load(Relaxed);
        s.seq.store(seq + 1, Relaxed);
        fence(Release);
        s.job.store(&job as *const Job as *mut (), Relaxed);
        s.items.store(items, Relaxed);
        let tag = tag_of(seq + 2);
        s.next.store(tag << IDX_BITS, Relaxed);
        s.seq.store(seq + 2, SeqCst);
        if s.sleepers.load(SeqCst) > 0 {
            let _g = s.sleep.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        // SAFETY: `job` outlives this call, which returns only after every item taken has
        // finished (the wait on `active` below).
        let mine = catch_unwind(AssertUnwindSafe(|| unsafe { take_items(s, tag, items, &job) }));
        let mut spins = 0u32;
        while s.active.load(SeqCst) != 0 {
            spins += 1;
            if spins < 1 << 14 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        let theirs = s.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
        s.busy.store(false, Release);
        if let Err(p) = mine {
            resume_unwind(p);
        }
        if let Some(p) = theirs {
            resume_unwind(p);
        }
    }

    /// `f(range)` over `0..len` cut into ranges of at least `min` (and at most a few per
    /// thread, for balance when a thread is slow).
    pub fn for_ranges(&self, len: usize, min: usize, f: impl Fn(Range<usize>) + Sync) {
        let parts = (len / min.max(1)).clamp(1, self.threads * 4).min(MAX_ITEMS);
        let per = len.div_ceil(parts.max(1));
        if per == 0 {
            return;
        }
        self.for_each(len.div_ceil(per), |i| f(i * per..((i + 1) * per).min(len)));
    }

    /// `f(i, chunk)` for each `width`-long chunk `i` of `data`, at least `min` chunks to a
    /// thread (fewer chunks than that in all run on the calling thread alone).
    pub fn for_chunks<T: Send>(&self, data: &mut [T], width: usize, min: usize, f: impl Fn(usize, &mut [T]) + Sync) {
        assert!(width > 0 && data.len() % width == 0, "{} values in chunks of {width}", data.len());
        let chunks = data.len() / width;
        if chunks <= min.max(1) {
            data.chunks_exact_mut(width).enumerate().for_each(|(i, c)| f(i, c));
            return;
        }
        let parts = Parts::new(data);
        self.for_ranges(chunks, min, |r| {
            // SAFETY: the ranges `for_ranges` hands out are disjoint, so are their chunks.
            let block = unsafe { parts.slice(r.start * width..r.end * width) };
            block.chunks_exact_mut(width).zip(r).for_each(|(c, i)| f(i, c));
        });
    }
}

/// A mutable slice whose disjoint ranges a loop's items write, each its own.
pub struct Parts<'a, T> {
    ptr: *mut T,
    len: usize,
    _slice: std::marker::PhantomData<&'a mut [T]>,
}

// SAFETY: `Parts` hands out `&mut` ranges of a `&mut [T]` across threads; callers promise
// (by `slice`'s contract) that no two live ranges overlap, as `&mut [T]: Send` needs `T: Send`.
unsafe impl<T: Send> Send for Parts<'_, T> {}
unsafe impl<T: Send> Sync for Parts<'_, T> {}

impl<'a, T> Parts<'a, T> {
    pub fn new(data: &'a mut [T]) -> Self {
        Parts { ptr: data.as_mut_ptr(), len: data.len(), _slice: std::marker::PhantomData }
    }

    /// The values in `range`.
    ///
    /// # Safety
    /// No other live slice from this `Parts` may overlap `range`.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice(&self, range: Range<usize>) -> &'a mut [T] {
        assert!(range.start <= range.end && range.end <= self.len, "{range:?} of {}", self.len);
        std::slice::from_raw_parts_mut(self.ptr.add(range.start), range.end - range.start)
    }
}

/// Takes items of loop `tag` until none is left or another loop has begun.
///
/// # Safety
/// `job` must point at a live `Job` whenever a take of loop `tag` succeeds: the caller's own
/// reference, or one a helper read for `tag` while counted in `active`.
unsafe fn take_items(s: &Shared, tag: u64, items: usize, job: *const Job) {
    loop {
        let n = s.next.load(SeqCst);
        if n >> IDX_BITS != tag || (n & IDX_MASK) as usize >= items {
            return;
        }
        if s.next.compare_exchange_weak(n, n + 1, SeqCst, Relaxed).is_ok() {
            (*job)((n & IDX_MASK) as usize);
        }
    }
}

fn helper(s: &'static Shared) {
    let mut seen = 0u64;
    loop {
        wait_for_loop(s, seen);
        s.active.fetch_add(1, SeqCst);
        let seq = s.seq.load(Acquire);
        let job = s.job.load(Relaxed) as *const Job;
        let items = s.items.load(Relaxed);
        fence(Acquire);
        if seq & 1 == 1 || s.seq.load(Relaxed) != seq {
            // The caller is writing the next loop: read it again.
            s.active.fetch_sub(1, SeqCst);
            continue;
        }
        seen = seq;
        // SAFETY: a take of this loop's tag succeeds only while its caller waits in
        // `for_each` (it waits for `active`, which counts this thread, once every item has
        // been taken), so `job` is live whenever it is called.
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| unsafe { take_items(s, tag_of(seq), items, job) })) {
            *s.panic.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
        }
        s.active.fetch_sub(1, SeqCst);
    }
}

/// Spins until a loop after `seen` is published, parking after [`SPIN`].
fn wait_for_loop(s: &Shared, seen: u64) {
    let start = Instant::now();
    let mut spins = 0u32;
    while s.seq.load(Acquire) == seen {
        std::hint::spin_loop();
        spins = spins.wrapping_add(1);
        if spins % 256 == 0 && start.elapsed() > SPIN {
            let mut g = s.sleep.lock().unwrap_or_else(|e| e.into_inner());
            s.sleepers.fetch_add(1, SeqCst);
            while s.seq.load(SeqCst) == seen {
                g = s.wake.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            s.sleepers.fetch_sub(1, SeqCst);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn every_item_runs_once_whoever_takes_it() {
        let team = Team::start(3);
        for items in [1usize, 2, 3, 7, 64, 1000] {
            let hits: Vec<AtomicU32> = (0..items).map(|_| AtomicU32::new(0)).collect();
            team.for_each(items, |i| {
                hits[i].fetch_add(1, Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Relaxed) == 1), "{items} items");
        }
        // More items than one loop hands out: runs of them.
        let n = MAX_ITEMS * 3 + 5;
        let count = AtomicUsize::new(0);
        team.for_each(n, |i| {
            assert!(i < n);
            count.fetch_add(1, Relaxed);
        });
        assert_eq!(count.load(Relaxed), n);
        // Loops separated by more than the spin: the helpers park and are woken.
        std::thread::sleep(SPIN * 3);
        let sum = AtomicUsize::new(0);
        team.for_ranges(10_000, 100, |r| {
            sum.fetch_add(r.sum::<usize>(), Relaxed);
        });
        assert_eq!(sum.load(Relaxed), (0..10_000).sum::<usize>());
    }

    #[test]
    fn loops_from_many_threads_and_inside_loops_all_complete() {
        let team: &'static Team = Box::leak(Box::new(Team::start(2)));
        let total = AtomicUsize::new(0);
        std::thread::scope(|sc| {
            for _ in 0..4 {
                sc.spawn(|| {
                    for _ in 0..200 {
                        team.for_each(8, |_| {
                            team.for_each(4, |_| {
                                total.fetch_add(1, Relaxed);
                            });
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(Relaxed), 4 * 200 * 8 * 4);
    }

    #[test]
    fn a_panic_in_a_loop_reaches_the_caller_and_the_team_goes_on() {
        let team = Team::start(2);
        let r = catch_unwind(AssertUnwindSafe(|| {
            team.for_each(64, |i| {
                if i % 7 == 3 {
                    panic!("item {i}");
                }
            })
        }));
        assert!(r.is_err());
        let n = AtomicUsize::new(0);
        team.for_each(64, |_| {
            n.fetch_add(1, Relaxed);
        });
        assert_eq!(n.load(Relaxed), 64);
    }
}

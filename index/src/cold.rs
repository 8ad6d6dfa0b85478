//! Mapped files whose pages may be on disk: after a restart with a cold page cache, or
//! under a memory limit that keeps only part of them resident, each page a search touches
//! first is a disk read, and a search that faults its pages in one at a time waits on each
//! in turn. While a kind of page may be cold, searches instead ask the kernel for all the
//! pages of a step at once (`madvise(WILLNEED)`), so that the reads overlap. A syscall per
//! page costs more than a warm search's work on it, so they do so only during a
//! [`ColdSpell`]: after an open, and after a search took a major page fault reading that
//! kind of page.

use std::sync::atomic::{AtomicU32, Ordering};

/// Searches that read ahead after one took a major page fault.
pub(crate) const COLD_SEARCHES: u32 = 64;

/// Searches left that read ahead one kind of mapped page: [`COLD_SEARCHES`] after the open
/// and after a search took a major page fault reading that kind, counted down by each
/// search that took none.
pub(crate) struct ColdSpell(pub(crate) AtomicU32);

impl ColdSpell {
    pub fn new(mapped: bool) -> Self {
        Self(AtomicU32::new(if mapped { COLD_SEARCHES } else { 0 }))
    }

    #[inline]
    pub fn on(&self) -> bool {
        self.0.load(Ordering::Relaxed) > 0
    }

    /// Counts one search that read this kind of page, `faulted` or not.
    pub fn after(&self, faulted: bool) {
        if faulted {
            self.0.store(COLD_SEARCHES, Ordering::Relaxed);
        } else if self.on() {
            let _ = self.0.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| c.checked_sub(1));
        }
    }
}

/// Major page faults (pages read from disk) this thread has taken so far.
pub(crate) fn major_faults() -> u64 {
    #[cfg(target_os = "linux")]
    {
        let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: getrusage writes the struct it is given; RUSAGE_THREAD is Linux's.
        if unsafe { libc::getrusage(libc::RUSAGE_THREAD, ru.as_mut_ptr()) } == 0 {
            // SAFETY: written by the successful call above.
            return unsafe { ru.assume_init() }.ru_majflt as u64;
        }
    }
    0
}

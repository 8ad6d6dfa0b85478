//! Zero-initialised arrays that grow without a copy: the graph's vectors, codes and link
//! lists. Each lives in an anonymous mapping of its own; growing it asks the kernel to
//! extend the mapping or move its pages (`mremap`), so a graph of a million points grows
//! in microseconds instead of copying gigabytes under its write lock, and the new part is
//! backed by memory only when it is first written. Large regions ask for transparent huge
//! pages (`MADV_HUGEPAGE`, over the whole mapping, so that it stays one mapping that
//! `mremap` can move): a graph walk touches vectors and link lists at random, and with
//! 4 KiB pages most of those touches also miss the TLB. Elsewhere than Linux a grow
//! reallocates and copies.

use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Types whose all-zero bytes are a valid value.
///
/// # Safety
/// Implement only for types for which an all-zero bit pattern is a valid, initialised value.
pub(crate) unsafe trait Zeroable {}

// SAFETY: zero is 0.0 / 0 for these, and the cells and atomics are `repr(transparent)` over them.
unsafe impl Zeroable for f32 {}
unsafe impl Zeroable for u32 {}
unsafe impl Zeroable for u64 {}
unsafe impl Zeroable for u8 {}
unsafe impl Zeroable for std::cell::UnsafeCell<f32> {}
unsafe impl Zeroable for std::cell::UnsafeCell<u32> {}
unsafe impl Zeroable for std::sync::atomic::AtomicU32 {}
unsafe impl Zeroable for std::sync::atomic::AtomicU64 {}
unsafe impl Zeroable for std::sync::atomic::AtomicU8 {}

/// `len` zero-initialised `T`s in memory of their own.
pub(crate) struct Region<T: Zeroable> {
    ptr: NonNull<T>,
    len: usize,
    /// Bytes allocated (0 for an empty region, which holds no allocation).
    bytes: usize,
}

// SAFETY: a region owns its memory like a `Box<[T]>`.
unsafe impl<T: Zeroable + Send> Send for Region<T> {}
// SAFETY: as for `Box<[T]>`: shared access hands out `&[T]` only.
unsafe impl<T: Zeroable + Sync> Sync for Region<T> {}

impl<T: Zeroable> Region<T> {
    /// `len` zeroed values. Panics when the size overflows or the memory cannot be had, as
    /// a `Vec` of that size would.
    pub fn zeroed(len: usize) -> Self {
        let bytes = Self::bytes_for(len);
        if bytes == 0 {
            return Region { ptr: NonNull::dangling(), len, bytes: 0 };
        }
        let ptr = sys::alloc_zeroed(bytes, std::mem::align_of::<T>());
        sys::advise(ptr, bytes);
        Region { ptr: ptr.cast(), len, bytes }
    }

    /// Grows to `len` values, keeping the present ones; the new ones are zero. Without a
    /// copy on Linux (the kernel extends or moves the mapping).
    pub fn grow(&mut self, len: usize) {
        assert!(len >= self.len, "a region only grows");
        let bytes = Self::bytes_for(len);
        if bytes == 0 {
            self.len = len;
            return;
        }
        let ptr = if self.bytes == 0 {
            sys::alloc_zeroed(bytes, std::mem::align_of::<T>())
        } else {
            // SAFETY: `ptr` and `self.bytes` describe this region's allocation.
            unsafe { sys::grow(self.ptr.cast(), self.bytes, bytes, std::mem::align_of::<T>()) }
        };
        sys::advise(ptr, bytes);
        self.ptr = ptr.cast();
        self.bytes = bytes;
        self.len = len;
    }

    fn bytes_for(len: usize) -> usize {
        len.checked_mul(std::mem::size_of::<T>()).filter(|&b| b <= isize::MAX as usize).expect("region size overflows")
    }
}

impl<T: Zeroable> Deref for Region<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        // SAFETY: `len` initialised (zeroed or written) values live at `ptr` (or `len * size`
        // is 0 and `ptr` is dangling but aligned).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Zeroable> DerefMut for Region<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`, and `&mut self` is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Zeroable> Drop for Region<T> {
    fn drop(&mut self) {
        if self.bytes > 0 {
            // SAFETY: the region's own allocation, freed once. `Zeroable` types need no drop
            // of their own (plain numbers, cells and atomics of them).
            unsafe { sys::free(self.ptr.cast(), self.bytes, std::mem::align_of::<T>()) }
        }
    }
}

#[cfg(target_os = "linux")]
mod sys {
    use std::ptr::NonNull;

    fn failed(what: &str, bytes: usize) -> ! {
        panic!("{what} of {bytes} bytes failed: {}", std::io::Error::last_os_error())
    }

    /// An anonymous private mapping: zero pages, page-aligned (enough for any `T` here).
    pub fn alloc_zeroed(bytes: usize, _align: usize) -> NonNull<u8> {
        // SAFETY: a fresh anonymous mapping; no existing memory is touched.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            failed("mmap", bytes);
        }
        NonNull::new(p.cast()).expect("mmap returned null")
    }

    /// # Safety
    /// `ptr` and `old` describe a mapping made by [`alloc_zeroed`] or [`grow`].
    pub unsafe fn grow(ptr: NonNull<u8>, old: usize, new: usize, _align: usize) -> NonNull<u8> {
        // SAFETY: the caller's mapping; MREMAP_MAYMOVE keeps its contents, the new pages are
        // anonymous zero pages.
        let p = unsafe { libc::mremap(ptr.as_ptr().cast(), old, new, libc::MREMAP_MAYMOVE) };
        if p == libc::MAP_FAILED {
            failed("mremap", new);
        }
        NonNull::new(p.cast()).expect("mremap returned null")
    }

    /// Huge pages for a mapping of 4 MiB or more, advised over all of it (advice over part
    /// of it would split it in two mappings, which `mremap` refuses to move as one). A
    /// hint: failure changes nothing.
    pub fn advise(ptr: NonNull<u8>, bytes: usize) {
        const HUGE: usize = 2 << 20;
        if bytes >= 2 * HUGE {
            // SAFETY: the whole of a mapping made here; MADV_HUGEPAGE only changes how the
            // kernel backs it.
            unsafe { libc::madvise(ptr.as_ptr().cast(), bytes, libc::MADV_HUGEPAGE) };
        }
    }

    /// # Safety
    /// `ptr` and `bytes` describe a mapping made here, not used afterwards.
    pub unsafe fn free(ptr: NonNull<u8>, bytes: usize, _align: usize) {
        // SAFETY: the caller's mapping.
        unsafe { libc::munmap(ptr.as_ptr().cast(), bytes) };
    }
}

#[cfg(not(target_os = "linux"))]
mod sys {
    use std::alloc::Layout;
    use std::ptr::NonNull;

    fn layout(bytes: usize, align: usize) -> Layout {
        Layout::from_size_align(bytes, align).expect("region layout")
    }

    pub fn advise(_ptr: NonNull<u8>, _bytes: usize) {}

    pub fn alloc_zeroed(bytes: usize, align: usize) -> NonNull<u8> {
        let l = layout(bytes, align);
        // SAFETY: `bytes` > 0.
        NonNull::new(unsafe { std::alloc::alloc_zeroed(l) }).unwrap_or_else(|| std::alloc::handle_alloc_error(l))
    }

    /// # Safety
    /// `ptr` and `old` describe an allocation made here with `align`.
    pub unsafe fn grow(ptr: NonNull<u8>, old: usize, new: usize, align: usize) -> NonNull<u8> {
        let fresh = alloc_zeroed(new, align);
        // SAFETY: both allocations are valid for `old` bytes and distinct.
        unsafe {
            std::ptr::copy_nonoverlapping(ptr.as_ptr(), fresh.as_ptr(), old);
            free(ptr, old, align);
        }
        fresh
    }

    /// # Safety
    /// `ptr` and `bytes` describe an allocation made here with `align`.
    pub unsafe fn free(ptr: NonNull<u8>, bytes: usize, align: usize) {
        // SAFETY: the caller's allocation.
        unsafe { std::alloc::dealloc(ptr.as_ptr(), layout(bytes, align)) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn a_region_starts_zeroed_and_keeps_its_values_as_it_grows() {
        let mut r: Region<u32> = Region::zeroed(1000);
        assert!(r.iter().all(|&x| x == 0));
        for (i, x) in r.iter_mut().enumerate() {
            *x = i as u32 * 7;
        }
        // Past a page, then far past it (the kernel may move the mapping).
        // (3,000,000 u32s are past the huge-page advice's 4 MiB.)
        for len in [1001, 5000, 3_000_000, 3_000_001, 9_000_000] {
            r.grow(len);
            assert_eq!(r.len(), len);
            assert!((0..1000).all(|i| r[i] == i as u32 * 7), "kept at {len}");
            assert!(r[1000..].iter().all(|&x| x == 0), "zero tail at {len}");
            let last = len - 1;
            r[last] = 1;
            r[last] = 0;
        }
        let mut empty: Region<AtomicU32> = Region::zeroed(0);
        assert!(empty.is_empty());
        empty.grow(3);
        empty[2].store(5, Ordering::Relaxed);
        assert_eq!(empty.iter().map(|a| a.load(Ordering::Relaxed)).collect::<Vec<_>>(), [0, 0, 5]);
    }
}

//! The best `k` of a stream of items, kept in a bounded min-heap: the exact dense scan and the
//! keyword walk both collect their results this way.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// The greatest `k` items pushed so far (by `Ord`), the least of them on top.
pub(crate) struct TopK<T: Ord> {
    k: usize,
    heap: BinaryHeap<Reverse<T>>,
}

impl<T: Ord> TopK<T> {
    pub(crate) fn new(k: usize) -> TopK<T> {
        // `k` is bounded by the caller; the heap grows only with the items there are.
        TopK { k, heap: BinaryHeap::with_capacity(k.min(1024)) }
    }

    /// The least of the kept items once there are `k` of them: what a new item must beat.
    pub(crate) fn worst_when_full(&self) -> Option<&T> {
        self.heap.peek().filter(|_| self.heap.len() >= self.k).map(|r| &r.0)
    }

    pub(crate) fn push(&mut self, item: T) {
        if self.heap.len() < self.k {
            self.heap.push(Reverse(item));
        } else if let Some(mut worst) = self.heap.peek_mut() {
            if item > worst.0 {
                *worst = Reverse(item);
            }
        }
    }

    /// Greatest first.
    pub(crate) fn into_sorted(self) -> Vec<T> {
        let mut items: Vec<T> = self.heap.into_iter().map(|r| r.0).collect();
        items.sort_unstable_by(|a, b| b.cmp(a));
        items
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_greatest_k_greatest_first() {
        let mut top = TopK::new(3);
        assert!(top.worst_when_full().is_none());
        for x in [5, 1, 9, 3, 7, 9, 2] {
            top.push(x);
        }
        assert_eq!(top.worst_when_full(), Some(&7));
        assert_eq!(top.into_sorted(), vec![9, 9, 7]);
        let mut none = TopK::new(0);
        none.push(1);
        assert!(none.into_sorted().is_empty());
    }
}

//! Parallel loops over disjoint output ranges.
//!
//! With one thread everything runs inline on the caller (no rayon, no heap
//! allocation: the zero-allocation decode test relies on it). With more,
//! work is split into contiguous index ranges run on the backend's own rayon
//! pool.

use std::ops::Range;

/// A mutable buffer shared by the threads of one op; each thread touches only
/// the elements of the index ranges it was given.
#[derive(Clone, Copy)]
pub struct SharedMut<T> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: threads only access disjoint elements (each op documents its split),
// and the buffer outlives the parallel section (it is borrowed by the op).
unsafe impl<T: Send> Send for SharedMut<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// Wraps a slice for the duration of one op.
    pub fn new(s: &mut [T]) -> Self {
        SharedMut {
            ptr: s.as_mut_ptr(),
            len: s.len(),
        }
    }

    /// Length of the wrapped slice.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the wrapped slice is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Writes element `i`.
    ///
    /// # Safety
    /// No other thread may access element `i` concurrently.
    #[inline(always)]
    pub unsafe fn write(&self, i: usize, v: T) {
        assert!(i < self.len, "SharedMut write out of bounds");
        // SAFETY: in bounds (asserted); exclusive per the contract.
        unsafe { *self.ptr.add(i) = v };
    }

    /// The sub-slice `[start, start + len)`.
    ///
    /// # Safety
    /// No other thread may access any element of the range while the returned
    /// slice lives.
    #[inline(always)]
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice_mut(&self, start: usize, len: usize) -> &mut [T] {
        assert!(start + len <= self.len, "SharedMut slice out of bounds");
        // SAFETY: in bounds (asserted); exclusive per the contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), len) }
    }
}

/// Runs `f` over `0..n` split into contiguous ranges of at least `min_chunk`.
pub fn for_ranges(
    pool: Option<&rayon::ThreadPool>,
    n: usize,
    min_chunk: usize,
    f: impl Fn(Range<usize>) + Sync,
) {
    if n == 0 {
        return;
    }
    match pool {
        None => f(0..n),
        Some(pool) => {
            let threads = pool.current_num_threads().max(1);
            // A few chunks per thread for balance.
            let chunk = n.div_ceil(threads * 4).max(min_chunk.max(1));
            let num_chunks = n.div_ceil(chunk);
            if num_chunks <= 1 {
                return f(0..n);
            }
            pool.install(|| {
                use rayon::prelude::*;
                (0..num_chunks)
                    .into_par_iter()
                    .for_each(|c| f(c * chunk..((c + 1) * chunk).min(n)));
            });
        }
    }
}

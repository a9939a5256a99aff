//! Parallel loops in which the calling thread works too.
//!
//! A training step runs thousands of short parallel sections (each product, each fused
//! element-wise pass: tens to hundreds of microseconds), called from the main thread, which is
//! not one of rayon's workers. A rayon parallel iterator hands the whole loop to the pool and
//! blocks the caller; on two cores with sleeping workers, the section then waits for a worker
//! to wake, and with two tasks the first worker often ran both before the second woke (the LoRA
//! products measured no faster on two threads than on one: src/kernels/gemm/small.rs). Here
//! the caller starts at once on chunks of the work claimed from a shared counter, and workers
//! join when they wake; the caller returns once every claimed chunk is done, not once every
//! helper has run.
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Runs `run` over `0..count` in claimed ranges, on this thread and on up to
/// `rayon::current_num_threads() - 1` of rayon's workers. Each index is run exactly once; which
/// thread runs it varies, so `run` must give the same result whichever does.
pub fn for_each_range(count: usize, run: &(dyn Fn(Range<usize>) + Sync)) {
    let helpers = rayon::current_num_threads()
        .saturating_sub(1)
        .min(count.saturating_sub(1));
    if helpers == 0 {
        run(0..count);
        return;
    }
    // Claims of about an eighth of a thread's share: few counter updates, a balanced end.
    let step = (count / (8 * (helpers + 1))).max(1);
    let claims = Arc::new(Claims {
        next: AtomicUsize::new(0),
        helping: AtomicUsize::new(0),
    });
    // A helper calls `run` only while it is counted in `helping`, and only for a range it
    // claimed; `Wait` (below) returns, even when `run` panics on this thread, only once no range
    // is left to claim and no helper is counted. A helper that starts later finds nothing to
    // claim and never calls `run`: it holds `run` as a raw pointer, and co-owns `claims`.
    let erased = RunPtr::erase(run);
    for _ in 0..helpers {
        let claims = claims.clone();
        rayon::spawn(move || {
            claims.helping.fetch_add(1, Ordering::AcqRel);
            // SAFETY: dereferenced only for a claimed range, which `Wait` waits for.
            claims.work(count, step, |r| unsafe { (*erased.get())(r) });
            claims.helping.fetch_sub(1, Ordering::AcqRel);
        });
    }
    let wait = Wait(&claims);
    claims.work(count, step, run);
    drop(wait);
}

type Run = dyn Fn(Range<usize>) + Sync;

/// `run` with its lifetime erased, for the helpers (see [`for_each_range`]).
#[derive(Clone, Copy)]
struct RunPtr(*const Run);
// SAFETY: the closure is Sync; the pointer is dereferenced only while it is alive.
unsafe impl Send for RunPtr {}

impl RunPtr {
    fn erase(run: &(dyn Fn(Range<usize>) + Sync + '_)) -> Self {
        let p: *const (dyn Fn(Range<usize>) + Sync + '_) = run;
        // SAFETY: a raw pointer cast that drops the trait object's lifetime bound only.
        RunPtr(unsafe {
            std::mem::transmute::<*const (dyn Fn(Range<usize>) + Sync + '_), *const Run>(p)
        })
    }

    // A method, so that closures capture the whole (Send) wrapper, not its raw field.
    fn get(&self) -> *const Run {
        self.0
    }
}

/// Waits, on drop (also when unwinding), until no range is left to claim and no helper is
/// running one.
struct Wait<'a>(&'a Claims);

impl Drop for Wait<'_> {
    fn drop(&mut self) {
        // Nothing more is claimed (after a panic here, the rest is abandoned).
        self.0.next.store(usize::MAX / 2, Ordering::SeqCst);
        while self.0.helping.load(Ordering::Acquire) > 0 {
            std::hint::spin_loop();
        }
    }
}

/// `f(i, chunk)` for each chunk of `chunk` elements of `v` (the last may be shorter), as
/// [`for_each_range`] runs them.
pub fn for_each_chunk_mut<T: Send>(v: &mut [T], chunk: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let chunk = chunk.max(1);
    let (len, base) = (v.len(), SendPtr(v.as_mut_ptr()));
    let run = |range: Range<usize>| {
        for i in range {
            let start = i * chunk;
            let n = chunk.min(len - start);
            // SAFETY: chunk i is elements [start, start + n) of `v`, disjoint from every other
            // chunk, and each index is run once; `v` is borrowed mutably for this call.
            let part = unsafe { std::slice::from_raw_parts_mut(base.get().add(start), n) };
            f(i, part);
        }
    };
    for_each_range(len.div_ceil(chunk), &run);
}

struct Claims {
    next: AtomicUsize,
    /// Helpers between their first claim attempt and their return.
    helping: AtomicUsize,
}

impl Claims {
    fn work(&self, count: usize, step: usize, run: impl Fn(Range<usize>)) {
        loop {
            let t0 = self.next.fetch_add(step, Ordering::AcqRel);
            if t0 >= count {
                return;
            }
            run(t0..(t0 + step).min(count));
        }
    }
}

/// A slice's base pointer shared by the tasks that write its disjoint chunks.
struct SendPtr<T>(*mut T);
// SAFETY: the tasks write disjoint chunks only (see `for_each_chunk_mut`).
unsafe impl<T: Send> Send for SendPtr<T> {}
unsafe impl<T: Send> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    // A method, so that closures capture the whole (Sync) wrapper, not its raw field.
    fn get(&self) -> *mut T {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_index_runs_once() {
        for count in [0, 1, 2, 3, 17, 1000] {
            let hits: Vec<AtomicUsize> = (0..count).map(|_| AtomicUsize::new(0)).collect();
            for_each_range(count, &|r: Range<usize>| {
                for i in r {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                }
            });
            assert!(
                hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                "{count}"
            );
        }
    }

    #[test]
    fn chunks_cover_the_slice() {
        for (len, chunk) in [(0, 4), (1, 4), (10, 3), (4096, 64), (4097, 64)] {
            let mut v = vec![usize::MAX; len];
            for_each_chunk_mut(&mut v, chunk, |i, c| {
                for (j, x) in c.iter_mut().enumerate() {
                    *x = i * chunk + j;
                }
            });
            assert!(v.iter().enumerate().all(|(i, &x)| x == i), "{len} {chunk}");
        }
    }
}

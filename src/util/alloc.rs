//! glibc malloc settings for a training process.
//!
//! A training step allocates and frees many tensors of 1-200 MB. glibc serves every block above
//! its mmap threshold (at most 32 MB) with a fresh `mmap` and gives freed heap tops back to the
//! kernel, so the same memory is page-faulted and zeroed again at every step: about 10 million
//! minor faults in three steps of the benchmark work unit. Keeping all blocks on the heap and
//! never trimming it makes later steps reuse memory that is already mapped (benches/step.rs,
//! bf16 GEMM, with and without `KTO_TRAIN_MALLOC=default`: 13.75 s -> 11.08 s per step, minor
//! faults 10.8 M -> 2.8 M, same peak RSS). The cost is
//! that the process keeps its peak heap until it exits, which a training run does anyway.

/// Environment variable that turns the tuning off (`KTO_TRAIN_MALLOC=default`).
pub const MALLOC_ENV: &str = "KTO_TRAIN_MALLOC";

/// Applies the settings, before the first large allocation. Does nothing when the user already
/// tunes malloc (`GLIBC_TUNABLES`, `MALLOC_*` variables), when `KTO_TRAIN_MALLOC=default`, or off
/// glibc. Returns whether the settings were applied.
///
/// # Safety
/// Call it before any other thread of the process exists: glibc documents `mallopt` as
/// MT-Unsafe (it may initialize the allocator while another thread allocates).
pub unsafe fn tune_for_training() -> bool {
    if std::env::var(MALLOC_ENV).is_ok_and(|v| v == "default") {
        return false;
    }
    let user_tuned = std::env::vars_os().any(|(k, _)| {
        let k = k.to_string_lossy();
        k == "GLIBC_TUNABLES" || (k.starts_with("MALLOC_") && k.ends_with('_'))
    });
    if user_tuned {
        return false;
    }
    // SAFETY: passed on from this function's contract (no other thread exists).
    unsafe { apply() }
}

/// # Safety
/// As [`tune_for_training`]: no other thread exists.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
unsafe fn apply() -> bool {
    // SAFETY: mallopt takes plain integers; the caller guarantees that no other thread can be
    // allocating while the allocator's parameters (and, on first use, the allocator) are set.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0) == 1
            // -1 disables trimming altogether (mallopt(3)).
            && libc::mallopt(libc::M_TRIM_THRESHOLD, -1) == 1
            && libc::mallopt(libc::M_TOP_PAD, 256 << 20) == 1
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
unsafe fn apply() -> bool {
    false
}

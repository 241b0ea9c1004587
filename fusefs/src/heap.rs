//! Handing the heap's free pages back to the kernel.

/// Opening a layer parses its whole TOC (for 100,000 files, tens of MB of JSON and
/// entries) into an index a few times smaller. glibc keeps the freed pages of that peak
/// mapped, which showed as 49 MiB of RSS per mounted 100,000-entry layer instead of the
/// 14 MiB it really uses; a daemon that mounts hundreds of layers must not carry that.
pub(crate) fn return_free_pages() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: malloc_trim only releases pages of free heap chunks (madvise); it takes
    // the allocator's own locks and touches no live allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Allocations at least this big get mappings of their own, unmapped when freed.
pub(crate) const MMAP_THRESHOLD: usize = 128 << 10;

/// Keeps freed big buffers out of the resident set. Range bodies and inflated chunks
/// (hundreds of KiB to 64 MiB) come and go all the time; glibc maps big ones on their
/// own, but raises that threshold after each such free (up to 32 MiB), after which
/// buffers below it come from the heap and their pages stay resident once freed: after
/// reading a 1 GiB file lazysnapd kept about 200 MB of freed buffers. The threshold is
/// fixed instead (at glibc's own starting value): smaller buffers come from the heap,
/// bigger ones are mapped, and those that recur are kept in a bounded pool
/// (`buffers.rs`). A threshold of 1 MiB (with glibc's trim threshold raised to
/// 8 MiB) saved the page faults of the HTTP stack's read buffers but kept about 10 MB
/// more resident after a cold start, in the heaps of the many threads.
/// Called once, at the daemon's start.
pub fn unmap_big_frees() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: mallopt only sets an allocator parameter; called before other threads run.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as i32);
    }
}

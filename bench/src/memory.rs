//! Heap accounting from the instrumented global allocator.

/// Bytes currently allocated on the heap by this process.
pub fn live_bytes() -> i64 {
    let s = stats_alloc::INSTRUMENTED_SYSTEM.stats();
    s.bytes_allocated as i64 - s.bytes_deallocated as i64 + s.bytes_reallocated as i64
}

/// Allocation calls so far (allocs + reallocs).
pub fn allocation_calls() -> u64 {
    let s = stats_alloc::INSTRUMENTED_SYSTEM.stats();
    (s.allocations + s.reallocations) as u64
}

/// Peak resident set size of this process (VmHWM), in bytes.
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

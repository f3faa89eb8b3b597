//! CPU time of the whole machine, for cost-per-unit figures. On veths the
//! forwarding work runs in the sender's CPU time, so throughput alone hides
//! cost: every benchmark that compares datapaths reports CPU seconds too.

/// Busy CPU seconds over all cores since boot (/proc/stat's first line:
/// everything but idle and iowait).
pub fn busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = f.iter().take(8).sum();
    let idle = f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0);
    (total - idle) as f64 / clock_ticks()
}

fn clock_ticks() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64
}

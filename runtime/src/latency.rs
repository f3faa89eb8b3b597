//! Where a worker's time goes, part by part, so an operator can tell
//! kxp's own delay from the kernel's work and from idling. Each part is an
//! HdrHistogram of nanoseconds (1 ns to 60 s, 3 significant digits), kept
//! by the worker and folded into its report every 100 ms:
//!
//! - **engine**: `Worker::process` for one packet, classification to
//!   verdict. Timed on one packet in `ENGINE_SAMPLE_EVERY`: two clock reads
//!   cost about a third of the engine's own ~170 ns in this VM, so timing
//!   every packet would distort what it measures. One in 16 measured 4-8 %
//!   in `bench engine` (which prints the overhead), one in 64 stays near
//!   1 %, and at 1 Mpps it is still 15,000 samples a second.
//! - **tx_wakeup**: each TX wakeup (`sendto`). In copy mode this is the
//!   kernel building an skb per frame and, on a veth, delivering it: the
//!   receiving pod's stack runs inside the call. It is the kernel's work,
//!   shown as such.
//! - **sleep**: each idle sleep in poll(2), until a frame (or the timeout)
//!   wakes the worker.
//!
//! The batch figure (`WorkerReport::latency`: RX ring read to last TX
//! submit, per packet) contains all of the first two.

use std::time::Instant;

use hdrhistogram::Histogram;

/// One packet in this many has its engine time measured.
pub const ENGINE_SAMPLE_EVERY: u32 = 64;

pub fn new_histogram() -> Histogram<u64> {
    // 1 ns .. 60 s at 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("constant histogram bounds are valid")
}

/// A worker's parts, as above.
#[derive(Clone, Debug)]
pub struct PartTimes {
    pub engine: Histogram<u64>,
    pub tx_wakeup: Histogram<u64>,
    pub sleep: Histogram<u64>,
}

impl Default for PartTimes {
    fn default() -> Self {
        PartTimes {
            engine: new_histogram(),
            tx_wakeup: new_histogram(),
            sleep: new_histogram(),
        }
    }
}

impl PartTimes {
    /// Adds `other`'s samples (same bounds: cannot fail).
    pub fn add(&mut self, other: &PartTimes) {
        let _ = self.engine.add(&other.engine);
        let _ = self.tx_wakeup.add(&other.tx_wakeup);
        let _ = self.sleep.add(&other.sleep);
    }

    pub fn reset(&mut self) {
        self.engine.reset();
        self.tx_wakeup.reset();
        self.sleep.reset();
    }

    /// The parts by name, for metrics and dumps.
    pub fn named(&self) -> [(&'static str, &Histogram<u64>); 3] {
        [
            ("engine", &self.engine),
            ("tx_wakeup", &self.tx_wakeup),
            ("sleep", &self.sleep),
        ]
    }
}

/// Times one call in `ENGINE_SAMPLE_EVERY` into a histogram.
#[derive(Debug, Default)]
pub struct Sampler {
    n: u32,
}

impl Sampler {
    /// Runs `f`, timing it if this call is a sampled one.
    #[inline]
    pub fn time<T>(&mut self, into: &mut Histogram<u64>, f: impl FnOnce() -> T) -> T {
        self.n = self.n.wrapping_add(1);
        if self.n % ENGINE_SAMPLE_EVERY != 0 {
            return f();
        }
        let start = Instant::now();
        let out = f();
        into.saturating_record(start.elapsed().as_nanos() as u64);
        out
    }
}

/// Runs `f` and records how long it took.
#[inline]
pub fn timed<T>(into: &mut Histogram<u64>, f: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let out = f();
    into.saturating_record(start.elapsed().as_nanos() as u64);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_known_delay_lands_in_its_part_and_nowhere_else() {
        let mut parts = PartTimes::default();
        let mut sampler = Sampler::default();
        // "Packets" that each take at least 1 ms: the sampled ones must
        // show it.
        for _ in 0..4 * ENGINE_SAMPLE_EVERY {
            sampler.time(&mut parts.engine, || std::thread::sleep(Duration::from_millis(1)));
        }
        assert_eq!(parts.engine.len(), 4, "one in {ENGINE_SAMPLE_EVERY}");
        assert!(parts.engine.min() >= 1_000_000, "{} ns", parts.engine.min());
        assert!(parts.tx_wakeup.is_empty() && parts.sleep.is_empty());
        timed(&mut parts.sleep, || std::thread::sleep(Duration::from_millis(3)));
        assert!(parts.sleep.value_at_quantile(0.5) >= 3_000_000);
        let mut total = PartTimes::default();
        total.add(&parts);
        assert_eq!(total.engine.len(), parts.engine.len());
        parts.reset();
        assert!(parts.engine.is_empty() && parts.sleep.is_empty());
    }
}

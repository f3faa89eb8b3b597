//! Time as the engine sees it: a monotonic nanosecond count handed in by the
//! caller. The engine never reads a clock, so tests and simulations can drive
//! expiry exactly.

use std::ops::Add;
use std::time::Duration;

/// Nanoseconds since an arbitrary, fixed origin (the runtime uses
/// `CLOCK_MONOTONIC`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Time(pub u64);

impl Time {
    pub const ZERO: Time = Time(0);

    pub fn from_secs(s: u64) -> Self {
        Time(s.saturating_mul(1_000_000_000))
    }

    pub fn from_millis(ms: u64) -> Self {
        Time(ms.saturating_mul(1_000_000))
    }

    /// Time elapsed since `earlier`, zero if `earlier` is later.
    pub fn since(self, earlier: Time) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

impl Add<Duration> for Time {
    type Output = Time;
    fn add(self, d: Duration) -> Time {
        Time(self.0.saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)))
    }
}

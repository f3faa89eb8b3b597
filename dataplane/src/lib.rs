//! kxp's dataplane: a sans-IO packet engine with kube-proxy semantics, the
//! tables it reads, and the per-flow state it shares between workers.
//!
//! Map (see `docs/ARCHITECTURE.md` for the whole picture):
//! - [`wire`]: checked zero-copy header views and checksum arithmetic.
//! - [`tables`]: the immutable, atomically published configuration snapshot
//!   (services, Maglev tables, routes, neighbours, node facts).
//! - [`flow`]: conntrack and session affinity, shared by all workers.
//! - [`engine`]: `Worker::process(now, tables, port, frame) -> Verdict`.
//!
//! No unsafe code lives here; the AF_XDP runtime (a separate module with
//! its own `// SAFETY:` notes) is the only place allowed to have it.
#![forbid(unsafe_code)]

pub mod addr;
pub mod craft;
pub mod engine;
pub mod flow;
pub mod frame;
pub mod hash;
pub mod tables;
pub mod time;
pub mod wire;

pub use engine::{DropReason, Stats, Verdict, Worker};
pub use frame::Frame;
pub use tables::{Publisher, Reader, Tables};
pub use time::Time;

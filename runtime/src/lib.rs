//! kxp's kernel-facing runtime: the XDP steering program (loaded with aya,
//! attached through a BPF link, so a killed kxp leaves nothing behind; its
//! maps follow the published tables), the AF_XDP sockets and their frame
//! pool, the pinned workers that run the engine on them, and the kernel
//! facts (interfaces, routes, neighbours) the engine's tables need.
//!
//! This crate is the one place kxp allows unsafe code (kernel ABI structs,
//! UMEM frames, ring access); every unsafe block carries a `// SAFETY:` note.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod datapath;
pub mod host;
pub mod latency;
pub mod netlink;
pub mod ports;
pub mod sockets;
pub mod steering;
pub mod tun;
pub mod worker;
pub mod xsk;

pub use datapath::{Datapath, DatapathConfig, DatapathError};
pub use steering::{Steering, SteeringError, SteeringStats};

//! kxp's kernel-facing runtime. Today: the XDP steering program, loaded with
//! aya (its unsafe syscalls live in aya) and attached through a BPF link, so
//! a killed kxp leaves nothing behind; its maps are filled from the
//! published tables. Next: AF_XDP sockets and pinned workers.
//!
//! This crate is the one place kxp allows unsafe code (kernel ABI structs,
//! and later UMEM frames); every unsafe item carries a `// SAFETY:` note.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod steering;

pub use steering::{Steering, SteeringError, SteeringStats};
